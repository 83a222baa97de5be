"""Pure functions, tested without a Trainer."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from actlightning.contracts import PlannedBatch, Prediction
from actlightning.data.batching import BatchViews, assign_shards, group_shards, length_order, rank_batches
from actlightning.data.collate import TokenStore, collate
from actlightning.files.schema import build_features, build_schema
from actlightning.files.tables import batch_to_table
from actlightning.model.capture import resolve_layers
from actlightning.model.forward import select_tokens
from actlightning.read.reader import column_vectors, to_torch


def test_resolve_layers_normalizes_negatives_and_sorts():
    assert resolve_layers(None, 3) == [0, 1, 2, 3]
    assert resolve_layers([-1, 0, 2], 3) == [0, 2, 3]


def test_resolve_layers_empty_means_no_layers():
    assert resolve_layers([], 3) == []


@pytest.mark.parametrize(
    ("layers", "message"), [([4], "out of range"), ([-5], "out of range"), ([1, -3], "more than once")]
)
def test_resolve_layers_rejects_bad_indices(layers, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(layers, 3)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_select_tokens_keeps_last_n_real_tokens(padding_side):
    lengths = torch.tensor([3, 1, 5])
    seq_len = 5
    first = torch.zeros(3, dtype=torch.long) if padding_side == "right" else seq_len - lengths
    flat, n_tokens, start = select_tokens(lengths, first, seq_len, n_pos=2)
    assert n_tokens.tolist() == [2, 1, 2]
    assert start.tolist() == [1, 0, 3]
    rows, cols = (flat // seq_len).tolist(), (flat % seq_len).tolist()
    expected_cols = [1, 2, 0, 3, 4] if padding_side == "right" else [3, 4, 4, 3, 4]
    assert rows == [0, 0, 1, 2, 2] and cols == expected_cols


def test_token_table_selects_reorders_and_reads_truncated_tokens():
    import pyarrow as pa

    from actlightning.data.tokens import TokenTable

    column = pa.chunked_array([pa.array([[1, 2, 3], [4]]), pa.array([[5, 6]])])
    table = TokenTable(column, np.array([0, 1, 2], dtype=np.int32), np.array([2, 1, 2], dtype=np.int32))
    picked = table.select(np.array([2, 0]))
    assert picked.example_ids.tolist() == [2, 0]
    assert [t.tolist() for t in picked.sequences(np.array([0, 1]))] == [[5, 6], [1, 2]], "cut to the lengths"
    assert picked.sequence(1).tolist() == [1, 2]


def test_length_order_is_stable_both_ways():
    lengths = np.array([3, 1, 3, 2])
    assert length_order(lengths).tolist() == [1, 3, 0, 2]
    assert length_order(lengths, descending=True).tolist() == [0, 2, 3, 1]


def test_chunks_and_shards_keep_every_example_and_full_shards():
    batches = BatchViews.from_cuts(np.arange(10), [3, 6, 9])
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    shards = group_shards(batches, 3)
    assert [len(s) for s in shards] == [3, 1]
    assert [len(s) for s in group_shards(batches, 1, max_shards=2)] == [1, 1]


def test_assign_shards_balances_tokens_and_covers_all():
    tokens = [100, 10, 10, 10, 90, 5]
    owned = assign_shards(tokens, 2)
    assert sorted(owned[0] + owned[1]) == list(range(6))
    loads = [sum(tokens[i] for i in shards) for shards in owned]
    assert abs(loads[0] - loads[1]) <= 20
    assert assign_shards(tokens, 2) == owned


def test_rank_batches_flags_last_batch_of_each_shard():
    shards = [[np.array([0]), np.array([1])], [np.array([2])]]
    planned = rank_batches(shards, [7, 8], [0, 1])
    assert [(b.shard_index, b.last_in_shard) for b in planned] == [(7, False), (7, True), (8, True)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_pads_and_counts_positions_from_zero(padding_side):
    store = TokenStore.from_sequences([[5, 6, 7], [8]], example_ids=[10, 11])
    batch = collate(store, PlannedBatch(np.array([0, 1]), 0, True), pad_id=0, padding_side=padding_side)
    if padding_side == "right":
        assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    else:
        assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
        assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
        assert batch.first_token.tolist() == [0, 2]
    assert batch.attention_mask.sum(1).tolist() == [3, 1]
    assert batch.example_id.tolist() == [10, 11]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_batch_to_table_round_trips_vectors_bit_exactly(dtype):
    torch_dtype = getattr(torch, dtype)
    vectors = torch.randn(7, 4).to(torch_dtype)
    prediction = Prediction(
        example_id=torch.tensor([3, 9]),
        n_tokens=torch.tensor([5, 2]),
        start_position=torch.tensor([0, 1]),
        input_ids=torch.arange(7, dtype=torch.int32),
        vectors={"layer_1": vectors},
        max_abs=torch.zeros(1),
    )
    features = build_features({"layer_1": 4}, dtype)
    schema = build_schema(features, dtype)
    table = batch_to_table(prediction, schema, pa.table({}))
    assert table.column("input_ids").to_pylist() == [[0, 1, 2, 3, 4], [5, 6]]
    got, offsets = column_vectors(table.column("layer_1"))
    assert offsets.tolist() == [0, 5, 7]
    decoded = to_torch(got, dtype)
    assert decoded.dtype == torch_dtype
    assert torch.equal(
        decoded.view(torch.int16 if dtype != "float32" else torch.int32),
        vectors.view(torch.int16 if dtype != "float32" else torch.int32),
    )


def test_tmp_files_of_shards_and_manifest_are_recognised(tmp_path):
    from actlightning.files.manifest import manifest_bytes
    from actlightning.files.shard_file import is_tmp_file, shard_name, tmp_name
    from actlightning.files.storage import LocalLocation

    assert is_tmp_file(tmp_name(shard_name(3, 1))) and is_tmp_file(".actlightning-write-check.0f3a.tmp")
    assert not is_tmp_file(shard_name(3, 1)) and not is_tmp_file(".hidden.tmp") and not is_tmp_file("manifest.json")
    # A run that dies between writing the manifest and renaming it into place: here the rename fails
    # (the target is a non-empty folder), leaving the written temporary file behind.
    (tmp_path / "manifest.json").mkdir()
    (tmp_path / "manifest.json" / "x").write_text("")
    with pytest.raises(OSError):
        LocalLocation(tmp_path).write_bytes("manifest.json", manifest_bytes({"a": 1}))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "manifest.json"]
    assert len(leftovers) == 1 and is_tmp_file(leftovers[0]), "a manifest a killed run left half-written is cleaned up"
