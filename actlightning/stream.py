"""Streaming exports (``data.streaming: true``): rows flow from ``load_dataset(..., streaming=True)``
into windows, batches and shards, without downloading or caching the corpus.

The plan is decided by the stream alone: selected examples (those that pass ``filter``, are not empty,
and lie in the token range, up to ``limit``) are cut into windows of ``bucket_size``, each window is
sorted by length and packed into batches exactly as the in-memory path packs a bucket, and
consecutive batches make shards of ``batches_per_shard``. So a streaming export and an in-memory
export with the same ``bucket_size`` hold the same examples in the same shards. Ranks take the shards
that are still missing round-robin (every rank reads the whole stream, and runs the model only on its
own shards), so a resume, on any device count, redoes exactly the missing shards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset

from actlightning.batching import Batch, BatchPacker, PaddingSide, PlannedBatch, TokenStore, collate, length_order
from actlightning.errors import ConfigError

# Rows tokenized together while streaming (the fast tokenizer batches in Rust).
_TOKENIZE_ROWS = 1024


def check_streaming_settings(
    *,
    sort_by_length: bool,
    bucket_size: int | None,
    dedupe: bool,
    drop_prefixes: bool,
    shuffle_seed: int | None,
    batch_order_seed: int | None,
    auto_find_batch_size: bool,
    num_workers: int,
) -> None:
    """Refuse the settings that need the whole dataset up front, naming each and what to do instead."""
    refused = {
        "data.sort_by_length": (sort_by_length and bucket_size is None, "set data.bucket_size to sort within windows"),
        "data.dedupe": (dedupe, "a whole-set dedupe needs every input first"),
        "data.drop_prefixes": (drop_prefixes, "finding prefixes needs every input first"),
        "data.shuffle_seed": (
            shuffle_seed is not None,
            "an exact sample needs the whole set; data.limit takes the first rows",
        ),
        "data.batch_order_seed": (batch_order_seed is not None, "shuffling whole batches needs all of them first"),
        "data.auto_find_batch_size": (
            auto_find_batch_size,
            "the longest batch is unknown; set data.batch_size or data.max_tokens",
        ),
        "data.num_workers": (num_workers > 0, "the stream is read once per rank; use 0"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ConfigError(f"{name} does not work with data.streaming: {why}")


# (example_id, tokens, label row) of one selected example.
Example = tuple[int, np.ndarray, dict]


@dataclass
class StreamBatch:
    """One planned batch: its own store (positions ``0..n-1``) and its label rows, in batch order."""

    store: TokenStore
    labels: pa.Table | None
    planned: PlannedBatch


@dataclass
class StreamCounts:
    """What the stream removed and what it planned, for the log and the manifest."""

    loaded: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    selected: int = 0
    tokens: int = 0
    truncated: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0

    def drop(self, step: str) -> None:
        self.removed[step] = self.removed.get(step, 0) + 1


def selected_examples(
    rows: Iterable[dict],
    input_column: str,
    label_columns: list[str],
    tokenize: Callable[[list], list[list[int]]] | None,
    keep: Callable[[dict], bool] | None,
    min_tokens: int | None,
    max_tokens_per_sequence: int | None,
    limit: int | None,
    max_length: int | None,
    counts: StreamCounts,
) -> Iterator[Example]:
    """``(example_id, tokens, labels)`` of each selected row, in stream order, at most ``limit``.

    ``example_id`` is the row's index in the stream, as in the in-memory path (the index in the
    loaded split). ``tokenize`` is None for a pre-tokenized input column. The stream is read no
    further than the last selected row needs.
    """

    def chunks() -> Iterator[list[tuple[int, Any, dict]]]:
        pending: list[tuple[int, Any, dict]] = []
        for index, row in enumerate(rows):
            counts.loaded = index + 1
            if keep is not None and not keep(row):
                counts.drop("filter")
                continue
            value = row[input_column]
            if value is None and tokenize is not None:
                value = ""
            pending.append((index, value, {c: row[c] for c in label_columns}))
            if len(pending) >= _TOKENIZE_ROWS:
                yield pending
                pending = []
        if pending:
            yield pending

    def selected() -> Iterator[Example]:
        for chunk in chunks():
            inputs = [value for _, value, _ in chunk]
            sequences = tokenize(inputs) if tokenize is not None else inputs
            for (index, _, labels), ids in zip(chunk, sequences, strict=True):
                tokens = np.asarray(ids if ids is not None else [], dtype=np.int64)
                if len(tokens) == 0:
                    counts.drop("empty")
                elif (min_tokens is not None and len(tokens) < min_tokens) or (
                    max_tokens_per_sequence is not None and len(tokens) > max_tokens_per_sequence
                ):
                    counts.drop("token_range")
                else:
                    if max_length is not None and len(tokens) > max_length:
                        counts.truncated += 1
                        tokens = tokens[:max_length]
                    yield index, tokens, labels

    return itertools.islice(selected(), limit)


def stream_shards(
    examples: Iterable[Example],
    batch_size: int,
    max_tokens: int | None,
    bucket_size: int | None,
    descending: bool,
    batches_per_shard: int,
    max_shards: int | None,
    label_schema: pa.Schema | None,
    counts: StreamCounts,
) -> Iterator[tuple[int, list[StreamBatch]]]:
    """``(shard_index, batches)`` of the whole stream, in order: windows of ``bucket_size`` selected
    examples sorted by length (no sorting without ``bucket_size``), packed greedily as ``plan_batches``
    packs (each bucket on its own), grouped by shard."""

    def ordered() -> Iterator[tuple[Example | None, bool]]:
        """Each example in packing order, then ``(None, True)`` where a bucket ends."""
        window: list[Example] = []
        for example in examples:
            counts.selected += 1
            counts.tokens += len(example[1])
            if bucket_size is None:
                yield example, False
                continue
            window.append(example)
            if len(window) == bucket_size:
                yield from _bucket(window)
                window = []
        if window:
            yield from _bucket(window)

    def _bucket(window: list[Example]) -> Iterator[tuple[Example | None, bool]]:
        order = length_order(np.array([len(tokens) for _, tokens, _ in window], dtype=np.int64), descending)
        yield from ((window[i], False) for i in order)
        yield None, True

    def batches() -> Iterator[StreamBatch]:
        packer = BatchPacker(batch_size, max_tokens)
        pending: list[Example] = []
        for example, bucket_end in ordered():
            closed = packer.flush() if bucket_end else packer.add(len(pending), len(example[1]))  # type: ignore[index]
            if closed is not None:
                yield _batch(pending[: len(closed)], label_schema)
                del pending[: len(closed)]
            if example is not None:
                pending.append(example)
        if pending:
            yield _batch(pending, label_schema)

    shard: list[StreamBatch] = []
    shard_index = 0
    for batch in batches():
        lengths = batch.store.lengths
        counts.real_tokens += int(lengths.sum())
        counts.padded_tokens += int(lengths.max()) * len(lengths)
        shard.append(batch)
        if len(shard) == batches_per_shard:
            yield shard_index, _placed(shard, shard_index)
            shard, shard_index = [], shard_index + 1
            if max_shards is not None and shard_index >= max_shards:
                return
    if shard and (max_shards is None or shard_index < max_shards):
        yield shard_index, _placed(shard, shard_index)


def _batch(items: list[Example], label_schema: pa.Schema | None) -> StreamBatch:
    """One batch with a store of its own: its examples' tokens, ids and label rows, in batch order."""
    store = TokenStore.from_sequences([tokens for _, tokens, _ in items], [i for i, _, _ in items])
    labels = pa.Table.from_pylist([row for _, _, row in items], schema=label_schema) if label_schema else None
    return StreamBatch(store, labels, PlannedBatch(np.arange(len(items)), -1, False))


def _placed(shard: list[StreamBatch], shard_index: int) -> list[StreamBatch]:
    """The shard's batches with their place in it."""
    for i, batch in enumerate(shard):
        batch.planned = PlannedBatch(batch.planned.positions, shard_index, i == len(shard) - 1)
    return shard


class StreamingBatches(IterableDataset):
    """This rank's collated batches: the still-missing shards of the stream, taken round-robin."""

    def __init__(
        self,
        shards: Callable[[], Iterator[tuple[int, list[StreamBatch]]]],
        done: set[int],
        rank: int,
        world_size: int,
        pad_id: int,
        padding_side: PaddingSide,
    ) -> None:
        self.shards, self.done, self.rank, self.world_size = shards, set(done), rank, world_size
        self.pad_id, self.padding_side = pad_id, padding_side

    def __iter__(self) -> Iterator[Batch]:
        missing = 0
        for shard_index, batches in self.shards():
            if shard_index in self.done:
                continue
            mine = missing % self.world_size == self.rank
            missing += 1
            if not mine:
                continue
            for batch in batches:
                yield collate(batch.store, batch.planned, self.pad_id, self.padding_side, labels=batch.labels)
