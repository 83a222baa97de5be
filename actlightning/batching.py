"""Pure functions that turn tokenized sequences into padded batches and batches into shards.

A *plan* is the list of shards of a whole export, each a list of batches, each an array of positions
into the tokenized store. It depends only on the data and the settings, never on the device count:
ranks take whole shards, so every example is exported exactly once whatever the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from itertools import chain
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import torch

from actlightning.errors import ConfigError

if TYPE_CHECKING:
    from actlightning.tokens import TokenTable

PaddingSide = Literal["right", "left"]


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


def index_dtype(count: int) -> type[np.integer]:
    """int32 for positions or row indices below 2^31 (half the memory of int64), else int64."""
    return np.int32 if count < 2**31 else np.int64


class BatchViews(Sequence[np.ndarray]):
    """Batches as slices of one positions array, each made into a view only when accessed.

    A plan of millions of rows keeps 4 bytes a row (its positions) and 16 a batch (where each batch
    starts and stops), instead of a numpy view object (~120 bytes) per batch. Slicing gives another
    ``BatchViews`` over the same positions (a shard); ``take`` reorders whole batches.
    """

    def __init__(self, positions: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
        self.positions, self.starts, self.stops = positions, starts, stops

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return BatchViews(self.positions, self.starts[index], self.stops[index])
        return self.positions[self.starts[index] : self.stops[index]]

    def take(self, order: np.ndarray) -> BatchViews:
        return BatchViews(self.positions, self.starts[order], self.stops[order])

    @classmethod
    def from_cuts(cls, positions: np.ndarray, cuts: Sequence[int] | np.ndarray) -> BatchViews:
        """Consecutive batches of ``positions``, cut before each index in ``cuts``."""
        if not len(positions):
            return cls(positions, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        bounds = np.concatenate([[0], np.asarray(cuts, dtype=np.int64), [len(positions)]])
        return cls(positions, bounds[:-1], bounds[1:])

    @classmethod
    def concatenate(cls, parts: Sequence[BatchViews]) -> BatchViews:
        """One ``BatchViews`` of all batches of ``parts``, in order (their positions copied into one array)."""
        if len(parts) <= 1:  # no parts: an empty selection cut into buckets
            return parts[0] if parts else cls.from_cuts(np.zeros(0, dtype=np.int64), [])
        offsets = np.cumsum([0, *(len(p.positions) for p in parts)])
        return cls(
            np.concatenate([p.positions for p in parts]),
            np.concatenate([p.starts + o for p, o in zip(parts, offsets, strict=False)]),
            np.concatenate([p.stops + o for p, o in zip(parts, offsets, strict=False)]),
        )


def length_order(lengths: np.ndarray, descending: bool = False) -> np.ndarray:
    """Stable order of positions by token count (ties keep their input order)."""
    keys = -lengths if descending else lengths
    return np.argsort(keys, kind="stable")


def chunk_batches(num_examples: int, batch_size: int) -> list[np.ndarray]:
    """Consecutive positions in batches of ``batch_size``; the last one may be shorter."""
    if batch_size <= 0:
        raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size}")
    return [np.arange(s, min(s + batch_size, num_examples)) for s in range(0, num_examples, batch_size)]


class BatchPacker:
    """Greedy packing of positions, one at a time, into batches of at most ``batch_size`` sequences
    and (with ``max_tokens``) at most ``max_tokens`` padded tokens; a single sequence longer than the
    budget gets a batch of its own. Fed the same positions, in memory or from a stream, it closes
    the same batches."""

    def __init__(self, batch_size: int, max_tokens: int | None = None) -> None:
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self._positions: list[int] = []
        self._longest = 0

    def add(self, position: int, length: int) -> np.ndarray | None:
        """Add one position; returns the batch it closed, if any (the position starts the next)."""
        closed = None
        count = len(self._positions)
        if count and (
            count >= self.batch_size
            or (self.max_tokens is not None and max(self._longest, length) * (count + 1) > self.max_tokens)
        ):
            closed = self.flush()
        self._positions.append(position)
        self._longest = max(self._longest, length)
        return closed

    def flush(self) -> np.ndarray | None:
        """The open batch, if any, closed."""
        if not self._positions:
            return None
        batch = np.asarray(self._positions, dtype=np.int64)
        self._positions, self._longest = [], 0
        return batch


def pack_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int | None = None) -> BatchViews:
    """Consecutive runs of ``order`` as batches (``BatchPacker``). Greedy, so packing the remainder of a
    list from a batch boundary gives the same batches again."""
    if batch_size <= 0:
        raise ConfigError(f"data.batch_size must be a positive integer, got {batch_size}")
    if max_tokens is None:
        cuts: Sequence[int] | np.ndarray = np.arange(batch_size, len(order), batch_size)
    else:
        packer, cuts, seen = BatchPacker(batch_size, max_tokens), [], 0
        for position in order:
            closed = packer.add(int(position), int(lengths[position]))
            if closed is not None:
                seen += len(closed)
                cuts.append(seen)
    return BatchViews.from_cuts(np.asarray(order), cuts)


def plan_batches(
    lengths: np.ndarray,
    batch_size: int,
    max_tokens: int | None = None,
    sort_by_length: bool = False,
    descending: bool = False,
    bucket_size: int | None = None,
    batch_order_seed: int | None = None,
) -> BatchViews:
    """All batches of an export, as positions ``0..len(lengths)-1`` in the order they run.

    ``bucket_size`` sorts each run of that many consecutive examples by length and packs it on its
    own, which keeps padding small while leaving the (e.g. shuffled) order between buckets; without
    it, ``sort_by_length`` orders everything by token count. ``batch_order_seed`` then permutes whole
    batches, so shards are not ordered by length.
    """
    # 4 bytes a selected row for the whole plan.
    positions = np.arange(len(lengths), dtype=index_dtype(len(lengths)))
    if bucket_size is not None:
        groups = []
        for start in range(0, len(positions), bucket_size):
            bucket = positions[start : start + bucket_size]
            groups.append(bucket[length_order(lengths[bucket], descending)])
    elif sort_by_length:
        groups = [positions[length_order(lengths, descending)]]
    else:
        groups = [positions]
    batches = BatchViews.concatenate([pack_batches(group, lengths, batch_size, max_tokens) for group in groups])
    if batch_order_seed is not None:
        batches = batches.take(np.random.default_rng(batch_order_seed).permutation(len(batches)))
    return batches


def padding_efficiency(batches: Iterable[np.ndarray], lengths: np.ndarray) -> float:
    """Real tokens / padded tokens over ``batches`` (1.0 means no padding); one pass, so a generator will do."""
    real = padded = 0
    for batch in batches:
        if len(batch):
            batch_lengths = lengths[batch]
            real += int(batch_lengths.sum())
            padded += int(batch_lengths.max()) * len(batch)
    return real / padded if padded else 1.0


def group_shards(
    batches: Sequence[np.ndarray], batches_per_shard: int, max_shards: int | None = None
) -> list[Sequence[np.ndarray]]:
    """Consecutive batches grouped into shards of ``batches_per_shard``; keeps at most ``max_shards``.

    Every shard but the last is full: the prototype's last shard was one batch short.
    """
    shards = [batches[s : s + batches_per_shard] for s in range(0, len(batches), batches_per_shard)]
    return shards if max_shards is None else shards[:max_shards]


def assign_shards(shard_tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Split shard indices across ranks with balanced token counts; each rank keeps plan order.

    Greedy: each shard, largest first, goes to the rank with the fewest tokens so far. Deterministic,
    so every rank computes the same assignment without communicating.
    """
    loads = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for shard in sorted(range(len(shard_tokens)), key=lambda i: (-shard_tokens[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += shard_tokens[shard]
        owned[rank].append(shard)
    return [sorted(shards) for shards in owned]


@dataclass
class Batch:
    """One padded batch, as collation makes it: the model's inputs and what the writer needs.

    Tensors move to the device with the batch; numpy arrays, numbers and the label table stay on the
    host (Lightning moves tensors only), so the writer reads them without waiting for the device.
    """

    input_ids: torch.Tensor  # [B, S] int64, padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # [B, S] 1 on real tokens
    position_ids: torch.Tensor  # [B, S] real tokens counted from 0 (0 on padding)
    lengths: torch.Tensor  # [B] real tokens per row
    first_token: torch.Tensor  # [B] column of each row's first real token (0 with right padding)
    example_id: torch.Tensor  # [B] row index in the loaded split
    host_example_id: np.ndarray  # the same, on the host
    host_tokens: int  # real tokens in the batch
    shard_index: int  # the shard this batch belongs to
    last_in_shard: bool  # the shard is complete after this batch
    # Streaming: the label rows travel with the batch; otherwise the writer takes them by example id.
    labels: pa.Table | None = None

    def rows(self, rows: slice) -> Batch:
        """The sub-batch of ``rows`` (used to split a batch that ran out of memory)."""
        sliced = {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if isinstance(getattr(self, f.name), (torch.Tensor, np.ndarray))
        }
        labels = None if self.labels is None else self.labels.slice(rows.start, rows.stop - rows.start)
        return replace(self, **sliced, labels=labels, host_tokens=int(sliced["lengths"].sum()))


@dataclass
class PlannedBatch:
    """One batch of the plan: positions into the store, and where it sits in its shard."""

    positions: np.ndarray
    shard_index: int
    last_in_shard: bool


def rank_batches(
    shards: Sequence[Sequence[np.ndarray]], shard_ids: Sequence[int], owned: Sequence[int]
) -> list[PlannedBatch]:
    """The batches one rank runs, in order: all batches of each of its shards, shard after shard."""
    planned = []
    for local in owned:
        batches = shards[local]
        for i, positions in enumerate(batches):
            planned.append(PlannedBatch(positions, shard_ids[local], i == len(batches) - 1))
    return planned


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
