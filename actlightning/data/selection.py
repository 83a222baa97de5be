"""The selection steps, written once for both pipelines.

In order: ``filter``, ``dedupe``, ``drop_prefixes`` (on the input), tokenization, empty inputs and
``min_tokens`` / ``max_tokens_per_sequence``, ``shuffle_seed`` and ``limit``, truncation to
``max_length``. The in-memory path runs each step once over the whole split; the stream runs them over
each chunk of rows as it arrives (the steps that need the whole set, ``dedupe``, ``drop_prefixes`` and
``shuffle_seed``, are refused there). Each step returns what it keeps and counts what it removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import Dataset

from actlightning.contracts import DataCounts
from actlightning.data.batching import index_dtype
from actlightning.data.filters import length_range, shuffle_and_limit
from actlightning.data.source import Source
from actlightning.data.tokens import TokenTable, dedupe_rows, drop_prefix_rows
from actlightning.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectionSettings:
    """The data module's selection settings (see ``ActivationDataModule``)."""

    filter: Callable[[dict], bool] | None = None
    dedupe: bool = False
    drop_prefixes: bool = False
    min_tokens: int | None = None
    max_tokens_per_sequence: int | None = None
    shuffle_seed: int | None = None
    limit: int | None = None
    max_length: int | None = None


class Selection:
    """The steps over ``counts`` (which they update). ``whole_set``: the rows given are all there is
    (in memory), so rows cut by ``limit`` are counted; a stream simply stops reading at the limit."""

    def __init__(self, settings: SelectionSettings, counts: DataCounts, whole_set: bool) -> None:
        self.settings, self.counts, self.whole_set = settings, counts, whole_set

    def _removed(self, step: str, count: int) -> None:
        self.counts.removed[step] = self.counts.removed.get(step, 0) + int(count)

    def by_filter(self, rows: Iterable[dict], ids: np.ndarray) -> np.ndarray:
        """``ids`` of the ``rows`` (one each, in order) that ``filter`` keeps."""
        if self.settings.filter is None:
            return ids
        keep = np.fromiter((bool(self.settings.filter(row)) for row in rows), dtype=bool, count=len(ids))
        self._removed("filter", len(ids) - int(keep.sum()))
        return ids[keep]

    def by_input(self, column: pa.ChunkedArray, ids: np.ndarray) -> np.ndarray:
        """``ids`` (rows of ``column``) left by ``dedupe`` then ``drop_prefixes`` (whole set only)."""
        for step, enabled, select in [
            ("dedupe", self.settings.dedupe, dedupe_rows),
            ("drop_prefixes", self.settings.drop_prefixes, drop_prefix_rows),
        ]:
            if enabled:
                kept = select(column, ids)
                self._removed(step, len(ids) - len(kept))
                ids = kept
        return ids

    def by_length(self, lengths: np.ndarray) -> np.ndarray | None:
        """Positions of ``lengths`` that are not empty and lie in the token range; None: all of them
        (no position array is built when nothing is removed: 8 bytes a row at the peak)."""
        empty = lengths == 0
        self._removed("empty", int(empty.sum()))
        positions = np.flatnonzero(~empty) if empty.any() else None
        del empty
        low, high = self.settings.min_tokens, self.settings.max_tokens_per_sequence
        if low is None and high is None:
            return positions
        kept = length_range(lengths if positions is None else lengths[positions], low, high)
        before = len(lengths) if positions is None else len(positions)
        self._removed("token_range", before - len(kept))
        if len(kept) == before:
            return positions
        return kept if positions is None else positions[kept]

    def by_limit(self, count: int) -> np.ndarray | None:
        """Positions ``0..count-1`` permuted by ``shuffle_seed`` and cut to what ``limit`` still
        allows (minus what was selected before); None: all of them, in order."""
        seed, limit = self.settings.shuffle_seed, self.settings.limit
        if seed is None and limit is None:
            return None
        room = None if limit is None else max(limit - self.counts.selected, 0)
        kept = shuffle_and_limit(count, seed, room)
        if self.whole_set:
            self._removed("limit", count - len(kept))
        return kept

    def accept(self, lengths: np.ndarray) -> None:
        """Count the selected rows and truncate their ``lengths`` to ``max_length``, in place."""
        max_length = self.settings.max_length
        if max_length is not None:
            self.counts.truncated += int((lengths > max_length).sum())
            np.minimum(lengths, max_length, out=lengths)
        self.counts.selected += len(lengths)
        self.counts.tokens += int(lengths.sum())


def select_split(
    dataset: Dataset,
    source: Source,
    selection: Selection,
    tokens_of: Callable[[Dataset], tuple[pa.ChunkedArray, np.ndarray]],
) -> tuple[TokenTable, pa.Table | None]:
    """The steps over a whole loaded split: the selected examples (tokens stay memory-mapped) and the
    split's label columns (None without any). ``tokens_of`` gives every row's tokens and counts."""
    counts = selection.counts
    counts.loaded = len(dataset)
    if len(dataset) == 0:
        raise ConfigError(f"data.split {source.split!r} of {source.path!r} is empty: there is nothing to export")
    ids = np.arange(len(dataset), dtype=index_dtype(len(dataset)))  # example ids: rows of the loaded split
    ids = selection.by_filter(dataset, ids)
    ids = selection.by_input(dataset.data.column(source.input_column), ids)
    tokens, lengths = tokens_of(dataset)
    store = TokenTable(tokens, ids, lengths[ids])
    for kept in (selection.by_length(store.lengths), selection.by_limit(len(store))):
        store = store.select(kept) if kept is not None else store
    # In place: the store owns its lengths (a selection made them), and a copy would double them.
    selection.accept(store.lengths)
    if len(store) == 0:
        raise ConfigError(
            f"no examples left to export: {len(dataset)} rows loaded, removed by each step: {counts.removed}; "
            "loosen the data filters"
        )
    log.info(
        "dataset %s: %d rows loaded, %d selected (%d tokens); removed by each step: %s; %d truncated to %s tokens",
        source.path, counts.loaded, counts.selected, counts.tokens, counts.removed, counts.truncated,
        selection.settings.max_length,
    )  # fmt: skip
    labels = dataset.data.table.select(source.label_columns) if source.label_columns else None
    return store, labels
