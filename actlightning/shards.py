"""Shard files: atomic Parquet writing, on a background thread so encoding overlaps the forward pass."""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.errors import ExportError
from actlightning.parquet_file import VectorParquetWriter
from actlightning.storage import TMP_SUFFIX, WRITE_CHECK_PREFIX, LocalLocation, Location, StorageError

Compression = Literal["none", "zstd", "snappy", "lz4"]
VectorEncoder = Literal["direct", "arrow"]
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})-rank(\d{2,})\.parquet$")
SHARD_METADATA_KEY = "actlightning"


def shard_name(shard_index: int, rank: int) -> str:
    """Final file name: sortable by shard index, unique across ranks."""
    return f"shard-{shard_index:05d}-rank{rank:02d}.parquet"


def tmp_name(final_name: str) -> str:
    # A leading dot hides it from `*.parquet` globs and from `datasets`' data file resolution.
    return f".{final_name}{TMP_SUFFIX}"


def is_tmp_file(name: str) -> bool:
    """A shard, manifest or write check being written: left behind only by a run that was killed."""
    return name.startswith((".shard-", ".manifest.json", WRITE_CHECK_PREFIX)) and name.endswith(TMP_SUFFIX)


@dataclass
class ShardInfo:
    """What a finished shard holds, as recorded in its Parquet footer."""

    file: str
    shard_index: int
    rows: int
    tokens: int
    bytes: int
    # Sequences whose tokens the shard holds (= rows in the sequence layout).
    examples: int
    # Parquet row groups (one per written batch or shuffle flush): readers split work by them.
    row_groups: int | None = None

    @classmethod
    def read(cls, location: Location, name: str) -> ShardInfo:
        """From the footer of shard ``name`` of ``location``."""
        with location.open(name) as handle:
            metadata = pq.read_metadata(handle)
            size = handle.seek(0, os.SEEK_END)
        return cls.from_footer(name, metadata, size)

    @classmethod
    def from_footer(cls, name: str, metadata: pq.FileMetaData, size: int) -> ShardInfo:
        extra = json.loads(metadata.metadata[SHARD_METADATA_KEY.encode()])
        examples = extra.get("examples", metadata.num_rows)
        return cls(
            name, extra["shard_index"], metadata.num_rows, extra["tokens"], size, examples, metadata.num_row_groups
        )


def parquet_options(
    schema: pa.Schema, compression: Compression, vector_columns: list[str], compression_level: int | None = None
) -> dict:
    """Writer options: dictionaries and statistics only for the small columns.

    For float vectors both are useless and halve write speed.
    """
    small = [name for name in schema.names if name not in vector_columns]
    level = {"compression_level": compression_level} if compression_level is not None and compression != "none" else {}
    return {
        "compression": compression,
        **level,
        "use_dictionary": small,
        "write_statistics": small,
        # Measured: version 2 data pages write float16 vectors 10-30% faster; every current reader has them.
        "data_page_version": "2.0",
    }


class ArrowParquetFile:
    """pyarrow's own writer behind ``VectorParquetWriter``'s interface (``vector_encoder: arrow``)."""

    def __init__(self, path: Path, schema: pa.Schema, options: dict) -> None:
        self._writer = pq.ParquetWriter(path, schema, **options)

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def add_key_value_metadata(self, metadata: dict[str, str]) -> None:
        self._writer.add_key_value_metadata(metadata)

    def close(self) -> None:
        self._writer.close()

    abort = close


class ShardFile:
    """One Parquet shard, written under a temporary name in a local folder and published when complete
    (renamed into place, or uploaded: see ``storage``).

    Each written table becomes one row group. ``vector_encoder``: ``direct`` writes the vector
    columns' pages straight from their buffers (``parquet_file``), ``arrow`` leaves all to pyarrow.
    """

    def __init__(
        self,
        folder: Path,
        shard_index: int,
        rank: int,
        schema: pa.Schema,
        options: dict,
        vector_encoder: VectorEncoder = "direct",
        location: Location | None = None,
    ) -> None:
        self.shard_index = shard_index
        self.location = location if location is not None else LocalLocation(folder)
        self.name = shard_name(shard_index, rank)
        self.tmp_path = folder / tmp_name(self.name)
        self.rows = 0
        self.tokens = 0
        self.examples = 0
        self.row_groups = 0
        file_class = VectorParquetWriter if vector_encoder == "direct" else ArrowParquetFile
        self._writer = file_class(self.tmp_path, schema, options)

    def write(self, table: pa.Table, tokens: int, examples: int) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows
        self.row_groups += 1
        self.tokens += tokens
        self.examples += examples

    def close(self) -> ShardInfo:
        """Finish the file, then publish it: it appears under its final name only complete."""
        self._writer.add_key_value_metadata(
            {
                SHARD_METADATA_KEY: json.dumps(
                    {"shard_index": self.shard_index, "tokens": self.tokens, "examples": self.examples}
                )
            }
        )
        self._writer.close()
        size = self.tmp_path.stat().st_size
        try:
            self.location.publish(self.tmp_path, self.name)
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        return ShardInfo(self.name, self.shard_index, self.rows, self.tokens, size, self.examples, self.row_groups)

    def abort(self) -> None:
        try:
            self._writer.abort()
        finally:
            self.tmp_path.unlink(missing_ok=True)


class ShardWriteError(ExportError):
    """Writing a shard failed; names the file and the cause."""


