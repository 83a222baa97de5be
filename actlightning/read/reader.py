"""Reading exports back: vectors in their stored dtype, without Python objects per value.

- ``open_export(path)``: the manifest, schema and counts of an export, and a ``datasets.Dataset`` view.
- ``iter_token_batches`` / ``TokenVectors``: one column's token vectors in batches, reading only that
  column, with an optional seeded shuffle buffer and DataLoader-worker sharding (for SAE training).

Each takes a local path or a URL (``s3://bucket/prefix``, with ``storage_options`` as in ``datasets``);
from a URL only the footers and the asked-for columns' chunks are fetched, one row group at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actlightning.files.manifest import MANIFEST, read_manifest, shard_names
from actlightning.files.schema import DTYPE_METADATA_KEY, VECTOR_PREFIXES, flat_values, storage_array, storage_type
from actlightning.files.storage import Location, open_location

StorageOptions = Mapping[str, Any] | None


def stored_dtype(field: pa.Field) -> str:
    """The storage dtype of a vector column (``float32``, ``float16`` or ``bfloat16``)."""
    metadata = field.metadata or {}
    if DTYPE_METADATA_KEY in metadata:
        return metadata[DTYPE_METADATA_KEY].decode()
    value = storage_type(field.type)
    while pa.types.is_list(value) or pa.types.is_fixed_size_list(value):
        value = value.value_type
    if pa.types.is_fixed_size_binary(value) and value.byte_width == 2:
        return "bfloat16"  # the only 2-byte binaries this tool writes
    return str(value.to_pandas_dtype().__name__)


def is_vector_column(name: str) -> bool:
    return name.startswith(VECTOR_PREFIXES)


def _chunk_vectors(chunk: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of a vector column -> ``(vectors [tokens, width], row_offsets [rows + 1])``."""
    storage = storage_array(chunk)
    if pa.types.is_fixed_size_list(storage.type):  # token layout: one vector per row
        width = storage.type.list_size
        values = storage.values.slice(storage.offset * width, len(storage) * width)
        flat = flat_values(values)
        return flat.reshape(-1, width), np.arange(len(storage) + 1, dtype=np.int64)
    outer = storage.offsets.to_numpy().astype(np.int64)
    inner = storage.values
    inner_offsets = inner.offsets.to_numpy()
    if outer[-1] == outer[0]:
        return np.zeros((0, 0), dtype=np.float32), outer - outer[0]
    start, stop = int(inner_offsets[outer[0]]), int(inner_offsets[outer[-1]])
    width = int(inner_offsets[outer[0] + 1] - inner_offsets[outer[0]])
    flat = flat_values(inner.values)[start:stop]
    return flat.reshape(-1, width), outer - outer[0]


def column_vectors(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A vector column -> ``(vectors [total_tokens, width], row_offsets [rows + 1])``.

    Zero-copy for a single chunk. bfloat16 columns come back as their raw uint16 bits (see ``to_torch``).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_vectors(chunk) for chunk in chunks if len(chunk)]
    if not parts:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(1, dtype=np.int64)
    if len(parts) == 1:
        return parts[0]
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for _, chunk_offsets in parts:
        offsets.append(chunk_offsets[1:] + base)
        base += int(chunk_offsets[-1])
    return np.concatenate([v for v, _ in parts if v.size]), np.concatenate(offsets)


def to_torch(vectors: np.ndarray, dtype: str) -> torch.Tensor:
    """Vectors as a torch tensor in their stored dtype (bfloat16 decoded from its bit patterns).

    Arrow's buffers are read-only; such vectors are copied, so the tensor may be changed in place
    (``x -= mean``) without touching the table it came from.
    """
    if not vectors.flags.writeable:
        vectors = vectors.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(vectors))
    if dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


