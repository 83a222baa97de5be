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
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import Features
from torch.utils.data import IterableDataset

from actlightning.contracts import Batch, DataCounts, ExportPlan, PaddingSide, PlannedBatch
from actlightning.data.batching import BatchPacker, length_order
from actlightning.data.collate import TokenStore, collate
from actlightning.data.selection import Selection, SelectionSettings
from actlightning.data.source import Source, open_stream

# Rows tokenized together while streaming (the fast tokenizer batches in Rust).
_TOKENIZE_ROWS = 1024


# (example_id, tokens, label row) of one selected example.
Example = tuple[int, np.ndarray, dict]


@dataclass
class StreamBatch:
    """One planned batch: its own store (positions ``0..n-1``) and its label rows, in batch order."""

    store: TokenStore
    labels: pa.Table | None
    planned: PlannedBatch


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def selected_examples(
    rows: Iterable[dict],
    input_column: str,
    label_columns: list[str],
    tokenize: Callable[[list], list[list[int]]] | None,
    selection: Selection,
) -> Iterator[Example]:
    """``(example_id, tokens, labels)`` of each selected row, in stream order, up to the limit.

    The selection steps run a chunk of rows at a time (the tokenizer batches a chunk too).
    ``example_id`` is the row's index in the stream, as in the in-memory path (the index in the
    loaded split). ``tokenize`` is None for a pre-tokenized input column. The stream is read no
    further than the chunk of the last selected row.
    """
    counts, limit = selection.counts, selection.settings.limit
    start = 0
    for chunk in _chunks(rows, _TOKENIZE_ROWS):
        counts.loaded = start + len(chunk)
        ids = selection.by_filter(chunk, np.arange(start, start + len(chunk)))
        inputs = [chunk[i - start][input_column] for i in ids]
        if tokenize is not None:
            inputs = tokenize(["" if value is None else value for value in inputs])
        sequences = [np.asarray(value if value is not None else [], dtype=np.int64) for value in inputs]
        kept = selection.by_length(np.array([len(t) for t in sequences], dtype=np.int64))
        positions = np.arange(len(sequences)) if kept is None else kept
        limited = selection.by_limit(len(positions))
        positions = positions if limited is None else positions[limited]
        lengths = np.array([len(sequences[p]) for p in positions], dtype=np.int64)
        selection.accept(lengths)
        for position, length in zip(positions, lengths, strict=True):
            row = chunk[int(ids[position]) - start]
            yield int(ids[position]), sequences[position][:length], {c: row[c] for c in label_columns}
        start += len(chunk)
        if limit is not None and counts.selected >= limit:
            return


def stream_shards(
    examples: Iterable[Example],
    batch_size: int,
    max_tokens: int | None,
    bucket_size: int | None,
    descending: bool,
    batches_per_shard: int,
    max_shards: int | None,
    label_schema: pa.Schema | None,
    counts: DataCounts,
) -> Iterator[tuple[int, list[StreamBatch]]]:
    """``(shard_index, batches)`` of the whole stream, in order: windows of ``bucket_size`` selected
    examples sorted by length (no sorting without ``bucket_size``), packed greedily as ``plan_batches``
    packs (each bucket on its own), grouped by shard."""

    def ordered() -> Iterator[tuple[Example | None, bool]]:
        """Each example in packing order, then ``(None, True)`` where a bucket ends."""
        window: list[Example] = []
        for example in examples:
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


@dataclass(frozen=True)
class StreamBatching:
    """How a stream's examples become batches and shards (the data module's and writer's settings)."""

    batch_size: int
    max_tokens: int | None
    bucket_size: int | None
    descending: bool
    batches_per_shard: int
    max_shards: int | None


class StreamSource:
    """A streaming export's rows: opened and checked when the export is planned (the plan gets the label
    features), then read from the start by each rank's ``shards``; counts go to ``plan.data``."""

    def __init__(self, source: Source, settings: SelectionSettings, plan: ExportPlan, tokenizer_of: Callable) -> None:
        self.source, self.settings, self.plan = source, settings, plan
        self.stream = open_stream(source)
        features = self.stream.features
        pretokenized = source.check_columns(features.arrow_schema)
        plan.label_features = {c: features[c] for c in source.label_columns}
        self.tokenizer = None if pretokenized else tokenizer_of()

    def shards(self, batching: StreamBatching) -> Iterator[tuple[int, list[StreamBatch]]]:
        """Every shard of the stream, in order, read afresh."""
        self.plan.data = DataCounts()
        tokenizer = self.tokenizer
        tokenize = (
            None if tokenizer is None else (lambda inputs: tokenizer(inputs, add_special_tokens=True)["input_ids"])
        )
        labels = self.source.label_columns
        selection = Selection(self.settings, self.plan.data, whole_set=False)
        examples = selected_examples(iter(self.stream), self.source.input_column, labels, tokenize, selection)
        label_schema = Features(self.plan.label_features).arrow_schema if labels else None
        b = batching
        return stream_shards(
            examples, b.batch_size, b.max_tokens, b.bucket_size, b.descending, b.batches_per_shard, b.max_shards,
            label_schema, self.plan.data,
        )  # fmt: skip
