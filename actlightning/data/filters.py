"""Pure selection functions: each takes inputs (texts or token tuples) and returns the positions kept."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def drop_prefixes(inputs: Sequence[str] | Sequence[tuple]) -> np.ndarray:
    """Positions of inputs that are not a strict prefix of another input, in input order.

    Sorted lexicographically, every string lying between ``s`` and a longer ``t`` that starts with
    ``s`` also starts with ``s``; so ``s`` is a strict prefix of some input exactly when the next
    *different* input in sorted order starts with it. Equal copies are skipped when looking for
    that next input, so duplicates neither hide nor cause a drop (the prototype compared only
    neighbours and always dropped the last unique input). O(n log n).
    """
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    dropped = np.zeros(len(inputs), dtype=bool)
    run_value = next_value = None  # the current run of equal values, and the value right after it
    for rank, position in enumerate(reversed(order)):
        value = inputs[position]
        if rank == 0 or value != run_value:
            next_value = None if rank == 0 else run_value
            run_value = value
        if next_value is not None and len(next_value) > len(value) and next_value[: len(value)] == value:
            dropped[position] = True
    return np.flatnonzero(~dropped)


def length_range(lengths: np.ndarray, min_tokens: int | None, max_tokens: int | None) -> np.ndarray:
    """Positions whose token count lies in ``[min_tokens, max_tokens]`` (either bound optional)."""
    keep = np.ones(len(lengths), dtype=bool)
    if min_tokens is not None:
        keep &= lengths >= min_tokens
    if max_tokens is not None:
        keep &= lengths <= max_tokens
    return np.flatnonzero(keep)


def shuffle_and_limit(count: int, seed: int | None, limit: int | None) -> np.ndarray:
    """Positions ``0..count-1``, permuted with ``seed`` (0 is a seed) and cut to ``limit``."""
    positions = np.arange(count)
    if seed is not None:
        positions = np.random.default_rng(seed).permutation(count)
    return positions if limit is None else positions[:limit]
