"""Token stores and collation: planned positions in, padded model batches out (and the batch-size search)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from actlightning.contracts import Batch, PaddingSide, PlannedBatch

if TYPE_CHECKING:
    from actlightning.data.tokens import TokenTable


@dataclass
class TokenStore:
    """Tokenized sequences packed into one array: sequence ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray
    offsets: np.ndarray
    example_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_sequences(
        cls, sequences: Sequence[Sequence[int]] | Sequence[np.ndarray], example_ids: Sequence[int] | None = None
    ) -> TokenStore:
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=int(offsets[-1]))
        ids = np.arange(len(sequences)) if example_ids is None else np.asarray(example_ids, dtype=np.int64)
        return cls(values, offsets, ids)

    def sequence(self, position: int) -> np.ndarray:
        return self.values[self.offsets[position] : self.offsets[position + 1]]

    def sequences(self, positions: np.ndarray) -> list[np.ndarray]:
        return [self.sequence(int(p)) for p in positions]


def collate(
    store: TokenStore | TokenTable,
    planned: PlannedBatch,
    pad_id: int = 0,
    padding_side: PaddingSide = "right",
    labels: pa.Table | None = None,
) -> Batch:
    """Pad one batch; returns the model inputs plus what the writer needs to place each row.

    Position ids count real tokens from 0 whatever the padding side, so a padded row sees the same
    positions as the sequence alone (GPT-2 with left padding and default positions is off by ~3).
    """
    positions = planned.positions
    lengths = store.lengths[positions]
    seq_len = int(lengths.max()) if len(lengths) else 0
    input_ids = np.full((len(positions), seq_len), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(positions), seq_len), dtype=np.int64)
    position_ids = np.zeros((len(positions), seq_len), dtype=np.int64)
    first_token = np.zeros(len(positions), dtype=np.int64) if padding_side == "right" else seq_len - lengths
    for row, (tokens, start) in enumerate(zip(store.sequences(positions), first_token, strict=True)):
        input_ids[row, start : start + len(tokens)] = tokens
        attention_mask[row, start : start + len(tokens)] = 1
        position_ids[row, start : start + len(tokens)] = np.arange(len(tokens))
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        position_ids=torch.from_numpy(position_ids),
        lengths=torch.from_numpy(lengths.astype(np.int64)),
        first_token=torch.from_numpy(np.asarray(first_token, dtype=np.int64)),
        example_id=torch.from_numpy(store.example_ids[positions]),
        host_example_id=store.example_ids[positions],
        host_tokens=int(lengths.sum()),
        shard_index=planned.shard_index,
        last_in_shard=planned.last_in_shard,
        labels=labels,
    )


def search_batch_size(
    store: TokenStore | TokenTable,
    batch_size: int,
    max_tokens: int | None,
    probe: Callable[[Batch], bool],
    pad_id: int = 0,
    padding_side: PaddingSide = "right",
) -> int:
    """The largest ``batch_size`` (or, with a budget, ``max_tokens``) whose batch of the longest
    sequences fits: ``probe`` runs the model on a batch and returns False when it ran out of memory."""
    lengths = store.lengths
    longest = np.argsort(-lengths, kind="stable")

    def fits(size: int) -> bool:
        rows = max(1, min(batch_size, size // int(lengths[longest[0]]))) if max_tokens is not None else size
        return probe(collate(store, PlannedBatch(longest[:rows], 0, True), pad_id, padding_side))

    return find_batch_size(fits, max_tokens if max_tokens is not None else batch_size)


def find_batch_size(fits: Callable[[int], bool], start: int) -> int:
    """The largest of ``start, start // 2, start // 4, ..., 1`` for which ``fits`` is true.

    ``fits`` runs a probe and returns False when it ran out of memory.
    """
    size = start
    while size >= 1:
        if fits(size):
            return size
        size //= 2
    raise RuntimeError("not even a single sequence fits in device memory; lower data.max_length or use a smaller dtype")


class PlannedBatches(torch.utils.data.Dataset):
    """The batches one rank runs, in order, for a DataLoader (which collates them)."""

    def __init__(self, planned: list[PlannedBatch]) -> None:
        self.planned = planned

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, index: int) -> PlannedBatch:
        return self.planned[index]


def collate_rows(
    store: TokenStore | TokenTable,
    labels: pa.Table | None,
    planned: PlannedBatch,
    pad_id: int = 0,
    padding_side: PaddingSide = "right",
) -> Batch:
    """``collate``, with the batch's rows of ``labels`` (a table of every loaded row) taken by example id."""
    rows = None
    if labels is not None:
        rows = labels.take(pa.array(store.example_ids[planned.positions], type=pa.int64()))
    return collate(store, planned, pad_id, padding_side, rows)
