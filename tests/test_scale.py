"""Billion-token data side: tokenize once into an on-disk cache, and streaming exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import actlightning.data.tokens
from actlightning.contracts import DataCounts
from actlightning.data.stream import stream_shards
from tests.helpers import REPO, assert_rows_match_reference, export_args, read_rows, run_cli, run_export, run_main


def _shard_contents(out) -> dict[str, list[int]]:
    return {
        p.name: pq.read_table(p, columns=["example_id"]).column(0).to_pylist() for p in sorted(out.glob("*.parquet"))
    }


def _texts(games_file) -> dict[int, str]:
    return {i: json.loads(line)["Transcript"] for i, line in enumerate(games_file.read_text().splitlines())}


@pytest.fixture
def count_tokenizing(monkeypatch) -> list[int]:
    """Rows the cached tokenization maps (0 on a cache hit)."""
    calls = []
    original = actlightning.data.tokens._tokenize_batch

    def counting(texts, tokenizer):
        calls.append(len(texts))
        return original(texts, tokenizer)

    monkeypatch.setattr(actlightning.data.tokens, "_tokenize_batch", counting)
    return calls


def test_second_run_reads_the_token_cache(tmp_path, checkpoints, games_file, count_tokenizing):
    cache = tmp_path / "hf-cache"
    settings = {"model.layers": "[1]", "data.path": "json"}
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    try:
        import datasets.config

        previous, datasets.config.HF_DATASETS_CACHE = datasets.config.HF_DATASETS_CACHE, cache
        run_export(checkpoints["gpt2"], games_file, tmp_path / "a", **settings)
        assert sum(count_tokenizing) == 40, "the first run tokenizes every row once"
        count_tokenizing.clear()
        run_export(
            checkpoints["gpt2"],
            games_file,
            tmp_path / "b",
            **settings,
            **{"data.max_length": 20, "data.filter": "tests.filter_fixtures.high_white_elo"},
        )
        assert count_tokenizing == [], "filter and max_length apply to cached tokens: no tokenizing"
        assert_rows_match_reference(
            read_rows(tmp_path / "b"), {i: t[:20] for i, t in _texts(games_file).items()}, checkpoints["gpt2"]
        )
        run_export(checkpoints["llama"], games_file, tmp_path / "c", **settings)
        assert sum(count_tokenizing) == 40, "another tokenizer tokenizes again"
        count_tokenizing.clear()
        run_export(checkpoints["gpt2"], games_file, tmp_path / "d", **settings, **{"data.input_column": "Site"})
        assert sum(count_tokenizing) == 40, "another input column tokenizes again"
    finally:
        datasets.config.HF_DATASETS_CACHE = previous
        del os.environ["HF_DATASETS_CACHE"]


@pytest.mark.parametrize("budget", [None, 300])
def test_streaming_and_cached_exports_equal_the_in_memory_plan(tmp_path, checkpoints, games_file, budget):
    base = {
        "data.bucket_size": 8,
        "data.batch_size": 3,
        "writer.batches_per_shard": 2,
        "data.sort_reversed": "true",
        "model.layers": "[0, 2]",
        "data.label_columns": "[WhiteElo, Site]",
        "data.limit": 35,
        "data.min_tokens": 5,
    }
    if budget:
        base["data.max_tokens"] = budget
    run_export(checkpoints["gpt2"], games_file, tmp_path / "cached", **base)
    run_export(checkpoints["gpt2"], games_file, tmp_path / "stream", **base, **{"data.streaming": "true"})
    cached, stream = _shard_contents(tmp_path / "cached"), _shard_contents(tmp_path / "stream")
    assert cached == stream, "same example ids in the same shards, in the same order"
    rows_cached, rows_stream = read_rows(tmp_path / "cached"), read_rows(tmp_path / "stream")
    for a, b in zip(rows_cached, rows_stream, strict=True):
        assert a["example_id"] == b["example_id"] and a["input_ids"] == b["input_ids"]
        assert (a["WhiteElo"], a["Site"]) == (b["WhiteElo"], b["Site"])
        np.testing.assert_array_equal(a["layer_2"], b["layer_2"])  # same batches: same shapes
    assert_rows_match_reference(rows_stream, _texts(games_file), checkpoints["gpt2"])
    manifest = json.loads((tmp_path / "stream" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["examples"] == 35
    assert manifest["data"]["removed"].get("limit", 0) == 0 and manifest["data"]["selected"] == 35


@pytest.mark.parametrize(("bucket_size", "budget"), [(10, 90), (None, 90), (None, None), (7, None)])
def test_stream_shards_cut_windows_like_the_plan(bucket_size, budget):
    """Without bucket_size a token-budget batch may span two windows: it must still match the plan."""
    from actlightning.data.batching import group_shards, plan_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=53)
    examples = ((i, np.arange(n), {"row": i}) for i, n in enumerate(lengths))
    labels = pa.schema([("row", pa.int64())])
    shards = list(stream_shards(examples, 4, budget, bucket_size, True, 3, None, labels, DataCounts()))
    planned = group_shards(plan_batches(lengths, 4, budget, bucket_size=bucket_size, descending=True), 3)
    assert [index for index, _ in shards] == list(range(len(planned)))
    for (_, batches), expected in zip(shards, planned, strict=True):
        assert [b.store.example_ids[b.planned.positions].tolist() for b in batches] == [e.tolist() for e in expected]
        for batch in batches:  # label rows travel with their examples, across windows too
            rows = batch.labels.take(pa.array(batch.planned.positions)).column("row").to_pylist()
            assert rows == batch.store.example_ids[batch.planned.positions].tolist()


REFUSED = {
    "data.sort_by_length": ({"data.sort_by_length": "true"}, "data.sort_by_length does not work with data.streaming"),
    "data.dedupe": ({"data.dedupe": "true"}, "data.dedupe does not work with data.streaming"),
    "data.drop_prefixes": ({"data.drop_prefixes": "true"}, "data.drop_prefixes does not work with data.streaming"),
    "data.shuffle_seed": ({"data.shuffle_seed": 0}, "data.shuffle_seed does not work with data.streaming"),
    "data.batch_order_seed": ({"data.batch_order_seed": 1}, "data.batch_order_seed does not work with data.streaming"),
    "data.auto_find_batch_size": (
        {"data.auto_find_batch_size": "true"},
        "data.auto_find_batch_size does not work with data.streaming",
    ),
    "data.num_workers": ({"data.num_workers": 2}, "data.num_workers does not work with data.streaming"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_streaming_refuses_whole_dataset_settings(tmp_path, checkpoints, games_file, name):
    overrides, message = REFUSED[name]
    out = tmp_path / "out"
    result = run_main(export_args(checkpoints["gpt2"], games_file, out, **{"data.streaming": "true", **overrides}))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not out.exists()


def test_streaming_dry_run_plans_without_totals(tmp_path, checkpoints, games_file):
    result = run_main(
        export_args(
            checkpoints["gpt2"],
            games_file,
            tmp_path / "out",
            **{"data.streaming": "true", "writer.dry_run": "true", "model.layers": "[1]"},
        )
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plan: streaming, so examples, tokens and size are counted as they come" in result.stderr
    assert not (tmp_path / "out").exists()


def _stream_args(checkpoint, games_file, out, **extra):
    return export_args(
        checkpoint,
        games_file,
        out,
        **{
            "data.streaming": "true",
            "data.bucket_size": 8,
            "data.batch_size": 2,
            "writer.batches_per_shard": 1,
            "model.layers": "[1]",
            **extra,
        },
    )


def test_streaming_export_killed_and_rerun_equals_the_uninterrupted_one(tmp_path, checkpoints, games_file):
    reference = tmp_path / "reference"
    assert run_main(_stream_args(checkpoints["gpt2"], games_file, reference)).returncode == 0
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.slow_export", *_stream_args(checkpoints["gpt2"], games_file, out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.parquet"))) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(out.glob("*.parquet")))
    assert 4 <= done < 20, "killed in the middle"
    assert run_main(_stream_args(checkpoints["gpt2"], games_file, out)).returncode == 0
    assert _shard_contents(out) == _shard_contents(reference), "no row lost or written twice"
    for a, b in zip(read_rows(out), read_rows(reference), strict=True):
        np.testing.assert_allclose(a["layer_1"], b["layer_1"], rtol=0, atol=1e-5)


def test_streaming_on_two_processes_exports_every_row_once(tmp_path, checkpoints, games_file):
    single = tmp_path / "single"
    assert run_main(_stream_args(checkpoints["gpt2"], games_file, single)).returncode == 0
    result = run_cli(
        _stream_args(
            checkpoints["gpt2"], games_file, tmp_path / "ddp", **{"trainer.devices": 2, "trainer.strategy": "ddp"}
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = _shard_contents(tmp_path / "ddp")
    assert {name.split("-rank")[1] for name in ddp} == {"00.parquet", "01.parquet"}
    by_index = lambda shards: {name.split("-rank")[0]: ids for name, ids in shards.items()}  # noqa: E731
    assert by_index(ddp) == by_index(_shard_contents(single))


def test_read_only_dataset_folder_caches_tokens_in_the_datasets_cache(tmp_path, checkpoints, monkeypatch):
    """A shared, read-only save_to_disk folder is left untouched (tests run as root, so the folder's
    read-only state is simulated where the code checks it)."""
    import datasets.config
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer

    folder = tmp_path / "shared"
    Dataset.from_dict({"text": ["e2e4", "d2d4 d7d5", ""]}).save_to_disk(folder)
    before = sorted(p.name for p in folder.iterdir())
    real_access = os.access
    monkeypatch.setattr(
        actlightning.data.tokens.os,
        "access",
        lambda p, mode: False if str(p).startswith(str(folder)) else real_access(p, mode),
    )
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    tokens = actlightning.data.tokens.tokenize_dataset(
        load_from_disk(folder), "text", AutoTokenizer.from_pretrained(checkpoints["gpt2"])
    )
    assert tokens["length"] == [4, 9, 0]
    assert sorted(p.name for p in folder.iterdir()) == before
    assert all(str(tmp_path / "hf-cache") in f["filename"] for f in tokens.cache_files)


def test_several_tokenizing_processes_give_the_same_cache(tmp_path, checkpoints, monkeypatch):
    """data.num_proc splits the tokenizing map over processes; the cached tokens are the same."""
    import datasets.config
    from datasets import Dataset, load_from_disk
    from transformers import AutoTokenizer

    texts = _texts_list(60)
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["llama"])
    results = {}
    for num_proc in (None, 2):
        folder = tmp_path / f"data-{num_proc}"
        Dataset.from_dict({"text": texts}).save_to_disk(folder)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / f"cache-{num_proc}")
        tokens = actlightning.data.tokens.tokenize_dataset(load_from_disk(folder), "text", tokenizer, num_proc=num_proc)
        results[num_proc] = (tokens["input_ids"], tokens["length"], len(tokens.cache_files))
    assert results[2][:2] == results[None][:2]
    assert results[None][:2][0][0] == tokenizer(texts[0])["input_ids"]
    assert results[2][2] == 2, "two processes wrote two cache shards"


def _texts_list(count: int) -> list[str]:
    from actlightning.face.demo import chess_games

    return [game["Transcript"] for game in chess_games(count, seed=9, min_moves=1, max_moves=20)]
