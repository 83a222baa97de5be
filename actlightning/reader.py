"""Reading exports back: per-sequence vectors in their stored dtype, without Python objects per value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actlightning.schema import DTYPE_METADATA_KEY


def stored_dtype(field: pa.Field) -> str:
    """The storage dtype of a layer column (``float32``, ``float16`` or ``bfloat16``)."""
    metadata = field.metadata or {}
    if DTYPE_METADATA_KEY in metadata:
        return metadata[DTYPE_METADATA_KEY].decode()
    value = field.type.storage_type if isinstance(field.type, pa.ExtensionType) else field.type
    while pa.types.is_list(value) or pa.types.is_fixed_size_list(value):
        value = value.value_type
    return str(value.to_pandas_dtype().__name__)


def layer_vectors(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A layer column -> ``(vectors [total_tokens, hidden], row_offsets [rows + 1])``, zero-copy per chunk.

    bfloat16 columns come back as their raw uint16 bits; ``to_torch`` reinterprets them.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    vectors, offsets, base = [], [np.zeros(1, dtype=np.int64)], 0
    for chunk in chunks:
        storage = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        storage = storage.flatten() if storage.offset else storage
        outer = storage.offsets.to_numpy().astype(np.int64)
        inner = storage.values
        inner_offsets = inner.offsets.to_numpy()
        values = inner.values
        hidden = int(inner_offsets[1] - inner_offsets[0]) if len(inner) else 0
        start, stop = int(inner_offsets[outer[0]]), int(inner_offsets[outer[-1]])
        flat = values.to_numpy(zero_copy_only=False)[start:stop]
        vectors.append(flat.reshape(-1, hidden) if hidden else flat.reshape(0, 0))
        offsets.append(outer[1:] - outer[0] + base)
        base += int(outer[-1] - outer[0])
    if len(vectors) == 1:
        return vectors[0], np.concatenate(offsets)
    return np.concatenate(vectors), np.concatenate(offsets)


def to_torch(vectors: np.ndarray, dtype: str) -> torch.Tensor:
    """Vectors as a torch tensor in their stored dtype (bfloat16 decoded from its bit patterns)."""
    tensor = torch.from_numpy(np.ascontiguousarray(vectors))
    if dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


def read_shard_layers(path: Path | str, columns: list[str] | None = None) -> dict[str, list[torch.Tensor]]:
    """Each layer column of a shard as a list (one per row) of ``[tokens, hidden]`` tensors."""
    table = pq.read_table(path, columns=columns)
    result = {}
    for field in table.schema:
        if not field.name.startswith("layer_"):
            continue
        vectors, offsets = layer_vectors(table.column(field.name))
        tensor = to_torch(vectors, stored_dtype(field))
        result[field.name] = [tensor[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return result
