"""What an export costs on disk, before any forward pass (the plan's arithmetic)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from actlightning.files.schema import Layout


def exported_tokens(lengths: np.ndarray, n_pos: int | None) -> np.ndarray:
    """Tokens exported per sequence: all of them, or the last ``n_pos``."""
    return np.minimum(lengths, n_pos) if n_pos else lengths


def bytes_per_token(widths: Mapping[str, int], storage_dtype: str, layout: Layout) -> int:
    """Bytes on disk per exported token (uncompressed): its vectors (float32 4 bytes a value; float16
    and bfloat16, stored as 2-byte binaries, 2), its token id, and in the token layout its example id
    and position."""
    value_bytes = 4 if storage_dtype == "float32" else 2
    return sum(widths.values()) * value_bytes + 4 + (12 if layout == "token" else 0)
