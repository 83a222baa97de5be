"""Filtering, sampling, ordering and batching: pure functions on adversarial inputs."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from actlightning.data.batching import assign_shards, pack_batches, padding_efficiency, plan_batches
from actlightning.data.collate import find_batch_size
from actlightning.data.filters import drop_prefixes, length_range, shuffle_and_limit


def _brute_force_prefixes(inputs):
    return [i for i, s in enumerate(inputs) if not any(len(t) > len(s) and t.startswith(s) for t in inputs)]


def _first_occurrences(inputs):
    return [i for i, value in enumerate(inputs) if value not in inputs[:i]]


def test_dedupe_keeps_first_occurrence_in_order():
    from actlightning.data.tokens import dedupe_rows

    inputs = ["b", "a", "b", "", "é", "a", "", "é"]
    assert dedupe_rows(_arrow(inputs), np.arange(len(inputs))).tolist() == [0, 1, 3, 4]
    tokens = pa.chunked_array([pa.array([[1, 2], [1], [1, 2], None, []], pa.list_(pa.int64()))])
    assert dedupe_rows(tokens, np.arange(5)).tolist() == [0, 1, 3, 4], "token lists (and a null) too"


@pytest.mark.parametrize(
    ("inputs", "kept"),
    [
        (["a b", "a b c", "a b c d", "x"], [2, 3]),  # prefixes of prefixes; the last unique input stays
        (["e2e4", "e2e4", "e2e4 e7e5"], [2]),  # duplicated prefix: both copies dropped
        (["e2e4 e7e5", "e2e4 e7e5", "e2e4"], [0, 1]),  # duplicated longest: kept, dedupe's job
        (["ab", "a", "abc", "b", "x"], [2, 3, 4]),
        (["", "a"], [1]),  # the empty string is a prefix of everything
        (["é", "éa", "e", "ea"], [1, 3]),  # unicode
        (["a", "b", "c"], [0, 1, 2]),  # nothing to drop, last one kept (the prototype dropped it)
        (["abc"], [0]),
        ([], []),
        (["ab", "a!", "a"], [0, 1]),  # "a!" sorts between "a" and "ab": "a" is still found
    ],
)
def test_drop_prefixes_adversarial(inputs, kept):
    assert drop_prefixes(inputs).tolist() == kept


def test_drop_prefixes_matches_brute_force_after_and_without_dedupe():
    rng = random.Random(0)
    for _ in range(300):
        inputs = ["".join(rng.choice("ab ") for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(0, 12))]
        assert drop_prefixes(inputs).tolist() == _brute_force_prefixes(inputs)
        unique = [inputs[i] for i in _first_occurrences(inputs)]
        assert drop_prefixes(unique).tolist() == _brute_force_prefixes(unique)


def test_drop_prefixes_works_on_token_tuples():
    assert drop_prefixes([(1, 2), (1, 2, 3), (2,)]).tolist() == [1, 2]


def test_length_range_bounds_are_inclusive():
    assert length_range(np.array([1, 5, 10, 20]), 5, 10).tolist() == [1, 2]
    assert length_range(np.array([1, 5]), None, None).tolist() == [0, 1]


def test_shuffle_seed_zero_is_a_seed_and_deterministic():
    assert shuffle_and_limit(10, None, None).tolist() == list(range(10))
    zero = shuffle_and_limit(10, 0, None)
    assert zero.tolist() != list(range(10))
    assert zero.tolist() == shuffle_and_limit(10, 0, None).tolist()
    assert shuffle_and_limit(10, 1, None).tolist() != zero.tolist()
    assert shuffle_and_limit(10, 0, 4).tolist() == zero[:4].tolist()


@pytest.mark.parametrize("seed", range(5))
def test_pack_batches_respects_budget_and_batch_size(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=300)
    order = rng.permutation(300)
    batches = pack_batches(order, lengths, batch_size=16, max_tokens=1000)
    assert np.concatenate(batches).tolist() == order.tolist()
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) == 1 or lengths[batch].max() * len(batch) <= 1000
    # a single sequence longer than the budget gets a batch of its own
    assert [b.tolist() for b in pack_batches(np.arange(3), np.array([5, 50, 5]), 8, 20)] == [[0], [1], [2]]


@pytest.mark.parametrize("seed", [0, 7])
def test_bucketing_covers_each_example_once_deterministically(seed):
    rng = np.random.default_rng(seed)
    # length-skewed, like game transcripts: log-normal token counts with a long tail
    lengths = np.clip(np.exp(rng.normal(4.5, 0.8, 4000)).astype(np.int64), 1, 1024)
    unbucketed = plan_batches(lengths, 16)
    batches = plan_batches(lengths, 16, bucket_size=1024, batch_order_seed=seed)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    again = plan_batches(lengths, 16, bucket_size=1024, batch_order_seed=seed)
    assert [b.tolist() for b in batches] == [b.tolist() for b in again]
    assert padding_efficiency(batches, lengths) >= 0.9 > 0.5 > padding_efficiency(unbucketed, lengths)
    # batch order is shuffled: batches do not come in bucket order
    assert [b.tolist() for b in batches] != [b.tolist() for b in plan_batches(lengths, 16, bucket_size=1024)]


def test_rank_split_of_shards_is_disjoint_and_covers_all():
    tokens = list(np.random.default_rng(0).integers(1, 1000, 37))
    for world_size in (1, 2, 3, 8):
        owned = assign_shards(tokens, world_size)
        flat = [s for rank in owned for s in rank]
        assert sorted(flat) == list(range(37))
        loads = [sum(tokens[s] for s in rank) for rank in owned]
        assert max(loads) - min(loads) <= max(tokens)


def test_find_batch_size_halves_until_it_fits():
    tried = []

    def fits(size):
        tried.append(size)
        return size <= 5

    assert find_batch_size(fits, 32) == 4
    assert tried == [32, 16, 8, 4]
    with pytest.raises(RuntimeError, match="not even a single sequence"):
        find_batch_size(lambda size: False, 4)


def _arrow(values):
    return pa.chunked_array([pa.array(values[:3], pa.string()), pa.array(values[3:], pa.string())])


@pytest.mark.parametrize("chunk_rows", [2, 65536])
def test_arrow_side_selection_matches_the_in_memory_functions(monkeypatch, chunk_rows):
    """dedupe_rows / drop_prefix_rows (memory-mapped columns, bounded chunks) agree with the reference."""
    import actlightning.data.tokens as tokens

    monkeypatch.setattr(tokens, "_CHUNK_ROWS", chunk_rows)
    rng = random.Random(1)
    for _ in range(200):
        inputs = ["".join(rng.choice("abé ") for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(3, 14))]
        column = _arrow(inputs)
        everything = np.arange(len(inputs))
        assert tokens.dedupe_rows(column, everything).tolist() == _first_occurrences(inputs)
        assert tokens.drop_prefix_rows(column, everything).tolist() == _brute_force_prefixes(inputs)
        subset = np.asarray(sorted(rng.sample(range(len(inputs)), rng.randint(1, len(inputs)))))
        kept = tokens.drop_prefix_rows(column, subset).tolist()
        assert kept == [int(subset[i]) for i in _brute_force_prefixes([inputs[j] for j in subset])]


def test_batch_packer_closes_the_same_batches_one_position_at_a_time():
    from actlightning.data.batching import BatchPacker

    rng = np.random.default_rng(3)
    for _ in range(50):
        lengths = rng.integers(1, 60, size=int(rng.integers(1, 80)))
        order = rng.permutation(len(lengths))
        budget = int(rng.integers(60, 300))
        packer, streamed = BatchPacker(7, budget), []
        for position in order:
            closed = packer.add(int(position), int(lengths[position]))
            if closed is not None:
                streamed.append(closed.tolist())
        streamed.append(packer.flush().tolist())
        assert streamed == [b.tolist() for b in pack_batches(order, lengths, 7, budget)]


def test_plan_batches_are_views_into_one_positions_array():
    """A plan holds one positions array and a start/stop per batch, whatever the bucketing or order."""
    lengths = np.random.default_rng(0).integers(1, 50, size=100)
    batches = plan_batches(lengths, 8, bucket_size=16, batch_order_seed=3)
    assert sorted(np.concatenate(list(batches)).tolist()) == list(range(100))
    assert all(np.shares_memory(b, batches.positions) for b in batches if len(b))
    shard = batches[2:5]
    assert [b.tolist() for b in shard] == [batches[i].tolist() for i in range(2, 5)]
    assert len(plan_batches(np.zeros(0, dtype=np.int32), 8, bucket_size=16)) == 0
