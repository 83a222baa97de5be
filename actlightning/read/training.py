"""Token batches for training (SAEs, transcoders, probes): one or several columns, rows aligned, split
between DDP ranks and DataLoader workers, reshuffled each epoch, with the next row group read ahead.

The unit of work is a Parquet row group. Every reader (rank x worker) computes the same assignment:
with a shuffle, the row groups are permuted by ``(seed, epoch)``, then reader ``k`` of ``n`` takes
every ``n``-th one, so the readers together see every row once, every epoch. ``even_batches`` gives
every rank the same number of full batches (DDP needs it), reading every footer once to count rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from actlightning.files.schema import (
    EXAMPLE_ID,
    INPUT_IDS,
    POSITION,
    START_POSITION,
    TOKEN_ID,
    is_vector_column,
    token_columns,
)
from actlightning.read.reader import Export, StorageOptions, column_vectors, open_export, stored_dtype, to_torch

Unit = tuple[str, int]  # (shard file, row group)
# Token-level columns a reader may ask for besides the vectors.
TOKEN_COLUMNS = (EXAMPLE_ID, POSITION, TOKEN_ID)


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of ``torch.distributed`` when it is initialized, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def row_group_units(export: Export) -> list[Unit]:
    """Every row group of the export, file by file (the counts come from the manifest)."""
    counts = {s["file"]: s.get("row_groups") for s in export.manifest.get("shards", [])}
    units = []
    for name in export.names:
        groups = counts.get(name)
        if groups is None:
            with export.location.open(name) as handle:
                groups = pq.read_metadata(handle).num_row_groups
        units += [(name, g) for g in range(groups)]
    return units


def assign(units: list[Unit], readers: int, seed: int, epoch: int, shuffle: bool) -> list[list[Unit]]:
    """The units of each of ``readers`` readers (reader = rank x workers + worker)."""
    if shuffle:
        units = [units[i] for i in np.random.default_rng([seed, epoch]).permutation(len(units))]
    return [units[k::readers] for k in range(readers)]


def unit_rows(export: Export, units: Sequence[Unit]) -> dict[Unit, int]:
    """Token rows of each unit (every footer read once, 16 at a time)."""
    files = sorted({file for file, _ in units})
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = dict(zip(files, pool.map(lambda f: export.parquet_file(f).metadata, files), strict=True))
    token_layout = export.layout == "token"
    rows = {}
    for file, group in units:
        meta = footers[file].row_group(group)
        if token_layout:
            rows[(file, group)] = meta.num_rows
        else:  # tokens of the sequences: the input_ids leaf holds one value per token
            leaf = next(i for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith(INPUT_IDS))
            rows[(file, group)] = meta.column(leaf).num_values
    return rows


def batch_quotas(rows: list[list[int]], batch_size: int, workers: int) -> list[int]:
    """Full batches each reader yields so that every rank yields the same number: ``rows[k]`` are the
    row counts of reader ``k``'s units, readers ``r * workers .. r * workers + workers - 1`` are rank ``r``'s."""
    full = [sum(r) // batch_size for r in rows]
    per_rank = [sum(full[r : r + workers]) for r in range(0, len(full), workers)]
    target = min(per_rank)
    quotas = []
    for r in range(0, len(full), workers):
        left = target
        for k in range(r, r + workers):  # the rank's readers in order, each up to its own full batches
            quotas.append(min(full[k], left))
            left -= quotas[-1]
    return quotas


def _token_columns(table: pa.Table, names: list[str], layout: str) -> dict[str, np.ndarray]:
    """Each asked-for column of one row group, one value (or vector) per token."""
    tokens = token_columns(table)[0] if layout == "sequence" and not all(map(is_vector_column, names)) else {}
    out = {}
    for name in names:
        if is_vector_column(name):
            out[name] = column_vectors(table.column(name))[0]
        else:
            out[name] = tokens[name] if layout == "sequence" else table.column(name).to_numpy()
    return out


def _read_columns(export: Export, names: list[str]) -> list[str]:
    if export.layout == "token":
        return names
    needed = {n for n in names if is_vector_column(n) or n == EXAMPLE_ID}
    if any(n in (TOKEN_ID, POSITION, EXAMPLE_ID) for n in names):
        needed |= {INPUT_IDS}
    if POSITION in names:
        needed |= {START_POSITION}
    return sorted(needed)


def _check_columns(export: Export, names: list[str]) -> None:
    unknown = [n for n in names if not is_vector_column(n) and n not in TOKEN_COLUMNS]
    unknown += [n for n in names if is_vector_column(n) and n not in export.schema.names]
    if unknown:
        raise ValueError(
            f"columns {unknown} cannot be read as tokens; choose from {[*export.vector_columns, *TOKEN_COLUMNS]}"
        )


def _read_ahead(export: Export, units: list[Unit], read: list[str], names: list[str]) -> Iterator[dict]:
    """Each unit's token columns, the next unit read on a thread while the caller works on this one."""
    opened: list = [None, None]  # (file, ParquetFile): units come mostly file by file; one footer read each

    def load(unit: Unit) -> dict[str, np.ndarray]:
        file, group = unit
        if opened[0] != file:
            opened[:] = [file, export.parquet_file(file)]
        return _token_columns(opened[1].read_row_group(group, columns=read), names, export.layout)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="actlightning-read") as pool:
        future = pool.submit(load, units[0]) if units else None
        for index in range(len(units)):
            assert future is not None, "a read is in flight for every unit"
            current = future.result()
            future = pool.submit(load, units[index + 1]) if index + 1 < len(units) else None
            yield current


