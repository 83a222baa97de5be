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


@dataclass
class Window:
    """Selected examples of one window: token ids, example ids and label rows, in stream order."""

    tokens: list[np.ndarray] = field(default_factory=list)
    example_ids: list[int] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.example_ids)


@dataclass
class StreamBatch:
    """One planned batch with the window it reads from."""

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
) -> Iterator[tuple[int, np.ndarray, dict]]:
    """``(example_id, tokens, labels)`` of each selected row, in stream order.

    ``example_id`` is the row's index in the stream, as in the in-memory path (the index in the
    loaded split). ``tokenize`` is None for a pre-tokenized input column.
    """
    pending: list[tuple[int, Any, dict]] = []

    def flush() -> Iterator[tuple[int, np.ndarray, dict]]:
        inputs = [value for _, value, _ in pending]
        sequences = tokenize(inputs) if tokenize is not None else inputs
        for (index, _, labels), ids in zip(pending, sequences, strict=True):
            tokens = np.asarray(ids if ids is not None else [], dtype=np.int64)
            if len(tokens) == 0:
                counts.drop("empty")
                continue
            if (min_tokens is not None and len(tokens) < min_tokens) or (
                max_tokens_per_sequence is not None and len(tokens) > max_tokens_per_sequence
            ):
                counts.drop("token_range")
                continue
            if max_length is not None and len(tokens) > max_length:
                counts.truncated += 1
                tokens = tokens[:max_length]
            yield index, tokens, labels
        pending.clear()

    selected = 0
    for index, row in enumerate(rows):
        counts.loaded = index + 1
        if keep is not None and not keep(row):
            counts.drop("filter")
            continue
        value = row[input_column]
        pending.append(
            (index, "" if value is None and tokenize is not None else value, {c: row[c] for c in label_columns})
        )
        if len(pending) >= _TOKENIZE_ROWS:
            for example in flush():
                if limit is not None and selected >= limit:
                    return
                selected += 1
                yield example
    for example in flush():
        if limit is not None and selected >= limit:
            return
        selected += 1
        yield example


def stream_shards(
    examples: Iterable[tuple[int, np.ndarray, dict]],
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
    examples sorted by length (none without ``bucket_size``), packed greedily, grouped by shard."""
    shard: list[tuple[TokenStore, pa.Table | None, np.ndarray]] = []
    shard_index = 0

    def windows() -> Iterator[Window]:
        window = Window()
        for example_id, tokens, labels in examples:
            window.tokens.append(tokens)
            window.example_ids.append(example_id)
            window.labels.append(labels)
            # Without bucket_size there is no sorting: any window size packs the same batches.
            if len(window) >= (bucket_size or batch_size):
                yield window
                window = Window()
        if len(window):
            yield window

    def batches() -> Iterator[tuple[TokenStore, pa.Table | None, np.ndarray]]:
        packer = BatchPacker(batch_size, max_tokens)
        pending: list[tuple[TokenStore, pa.Table | None, int]] = []
        for window in windows():
            store = TokenStore.from_sequences(window.tokens, window.example_ids)  # type: ignore[arg-type]
            labels = pa.Table.from_pylist(window.labels, schema=label_schema) if label_schema is not None else None
            counts.selected += len(store)
            counts.tokens += int(store.lengths.sum())
            order = length_order(store.lengths, descending) if bucket_size is not None else np.arange(len(store))
            if bucket_size is not None:
                # A bucket is packed on its own, as plan_batches packs each bucket.
                packer = BatchPacker(batch_size, max_tokens)
            for position in order:
                closed = packer.add(int(position), int(store.lengths[position]))
                if closed is not None:
                    yield from _emit(pending, closed)
                pending.append((store, labels, int(position)))
            if bucket_size is not None:
                last = packer.flush()
                if last is not None:
                    yield from _emit(pending, last)
        last = packer.flush()
        if last is not None:
            yield from _emit(pending, last)

    for store, labels, positions in batches():
        lengths = store.lengths[positions]
        counts.real_tokens += int(lengths.sum())
        counts.padded_tokens += int(lengths.max()) * len(lengths)
        shard.append((store, labels, positions))
        if len(shard) == batches_per_shard:
            yield shard_index, _planned(shard, shard_index)
            shard, shard_index = [], shard_index + 1
            if max_shards is not None and shard_index >= max_shards:
                return
    if shard and (max_shards is None or shard_index < max_shards):
        yield shard_index, _planned(shard, shard_index)


def _emit(pending: list, batch: np.ndarray) -> Iterator[tuple[TokenStore, pa.Table | None, np.ndarray]]:
    """The closed batch ``batch`` (indexes into ``pending``, which it consumes) as one window's positions."""
    items = pending[: len(batch)]
    del pending[: len(batch)]
    store, labels = items[0][0], items[0][1]
    # A batch never spans two windows with bucket_size; without it, windows are cut at batch_size, and a
    # budget-closed batch may span two: such a batch gets a store of its own.
    if all(item[0] is store for item in items):
        yield store, labels, np.asarray([item[2] for item in items], dtype=np.int64)
        return
    merged = TokenStore.from_sequences(
        [item[0].sequence(int(item[2])) for item in items], [int(item[0].example_ids[item[2]]) for item in items]
    )
    tables = [item[1].slice(int(item[2]), 1) for item in items] if labels is not None else None
    yield merged, pa.concat_tables(tables) if tables else None, np.arange(len(items))


def _planned(shard: list, shard_index: int) -> list[StreamBatch]:
    return [
        StreamBatch(store, labels, PlannedBatch(positions, shard_index, i == len(shard) - 1))
        for i, (store, labels, positions) in enumerate(shard)
    ]


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
                labels = None
                if batch.labels is not None:
                    labels = batch.labels.take(pa.array(batch.planned.positions, type=pa.int64()))
                yield collate(batch.store, batch.planned, self.pad_id, self.padding_side, labels=labels)
