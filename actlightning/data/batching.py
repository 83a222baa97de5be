"""Pure functions that turn tokenized sequences into padded batches and batches into shards.

A *plan* is the list of shards of a whole export, each a list of batches, each an array of positions
into the tokenized store. It depends only on the data and the settings, never on the device count:
ranks take whole shards, so every example is exported exactly once whatever the world size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from actlightning.contracts import PlannedBatch
from actlightning.errors import ConfigError


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


def padding_counts(batches: Iterable[np.ndarray], lengths: np.ndarray) -> tuple[int, int]:
    """(real tokens, padded tokens) over ``batches``; one pass, so a generator will do."""
    real = padded = 0
    for batch in batches:
        if len(batch):
            batch_lengths = lengths[batch]
            real += int(batch_lengths.sum())
            padded += int(batch_lengths.max()) * len(batch)
    return real, padded


def padding_efficiency(batches: Iterable[np.ndarray], lengths: np.ndarray) -> float:
    """Real tokens / padded tokens over ``batches`` (1.0 means no padding)."""
    real, padded = padding_counts(batches, lengths)
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


def remaining_shards(
    shards: list[Sequence[np.ndarray]],
    example_ids: np.ndarray,
    done_example_ids: np.ndarray | None,
    taken_shard_indices: set[int],
) -> tuple[list[Sequence[np.ndarray]], list[int]]:
    """The shards still to export and their indices, after a resume.

    The plan covers the whole selection, so ``max_shards`` always means the same examples. Examples
    already in complete shards (``done_example_ids``) are removed; what remains keeps its place in the
    plan. A partly exported shard (possible when batching settings changed) gets a fresh index.
    """
    indices = list(range(len(shards)))
    if done_example_ids is not None and len(done_example_ids):
        done = np.isin(example_ids, done_example_ids)
        remaining: list[Sequence[np.ndarray]] = []
        kept_indices = []
        for index, shard in zip(indices, shards, strict=True):
            left = [b[~done[b]] for b in shard]
            left = [b for b in left if len(b)]
            if left:
                remaining.append(left)
                kept_indices.append(index)
        shards, indices = remaining, kept_indices
    next_free = max([*taken_shard_indices, *indices], default=-1) + 1
    renamed = []
    for index in indices:
        if index in taken_shard_indices:
            index, next_free = next_free, next_free + 1
        renamed.append(index)
    return shards, renamed