def _batches(
    pieces: Iterator[dict], batch_size: int, shuffle_buffer: int | None, rng, drop_last: bool
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows from ``pieces``; with a shuffle buffer, rows are permuted (all
    columns alike) once at least ``shuffle_buffer`` of them are pending."""
    pending: list[dict] = []
    count = 0
    threshold = max(shuffle_buffer or 0, batch_size)

    def emit(final: bool) -> Iterator[dict[str, np.ndarray]]:
        nonlocal pending, count
        if not pending:
            return
        buffer = {n: np.concatenate([p[n] for p in pending]) if len(pending) > 1 else pending[0][n] for n in pending[0]}
        if rng is not None:
            order = rng.permutation(count)
            buffer = {name: values[order] for name, values in buffer.items()}
        stop = count if final else count - count % batch_size
        for start in range(0, stop, batch_size):
            if stop - start < batch_size and drop_last:
                break
            yield {name: values[start : start + batch_size] for name, values in buffer.items()}
        pending = [{n: v[stop:] for n, v in buffer.items()}] if stop < count else []
        count -= stop

    for piece in pieces:
        size = len(next(iter(piece.values())))
        if size:
            pending.append(piece)
            count += size
        if count >= threshold:
            yield from emit(final=False)
    yield from emit(final=True)


def iter_token_batches(
    path: str | Path,
    columns: str | Sequence[str],
    batch_size: int,
    shuffle_buffer: int | None = None,
    seed: int = 0,
    worker: int = 0,
    num_workers: int = 1,
    drop_last: bool = False,
    storage_options: StorageOptions = None,
    rank: int | None = None,
    world_size: int | None = None,
    epoch: int = 0,
    even_batches: bool = False,
) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
    """Token rows ``batch_size`` at a time, reading only the columns asked for.

    ``columns``: one name (batches are tensors) or several (dicts of tensors, rows aligned): vector
    columns in their stored dtype, and ``example_id``, ``position``, ``token_id`` (in either layout).
    ``rank`` / ``world_size`` (default: ``torch.distributed``'s) and ``worker`` / ``num_workers``
    split the row groups so that all readers together read every row once. ``shuffle_buffer`` (rows)
    mixes rows across row groups; with it the row-group order is permuted too, both seeded by
    ``(seed, epoch)``. ``even_batches``: every rank yields the same number of full batches (the rest,
    at most about one row group and one batch per reader, is dropped).
    """
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    export = open_export(path, storage_options)
    names = [columns] if isinstance(columns, str) else list(columns)
    _check_columns(export, names)
    units = row_group_units(export)
    me, readers = rank * num_workers + worker, world_size * num_workers
    assigned = assign(units, readers, seed, epoch, shuffle_buffer is not None)
    rng = np.random.default_rng([seed, epoch, me]) if shuffle_buffer else None
    pieces = _read_ahead(export, assigned[me], _read_columns(export, names), names)
    batches = _batches(pieces, batch_size, shuffle_buffer, rng, drop_last or even_batches)
    if even_batches:
        rows = unit_rows(export, units)
        quota = batch_quotas([[rows[u] for u in mine] for mine in assigned], batch_size, num_workers)[me]
        batches = (batch for _, batch in zip(range(quota), batches, strict=False))
    dtypes = {n: stored_dtype(export.schema.field(n)) for n in names if is_vector_column(n)}
    for batch in batches:
        tensors = {
            n: to_torch(v, dtypes[n]) if n in dtypes else torch.from_numpy(np.array(v))  # a writable copy
            for n, v in batch.items()
        }
        yield tensors[names[0]] if isinstance(columns, str) else tensors


class TokenVectors(IterableDataset):
    """A torch ``IterableDataset`` of token batches (see ``iter_token_batches``).

    Use with ``DataLoader(TokenVectors(...), batch_size=None, num_workers=N)``: each worker reads its
    own row groups. The rank and world size are taken when it is made (from ``torch.distributed``
    unless given); call ``set_epoch(e)`` before each epoch for a new order of the same rows.
    """

    def __init__(
        self,
        path: str | Path,
        columns: str | Sequence[str],
        batch_size: int,
        shuffle_buffer: int | None = None,
        seed: int = 0,
        storage_options: StorageOptions = None,
        rank: int | None = None,
        world_size: int | None = None,
        epoch: int = 0,
        even_batches: bool = False,
        drop_last: bool = False,
    ) -> None:
        if rank is None or world_size is None:
            rank, world_size = distributed_rank()
        self.path, self.columns, self.batch_size = str(path), columns, batch_size
        self.shuffle_buffer, self.seed, self.storage_options = shuffle_buffer, seed, storage_options
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.even_batches, self.drop_last = even_batches, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return iter_token_batches(
            self.path, self.columns, self.batch_size, self.shuffle_buffer, self.seed, worker, num_workers,
            self.drop_last, self.storage_options, self.rank, self.world_size, self.epoch, self.even_batches,
        )  # fmt: skip
