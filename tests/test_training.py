"""Training-ready exports: statistics recorded with every export, and the training reader (several
columns aligned, ranks x workers, epochs, even batches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actlightning.files.statistics import statistics
from actlightning.read.reader import open_export
from actlightning.read.training import batch_quotas, iter_token_batches
from tests.helpers import read_rows, read_token_rows, run_export

SETTINGS = {"model.layers": "[1, 3]", "data.batch_size": 3, "writer.batches_per_shard": 2}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoints, games_file) -> dict:
    """The same export in both layouts (float16 storage: the statistics are over the stored values)."""
    root = tmp_path_factory.mktemp("training")
    out = {}
    for layout in ("token", "sequence"):
        out[layout] = root / layout
        run_export(
            checkpoints["gpt2"],
            games_file,
            out[layout],
            **SETTINGS,
            **{"writer.layout": layout, "model.output_dtype": "float16"},
        )
    return out


def _all_tokens(export) -> dict[str, np.ndarray]:
    rows = read_token_rows(export)
    return {
        "key": np.array([(r["example_id"], r["position"]) for r in rows]),
        "token_id": np.array([r["token_id"] for r in rows]),
        "layer_3": np.stack([r["layer_3"] for r in rows]).astype(np.float64),
    }


def test_statistics_match_numpy_over_the_stored_values(exports):
    tokens = _all_tokens(exports["token"])
    x = tokens["layer_3"]
    norms = np.linalg.norm(x, axis=1)
    for layout in ("token", "sequence"):
        stats = open_export(exports[layout]).stats("layer_3")
        assert stats["count"] == len(x)
        np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats["var"], x.var(0), rtol=1e-8, atol=1e-12)
        assert stats["mean_norm"] == pytest.approx(norms.mean(), rel=1e-10)
        assert stats["mean_squared_norm"] == pytest.approx((norms**2).mean(), rel=1e-10)
    manifest = json.loads((exports["token"] / "manifest.json").read_text())
    assert manifest["stats"]["layer_1"]["count"] == len(x) and "mean" not in manifest["stats"]["layer_1"]


def test_statistics_from_sums_are_population_statistics():
    x = np.random.default_rng(0).normal(size=(50, 3))
    squares = (x * x).sum(1)
    sums = np.concatenate([x.sum(0), (x * x).sum(0), [np.sqrt(squares).sum(), squares.sum()]])
    stats = statistics(sums, len(x))
    np.testing.assert_allclose(stats["var"], x.var(0), rtol=1e-12)
    np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-12)
    assert stats["mean_norm"] == pytest.approx(np.sqrt(squares).mean()) and stats["count"] == 50


def test_asking_for_a_column_without_statistics_names_the_columns(exports):
    with pytest.raises(KeyError, match="the vector columns are"):
        open_export(exports["token"]).stats("layer_9")


@pytest.mark.parametrize("layout", ["token", "sequence"])
def test_several_columns_come_aligned_in_either_layout(exports, layout):
    expected = _all_tokens(exports["token"])
    index = {tuple(k): i for i, k in enumerate(expected["key"])}
    columns = ["layer_3", "example_id", "position", "token_id"]
    seen = 0
    for batch in iter_token_batches(exports[layout], columns, batch_size=37, shuffle_buffer=200, seed=3):
        assert set(batch) == set(columns) and batch["layer_3"].dtype == torch.float16
        for row in range(len(batch["example_id"])):
            i = index[(int(batch["example_id"][row]), int(batch["position"][row]))]
            assert int(batch["token_id"][row]) == expected["token_id"][i]
            np.testing.assert_array_equal(batch["layer_3"][row].double().numpy(), expected["layer_3"][i])
        seen += len(batch["example_id"])
    assert seen == len(expected["key"])


def _keys(batches) -> list[tuple[int, int]]:
    return [(int(e), int(p)) for b in batches for e, p in zip(b["example_id"], b["position"], strict=True)]


@pytest.mark.parametrize("shuffle_buffer", [None, 64])
def test_ranks_and_workers_read_every_row_once(exports, shuffle_buffer):
    everything = sorted(map(tuple, _all_tokens(exports["token"])["key"].tolist()))
    for world_size, num_workers in ((1, 1), (2, 1), (2, 3), (3, 2)):
        keys = []
        for rank in range(world_size):
            for worker in range(num_workers):
                batches = iter_token_batches(
                    exports["token"], ["example_id", "position"], 16, shuffle_buffer, 1, worker, num_workers,
                    rank=rank, world_size=world_size,
                )  # fmt: skip
                keys += _keys(batches)
        assert sorted(keys) == everything, (world_size, num_workers)


def test_epochs_change_the_order_not_the_rows(exports):
    def epoch(e: int) -> list:
        return _keys(iter_token_batches(exports["token"], ["example_id", "position"], 16, 64, 1, epoch=e))

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert first == again, "an epoch's order is a pure function of the seed and the epoch"
    assert first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_even_batches_give_every_rank_the_same_number_of_full_batches(exports, num_workers):
    counts = []
    for rank in range(2):
        batches = [
            b
            for worker in range(num_workers)
            for b in iter_token_batches(
                exports["sequence"],
                "layer_1",
                10,
                50,
                0,
                worker,
                num_workers,
                rank=rank,
                world_size=2,
                even_batches=True,
            )  # fmt: skip
        ]
        assert all(len(b) == 10 for b in batches)
        counts.append(len(batches))
    assert counts[0] == counts[1] > 0
    total = len(_all_tokens(exports["token"])["key"])
    # Dropped: each reader's partial batch, and what one rank has beyond the other's share.
    assert total - 2 * 10 * counts[0] < total * 0.5


def test_batch_quotas_match_the_smallest_rank():
    # Two ranks x two workers: rank 0 has 3 + 1 full batches, rank 1 has 2 + 0.
    assert batch_quotas([[25, 10], [10, 5], [20, 4], [3]], 10, 2) == [2, 0, 2, 0]
    assert sum(batch_quotas([[25, 10], [10, 5], [20, 4], [3]], 10, 2)[:2]) == 2


def test_read_rows_of_the_sequence_export_match_the_token_reader(exports):
    rows = read_rows(exports["sequence"])
    tokens = sum(len(r["input_ids"]) for r in rows)
    read = sum(len(b) for b in iter_token_batches(exports["sequence"], "layer_1", 64))
    assert read == tokens