def read_shard_vectors(path: Path | str, columns: list[str] | None = None) -> dict[str, list[torch.Tensor]]:
    """Each vector column of a shard as a list (one per row) of ``[tokens, width]`` tensors."""
    table = pq.read_table(path, columns=columns)
    result = {}
    for field in table.schema:
        if not is_vector_column(field.name):
            continue
        vectors, offsets = column_vectors(table.column(field.name))
        tensor = to_torch(vectors, stored_dtype(field))
        result[field.name] = [tensor[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return result


@dataclass
class Export:
    """An export (a local folder or a URL): its manifest, schema and shard names."""

    location: Location
    manifest: dict
    schema: pa.Schema
    names: list[str]
    storage_options: StorageOptions = None

    @property
    def path(self) -> str:
        return self.location.url

    @property
    def files(self) -> list[str]:
        """Each shard's path or URL."""
        return [self.location.path(name) for name in self.names]

    def parquet_file(self, name: str) -> pq.ParquetFile:
        """One shard for ranged reads (its footer now, the row groups and columns asked for later)."""
        return pq.ParquetFile(self.location.open(name))

    @property
    def rows(self) -> int:
        return self.manifest["totals"]["rows"]

    @property
    def tokens(self) -> int:
        return self.manifest["totals"]["tokens"]

    @property
    def layout(self) -> str:
        return self.manifest["settings"].get("layout", "sequence")

    @property
    def vector_columns(self) -> list[str]:
        return [name for name in self.schema.names if is_vector_column(name)]

    @property
    def dtypes(self) -> dict[str, str]:
        return {name: stored_dtype(self.schema.field(name)) for name in self.vector_columns}

    def dataset(self, cache_dir: str | None = None, streaming: bool | None = None, columns: list[str] | None = None):
        """A ``datasets.Dataset`` of the export; vector columns come as torch tensors in their stored
        dtype (``datasets``' own torch format would cast them to float32).

        ``streaming``: unset, a local export is memory-mapped (``Dataset``) and a URL is streamed
        (``IterableDataset``: nothing downloaded up front; ``load_dataset`` would copy every shard into
        its cache). ``columns``: read only these.
        """
        from datasets import load_dataset

        from actlightning.read.formatter import register_formatter

        register_formatter()
        streaming = self.location.remote if streaming is None else streaming
        dataset = load_dataset(
            "parquet",
            data_files=self.files,
            split="train",
            cache_dir=cache_dir,
            streaming=streaming,
            storage_options=dict(self.storage_options or {}) or None,
            **({"columns": columns} if columns else {}),
        )
        if streaming:  # an IterableDataset's format takes no arguments: dtypes come from the schema
            return dataset.with_format("actlightning")
        return dataset.with_format("actlightning", dtypes=self.dtypes)


def open_export(path: str | Path, storage_options: StorageOptions = None) -> Export:
    """Open an export (a local folder or a URL) through its manifest."""
    location = open_location(path, storage_options)
    manifest = read_manifest(location)
    if manifest is None:
        raise FileNotFoundError(f"{location.url} holds no {MANIFEST}: not an actlightning export")
    names = shard_names(location)
    if not names:
        raise FileNotFoundError(f"{location.url} holds no complete shard yet")
    with location.open(names[0]) as handle:
        schema = pq.read_schema(handle)
    return Export(location, manifest, schema, names, storage_options)


def _row_group_units(export: Export) -> list[tuple[str, int]]:
    # The row-group counts are in the manifest's shards; a footer is read only for a shard it lacks.
    counts = {s["file"]: s.get("row_groups") for s in export.manifest.get("shards", [])}
    units = []
    for name in export.names:
        groups = counts.get(name)
        if groups is None:
            with export.location.open(name) as handle:
                groups = pq.read_metadata(handle).num_row_groups
        units += [(name, g) for g in range(groups)]
    return units


def iter_token_batches(
    path: str | Path,
    column: str,
    batch_size: int,
    shuffle_buffer: int | None = None,
    seed: int = 0,
    worker: int = 0,
    num_workers: int = 1,
    drop_last: bool = False,
    storage_options: StorageOptions = None,
) -> Iterator[torch.Tensor]:
    """Token vectors of one column, ``[batch_size, width]`` at a time, reading only that column.

    Row groups are split round-robin between ``num_workers`` readers, so workers together read every
    row exactly once. ``shuffle_buffer`` (tokens) mixes vectors across row groups with a seeded
    generator: deterministic for a given seed, worker and export.
    """
    export = open_export(path, storage_options)
    units = _row_group_units(export)[worker::num_workers]
    rng = np.random.default_rng([seed, worker]) if shuffle_buffer else None
    dtype = stored_dtype(export.schema.field(column))
    pending: list[np.ndarray] = []
    pending_count = 0

    def emit(final: bool) -> Iterator[torch.Tensor]:
        nonlocal pending, pending_count
        if not pending:
            return
        buffer = np.concatenate(pending) if len(pending) > 1 else pending[0]
        if rng is not None:
            buffer = buffer[rng.permutation(len(buffer))]
        stop = len(buffer) if final else len(buffer) - len(buffer) % batch_size
        for start in range(0, stop, batch_size):
            chunk = buffer[start : start + batch_size]
            if len(chunk) < batch_size and drop_last:
                break
            yield to_torch(chunk, dtype)
        pending = [buffer[stop:]] if stop < len(buffer) else []
        pending_count = len(buffer) - stop

    threshold = max(shuffle_buffer or 0, batch_size)
    opened: tuple[str, pq.ParquetFile] | None = None
    for file, group in units:
        if opened is None or opened[0] != file:  # units come file by file: each footer is read once
            opened = (file, export.parquet_file(file))
        table = opened[1].read_row_group(group, columns=[column])
        vectors, _ = column_vectors(table.column(column))
        if not len(vectors):
            continue
        pending.append(vectors)
        pending_count += len(vectors)
        if pending_count >= threshold:
            yield from emit(final=False)
    yield from emit(final=True)


class TokenVectors(IterableDataset):
    """A torch ``IterableDataset`` of one column's token vectors, in batches.

    Use with ``DataLoader(TokenVectors(...), batch_size=None, num_workers=N)``: each worker reads its
    own row groups, so the workers together yield every token exactly once.
    """

    def __init__(
        self,
        path: str | Path,
        column: str,
        batch_size: int,
        shuffle_buffer: int | None = None,
        seed: int = 0,
        storage_options: StorageOptions = None,
    ) -> None:
        self.path, self.column, self.batch_size = str(path), column, batch_size
        self.shuffle_buffer, self.seed, self.storage_options = shuffle_buffer, seed, storage_options

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter_token_batches(
            self.path,
            self.column,
            self.batch_size,
            self.shuffle_buffer,
            self.seed,
            worker,
            num_workers,
            storage_options=self.storage_options,
        )
