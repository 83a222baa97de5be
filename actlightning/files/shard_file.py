"""Shard files: their names, what their footers say (``ShardInfo``), and atomic Parquet writing
(a temporary name in a local folder, published whole when complete)."""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.errors import ExportError
from actlightning.files.storage import TMP_SUFFIX, WRITE_CHECK_PREFIX, LocalLocation, Location
from actlightning.files.vector_parquet import VectorParquetWriter

Compression = Literal["none", "zstd", "snappy", "lz4"]
VectorEncoder = Literal["direct", "arrow"]
SHARD_PATTERN = re.compile(r"^shard-(\d{5,})-rank(\d{2,})\.parquet$")
SHARD_METADATA_KEY = "actlightning"
MOMENTS_METADATA_KEY = "actlightning.moments"


def encode_moments(moments: dict[str, np.ndarray]) -> str:
    """float64 sums as JSON of base64 (exact, and a third the size of decimal text)."""
    return json.dumps(
        {name: base64.b64encode(values.astype("<f8").tobytes()).decode() for name, values in moments.items()}
    )


def decode_moments(text: bytes | str) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(base64.b64decode(data), dtype="<f8") for name, data in json.loads(text).items()}


def add_moments(total: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``total`` plus ``part``, column by column (a new dict)."""
    return {name: total[name] + values if name in total else values.copy() for name, values in part.items()}


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
    # Each vector column's float64 sums (see ``Prediction.moments``); kept in the footer, not the manifest.
    moments: dict[str, np.ndarray] | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """What the manifest lists of the shard."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "moments"}

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
        moments = metadata.metadata.get(MOMENTS_METADATA_KEY.encode())
        return cls(
            name,
            extra["shard_index"],
            metadata.num_rows,
            extra["tokens"],
            size,
            examples,
            metadata.num_row_groups,
            decode_moments(moments) if moments is not None else None,
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
        self.moments: dict[str, np.ndarray] = {}
        file_class = VectorParquetWriter if vector_encoder == "direct" else ArrowParquetFile
        self._writer = file_class(self.tmp_path, schema, options)

    def write(self, table: pa.Table, tokens: int, examples: int, moments: dict[str, np.ndarray] | None = None) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows
        self.row_groups += 1
        self.tokens += tokens
        self.examples += examples
        if moments:
            self.moments = add_moments(self.moments, moments)

    def close(self) -> ShardInfo:
        """Finish the file, then publish it: it appears under its final name only complete."""
        summary = {"shard_index": self.shard_index, "tokens": self.tokens, "examples": self.examples}
        metadata = {SHARD_METADATA_KEY: json.dumps(summary)}
        if self.moments:
            metadata[MOMENTS_METADATA_KEY] = encode_moments(self.moments)
        self._writer.add_key_value_metadata(metadata)
        self._writer.close()
        size = self.tmp_path.stat().st_size
        try:
            self.location.publish(self.tmp_path, self.name)
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        return ShardInfo(
            self.name,
            self.shard_index,
            self.rows,
            self.tokens,
            size,
            self.examples,
            self.row_groups,
            self.moments or None,
        )

    def abort(self) -> None:
        try:
            self._writer.abort()
        finally:
            self.tmp_path.unlink(missing_ok=True)


class ShardWriteError(ExportError):
    """Writing a shard failed; names the file and the cause."""
