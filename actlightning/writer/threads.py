"""Writer threads: whole shards written on background threads, so encoding overlaps the forward pass."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actlightning.files.shard_file import ShardFile, ShardInfo, ShardWriteError, VectorEncoder, add_moments
from actlightning.files.storage import Location, StorageError

# What ``encode`` makes of a submitted batch: its table, tokens, examples and vector columns' sums.
Encoded = tuple[pa.Table, int, int, dict[str, np.ndarray]]


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
        encode: Callable[[Any], Encoded],
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
        self._buffer: list[Encoded] = []
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
        encoded = self.encode(item)
        if self._current is None:
            self._current = ShardFile(
                self.folder, shard_index, self.rank, self.schema, self.options, self.vector_encoder, self.location
            )
            self._flushes = 0
        path = self._current.tmp_path
        try:
            if self.shuffle_buffer:
                self._buffer.append(encoded)
                if len(self._buffer) >= self.shuffle_buffer or last_in_shard:
                    self._write_shuffled()
            else:
                self._current.write(*encoded)
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
        table = pa.concat_tables([encoded[0] for encoded in self._buffer])
        tokens = sum(encoded[1] for encoded in self._buffer)
        examples = sum(encoded[2] for encoded in self._buffer)
        moments: dict[str, np.ndarray] = {}
        for encoded in self._buffer:
            moments = add_moments(moments, encoded[3])
        self._buffer = []
        rng = np.random.default_rng([self.shuffle_seed, self._current.shard_index, self._flushes])
        self._flushes += 1
        self._current.write(table.take(pa.array(rng.permutation(table.num_rows))), tokens, examples, moments)

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