class BackgroundShardWriter:
    """Writes whole shards on one background thread.

    ``submit`` blocks only when ``max_pending`` batches are queued, which bounds memory. ``encode``
    turns a submitted item into ``(table, tokens, examples)`` on the thread, so that waiting for a device copy
    and building Arrow arrays overlap the next forward pass. An error on the thread is raised by the
    next ``submit`` or by ``close``, so the run stops with it. ``on_shard_done`` is called on the
    thread with each finished shard's ``ShardInfo``.
    """

    def __init__(
        self,
        folder: Path,
        rank: int,
        schema: pa.Schema,
        options: dict,
        encode: Callable[[Any], tuple[pa.Table, int, int]],
        max_pending: int = 4,
        on_shard_done: Callable[[ShardInfo], None] | None = None,
        name: str = "actlightning-writer",
        shuffle_buffer: int | None = None,
        shuffle_seed: int = 0,
        vector_encoder: VectorEncoder = "direct",
        location: Location | None = None,
    ) -> None:
        self.folder = folder
        self.location = location
        self.rank = rank
        self.schema = schema
        self.options = options
        self.encode = encode
        self.on_shard_done = on_shard_done
        self.finished: list[ShardInfo] = []
        self._queue: queue.Queue = queue.Queue(maxsize=max(max_pending, 1))
        self._error: BaseException | None = None
        self._current: ShardFile | None = None
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_seed = shuffle_seed
        self.vector_encoder = vector_encoder
        self._buffer: list[tuple[pa.Table, int, int]] = []
        self._flushes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, shard_index: int, item: object, last_in_shard: bool) -> None:
        self.raise_if_failed()
        self._queue.put((shard_index, item, last_in_shard))

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            if self._error is not None:
                continue
            try:
                self._write(*entry)
            except BaseException as error:  # re-raised on the main thread
                self._error = error
                self._buffer = []
                if self._current is not None:
                    self._current.abort()
                    self._current = None

    def _write(self, shard_index: int, item: object, last_in_shard: bool) -> None:
        if self._current is not None and self._current.shard_index != shard_index:
            raise AssertionError(
                f"batch of shard {shard_index} arrived while shard {self._current.shard_index} is open"
            )
        table, tokens, examples = self.encode(item)
        if self._current is None:
            self._current = ShardFile(
                self.folder, shard_index, self.rank, self.schema, self.options, self.vector_encoder, self.location
            )
            self._flushes = 0
        path = self._current.tmp_path
        try:
            if self.shuffle_buffer:
                self._buffer.append((table, tokens, examples))
                if len(self._buffer) >= self.shuffle_buffer or last_in_shard:
                    self._write_shuffled()
            else:
                self._current.write(table, tokens, examples)
            if last_in_shard:
                info = self._current.close()
                self._current = None
                self.finished.append(info)
                if self.on_shard_done is not None:
                    self.on_shard_done(info)
        except StorageError:
            raise  # already names the URL and the cause
        except OSError as error:
            raise ShardWriteError(f"writing shard {path} failed: {error}") from error

    def _write_shuffled(self) -> None:
        """Write the buffered batches as one table with its rows permuted.

        The generator is seeded by (seed, shard, flush), so a shard's order never depends on threads.
        """
        assert self._current is not None, "a shard is open while its batches are buffered"
        table = pa.concat_tables([t for t, _, _ in self._buffer])
        tokens = sum(n for _, n, _ in self._buffer)
        examples = sum(e for _, _, e in self._buffer)
        self._buffer = []
        rng = np.random.default_rng([self.shuffle_seed, self._current.shard_index, self._flushes])
        self._flushes += 1
        self._current.write(table.take(pa.array(rng.permutation(table.num_rows))), tokens, examples)

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> list[ShardInfo]:
        """Wait for every queued batch, stop the thread, and raise any error it met."""
        self._queue.put(None)
        self._thread.join()
        self.raise_if_failed()
        if self._current is not None:
            # A shard whose last batch never came (an interrupted run): drop it, resume redoes it.
            self._current.abort()
            self._current = None
        return self.finished

    def abort(self) -> None:
        """Stop without finishing the open shard (the run failed)."""
        self._error = self._error or RuntimeError("aborted")
        while True:  # drop what is queued, so the sentinel below cannot block
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()
        if self._current is not None:
            self._current.abort()
            self._current = None


class ShardWriterPool:
    """Several ``BackgroundShardWriter`` threads; each shard goes whole to the next thread in turn.

    Parquet encoding mostly releases the GIL, so shards encode in parallel when writing, not the
    forward pass, is the bottleneck (a fast GPU). Each shard's contents do not depend on the threads.
    """

    def __init__(self, num_threads: int, **kwargs) -> None:
        self.writers = [
            BackgroundShardWriter(**kwargs, name=f"actlightning-writer-rank{kwargs['rank']}-{i}")
            for i in range(max(num_threads, 1))
        ]
        self._owner: dict[int, BackgroundShardWriter] = {}
        self._next = 0

    def submit(self, shard_index: int, item: object, last_in_shard: bool) -> None:
        writer = self._owner.get(shard_index)
        if writer is None:
            writer = self._owner[shard_index] = self.writers[self._next % len(self.writers)]
            self._next += 1
        for other in self.writers:
            other.raise_if_failed()
        writer.submit(shard_index, item, last_in_shard)
        if last_in_shard:
            del self._owner[shard_index]

    def close(self) -> list[ShardInfo]:
        errors, finished = [], []
        for writer in self.writers:
            try:
                finished += writer.close()
            except BaseException as error:  # the first error is raised below
                errors.append(error)
        if errors:
            raise errors[0]
        return sorted(finished, key=lambda info: info.shard_index)

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()
