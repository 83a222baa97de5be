"""The page layout of a vector column chunk: which columns have the shape written directly, and their
DATA_PAGE_V2 pages of whole rows (levels as a few RLE runs per token, values as the raw buffer).

Compression: each page's values are compressed with Arrow's codec (the levels stay plain, as version-2
pages want); float32 values are byte-stream-split first (the exponent bytes of neighbouring values
then sit together and compress better). 16-bit values are not split: DuckDB 2.0 and polars 2.1 cannot
read BYTE_STREAM_SPLIT on FIXED_LEN_BYTE_ARRAY columns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.files.schema import flat_values, storage_array, storage_type
from actlightning.files.thrift import (
    BYTE_STREAM_SPLIT,
    CMD_CODEC,
    CMD_COMPRESSED,
    CMD_DATA_OFFSET,
    CMD_ENCODING_STATS,
    CMD_ENCODINGS,
    CMD_NUM_VALUES,
    CMD_PATH,
    CMD_TYPE,
    CMD_UNCOMPRESSED,
    DATA_PAGE,
    DATA_PAGE_V2,
    FIXED_LEN_BYTE_ARRAY,
    FLOAT,
    INT32,
    PES_COUNT,
    PES_ENCODING,
    PES_PAGE_TYPE,
    PH_COMPRESSED,
    PH_DATA_PAGE_V2,
    PH_TYPE,
    PH_UNCOMPRESSED,
    PLAIN,
    RLE,
    T_BINARY,
    T_I32,
    T_LIST,
    T_STRUCT,
    T_TRUE,
    V2_DEF_LENGTH,
    V2_ENCODING,
    V2_IS_COMPRESSED,
    V2_NUM_NULLS,
    V2_NUM_ROWS,
    V2_NUM_VALUES,
    V2_REP_LENGTH,
    Struct,
    encode_struct,
    i32,
    i64,
    uvarint,
)

PAGE_BYTES = 1 << 20  # bytes of values per data page (Arrow's default page size); pages hold whole rows
MAX_PAGE_BYTES = (1 << 31) - (1 << 20)  # page sizes are int32 in the page header (with levels)

# One chunk of a vector column: its values (flat), tokens per row, and the vector width.
VectorChunk = tuple[np.ndarray, np.ndarray, int]


def _rle_run(value: int, count: int) -> bytes:
    """One run of the RLE/bit-packed hybrid encoding (levels here are < 256: one value byte)."""
    return uvarint(count << 1) + bytes((value,))


@dataclass(frozen=True)
class VectorLeaf:
    """How a vector column is laid out in Parquet (read from Arrow's own schema conversion)."""

    depth: int  # 2: list<list<x>> (one row per sequence), 1: fixed_size_list<x> (one row per token)
    max_definition: int
    physical_type: int
    value_dtype: np.dtype  # the Arrow buffer's dtype
    stored_dtype: np.dtype  # what PLAIN writes: uint16 is stored as INT32


# (Arrow value type, Parquet physical type) -> (buffer dtype, stored dtype).
_LAYOUTS = {
    (pa.float32(), FLOAT): (np.float32, np.float32),
    (pa.float16(), FIXED_LEN_BYTE_ARRAY): (np.float16, np.float16),
    (pa.binary(2), FIXED_LEN_BYTE_ARRAY): (np.uint16, np.uint16),  # bfloat16 bit patterns
    (pa.uint16(), INT32): (np.uint16, np.int32),
}


def vector_leaf(field: pa.Field, column: pq.ColumnSchema) -> VectorLeaf | None:
    """The direct layout of ``field``, or None when pyarrow should write it."""
    outer = storage_type(field.type)
    # The two shapes this tool writes: list<list<x>> (sequence layout), fixed_size_list<x> (token layout).
    if pa.types.is_list(outer) and pa.types.is_list(outer.value_type):
        depth, kind = 2, outer.value_type.value_type
    elif pa.types.is_fixed_size_list(outer):
        depth, kind = 1, outer.value_type
    else:
        return None
    if column.max_repetition_level != depth or not field.nullable:
        return None
    physical = {"FLOAT": FLOAT, "FIXED_LEN_BYTE_ARRAY": FIXED_LEN_BYTE_ARRAY, "INT32": INT32}.get(column.physical_type)
    dtypes = _LAYOUTS.get((kind, physical)) if physical is not None else None
    if physical is None or dtypes is None or (physical == FIXED_LEN_BYTE_ARRAY and column.length != 2):
        return None
    return VectorLeaf(depth, column.max_definition_level, physical, np.dtype(dtypes[0]), np.dtype(dtypes[1]))


def vector_values(array: pa.Array, leaf: VectorLeaf) -> VectorChunk | None:
    """(values, tokens per row, width) of one chunk without copying, or None if it has another shape."""
    storage = storage_array(array)
    if storage.null_count:
        return None
    if leaf.depth == 1:
        width = storage.type.list_size
        lengths = np.ones(len(storage), dtype=np.int64)
        values = storage.flatten()
    else:
        lengths = storage.value_lengths().to_numpy().astype(np.int64)
        inner = storage.flatten()
        if inner.null_count or len(inner) == 0:
            return None
        widths = inner.value_lengths().to_numpy()
        width = int(widths[0])
        if lengths.min(initial=1) < 1 or (widths != width).any():
            return None
        values = inner.flatten()
    if values.null_count or width < 1:
        return None
    if int(lengths.max(initial=0)) * width * leaf.stored_dtype.itemsize > MAX_PAGE_BYTES:
        return None  # a page holds at least one row, and page sizes are 32-bit
    return flat_values(values).view(leaf.value_dtype), lengths, width


@dataclass
class _Page:
    """One data page: its levels and (possibly compressed) values, and the counts its header holds."""

    rep: bytes
    definition: bytes
    payload: pa.Buffer
    values: int
    rows: int
    raw_bytes: int


class ChunkWriter:
    """Writes one vector column chunk through ``write`` (which appends to the file) and returns its
    ColumnMetaData; ``codec`` compresses page values (None: plain)."""

    def __init__(self, write: Callable[[bytes | bytearray | pa.Buffer], int], codec: pa.Codec | None, codec_id: int):
        self.write, self.codec, self.codec_id = write, codec, codec_id

    def column_chunk(self, offset: int, path: list[bytes], leaf: VectorLeaf, chunks: Sequence[VectorChunk]) -> Struct:
        """Write ``chunks`` as pages of whole rows starting at file ``offset``; return the ColumnMetaData."""
        split = self.codec is not None and leaf.physical_type == FLOAT
        encoding = BYTE_STREAM_SPLIT if split else PLAIN
        written = num_values = pages = uncompressed = 0
        for values, lengths, width in chunks:
            for page in self._pages(leaf, values, lengths, width, split):
                header = self._header(page, encoding)
                for part in (header, page.rep, page.definition, page.payload):
                    written += self.write(part)
                uncompressed += len(header) + len(page.rep) + len(page.definition) + page.raw_bytes
                num_values += page.values
                pages += 1
        stats = {PES_PAGE_TYPE: i32(DATA_PAGE), PES_ENCODING: i32(encoding), PES_COUNT: i32(pages)}
        return {
            CMD_TYPE: i32(leaf.physical_type),
            CMD_ENCODINGS: (T_LIST, (T_I32, [RLE, encoding])),
            CMD_PATH: (T_LIST, (T_BINARY, path)),
            CMD_CODEC: i32(self.codec_id),
            CMD_NUM_VALUES: i64(num_values),
            CMD_UNCOMPRESSED: i64(uncompressed),
            CMD_COMPRESSED: i64(written),
            CMD_DATA_OFFSET: i64(offset),
            CMD_ENCODING_STATS: (T_LIST, (T_STRUCT, [stats])),
        }

    def _pages(self, leaf: VectorLeaf, values: np.ndarray, lengths: np.ndarray, width: int, split: bool):
        """The pages of one chunk: whole rows up to ``PAGE_BYTES`` of values (at least one row)."""
        rep_tail = _rle_run(leaf.depth, width - 1) if width > 1 else b""
        first_token = _rle_run(0, 1) + rep_tail
        next_token = _rle_run(1, 1) + rep_tail
        ends = np.cumsum(lengths * width)
        row = 0
        while row < len(lengths):
            done = ends[row - 1] if row else 0
            stop = max(int(np.searchsorted(ends, done + PAGE_BYTES // leaf.stored_dtype.itemsize, "right")), row + 1)
            page_values = int(ends[stop - 1] - done)
            if leaf.depth == 1:  # one vector per row
                rep = first_token * (stop - row)
            else:
                rep = b"".join(first_token + next_token * (int(n) - 1) for n in lengths[row:stop])
            data = values[done : done + page_values]
            if data.dtype != leaf.stored_dtype:
                data = data.astype(leaf.stored_dtype)
            raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            if split:  # byte k of every value, for k = 0..itemsize-1
                raw = np.ascontiguousarray(raw.reshape(-1, data.itemsize).T).reshape(-1)
            payload = self.codec.compress(raw, asbytes=False) if self.codec is not None else pa.py_buffer(raw)
            definition = _rle_run(leaf.max_definition, page_values)
            yield _Page(rep, definition, payload, page_values, stop - row, data.nbytes)
            row = stop

    def _header(self, page: _Page, encoding: int) -> bytearray:
        levels = len(page.rep) + len(page.definition)
        header = bytearray()
        encode_struct(header, {
            PH_TYPE: i32(DATA_PAGE_V2),
            PH_UNCOMPRESSED: i32(levels + page.raw_bytes),
            PH_COMPRESSED: i32(levels + len(page.payload)),
            PH_DATA_PAGE_V2: (T_STRUCT, {
                V2_NUM_VALUES: i32(page.values), V2_NUM_NULLS: i32(0), V2_NUM_ROWS: i32(page.rows),
                V2_ENCODING: i32(encoding), V2_DEF_LENGTH: i32(len(page.definition)),
                V2_REP_LENGTH: i32(len(page.rep)), V2_IS_COMPRESSED: (T_TRUE, self.codec is not None),
            }),
        })  # fmt: skip
        return header
