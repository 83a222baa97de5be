"""A Parquet file writer whose vector columns are written straight from their buffers.

Why: Arrow's Parquet writer handles a ``list<list<float16>>`` value by value (repetition and
definition levels, level histograms, one ``memcpy`` per FIXED_LEN_BYTE_ARRAY value), which caps it
near 60 million values per second per core (~120 MB/s of float16) whatever the options; on a GPU
box that, not the forward pass, is the wall. Our vector columns have a shape Arrow does not
exploit: no nulls and every inner list the same width. Their levels are then a few RLE runs per
token and their values are the raw little-endian buffer, so a page costs one ``write`` of memory
that is already laid out.

How: the schema, the Arrow and HF metadata and the footer's other fields come from an empty file
pyarrow writes first. For each row group, pyarrow writes the other columns (ids, tokens, labels of
any type) into memory; their chunks are copied with their offsets moved, the vector chunks are
written here, in schema order, and at the end the footer is rebuilt from Arrow's own, decoded and
encoded again with the Thrift compact protocol. A vector column that does not have that shape in
some batch (nulls, ragged widths, a row over 2 GiB), or any column when compression is on, is left
to pyarrow.

Compression: each page's values are compressed with Arrow's codec (the levels stay plain, as version-2
pages want); float32 values are byte-stream-split first (the exponent bytes of neighbouring values
then sit together and compress better). 16-bit values are not split: DuckDB 2.0 and polars 2.1 cannot
read BYTE_STREAM_SPLIT on FIXED_LEN_BYTE_ARRAY columns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.schema import flat_values, storage_array, storage_type

MAGIC = b"PAR1"
PAGE_BYTES = 1 << 20  # bytes of values per data page (Arrow's default page size); pages hold whole rows
MAX_PAGE_BYTES = (1 << 31) - (1 << 20)  # page sizes are int32 in the page header (with levels)

# Thrift compact protocol type codes.
T_TRUE, T_FALSE, T_BYTE, T_I16, T_I32, T_I64, T_DOUBLE, T_BINARY, T_LIST, T_SET, T_MAP, T_STRUCT = range(1, 13)

# A decoded Thrift struct: field id -> (type code, value). The value's Python type follows the code
# (int, bool, bytes, a nested Struct, or (element type, [values]) for lists), so it is typed Any.
ThriftValue = Any
Struct = dict[int, tuple[int, ThriftValue]]


# --- Thrift compact protocol ---------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def value(self, kind: int) -> ThriftValue:
        if kind in (T_TRUE, T_FALSE):
            return kind == T_TRUE
        if kind == T_BYTE:
            self.pos += 1
            return self.data[self.pos - 1]
        if kind in (T_I16, T_I32, T_I64):
            return self.zigzag()
        if kind == T_DOUBLE:
            self.pos += 8
            return self.data[self.pos - 8 : self.pos]
        if kind == T_BINARY:
            size = self.varint()
            self.pos += size
            return bytes(self.data[self.pos - size : self.pos])
        if kind in (T_LIST, T_SET):
            header = self.data[self.pos]
            self.pos += 1
            size, element = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            if element in (T_TRUE, T_FALSE):
                raise ValueError("Thrift lists of booleans do not occur in Parquet footers")
            return element, [self.value(element) for _ in range(size)]
        if kind == T_STRUCT:
            return self.struct()
        raise ValueError(f"Thrift type {kind} does not occur in Parquet footers")

    def struct(self) -> Struct:
        fields: Struct = {}
        last = 0
        while True:
            header = self.data[self.pos]
            self.pos += 1
            if header == 0:
                return fields
            delta, kind = header >> 4, header & 0x0F
            field_id = last + delta if delta else self.zigzag()
            fields[field_id] = (T_TRUE if kind == T_FALSE else kind, self.value(kind))
            last = field_id


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _zigzag(value: int) -> bytes:
    return _uvarint((value << 1) ^ (value >> 63))


def _encode_value(out: bytearray, kind: int, value: ThriftValue) -> None:
    if kind == T_BYTE:
        out.append(value)
    elif kind in (T_I16, T_I32, T_I64):
        out += _zigzag(value)
    elif kind == T_DOUBLE:
        out += value
    elif kind == T_BINARY:
        out += _uvarint(len(value)) + value
    elif kind in (T_LIST, T_SET):
        element, items = value
        out.append((len(items) << 4 | element) if len(items) < 15 else (0xF0 | element))
        if len(items) >= 15:
            out += _uvarint(len(items))
        for item in items:
            _encode_value(out, element, item)
    elif kind == T_STRUCT:
        encode_struct(out, value)
    else:
        raise ValueError(f"cannot encode Thrift type {kind}")


def encode_struct(out: bytearray, fields: Struct) -> None:
    """Append ``fields`` (field ids in ascending order, as Thrift writes them) and a stop byte."""
    last = 0
    for field_id in sorted(fields):
        kind, value = fields[field_id]
        wire = (T_TRUE if value else T_FALSE) if kind == T_TRUE else kind
        delta = field_id - last
        if 0 < delta <= 15:
            out.append(delta << 4 | wire)
        else:
            out.append(wire)
            out += _zigzag(field_id)
        if kind != T_TRUE:
            _encode_value(out, kind, value)
        last = field_id
    out.append(0)


def decode_struct(data: bytes) -> Struct:
    return _Reader(data).struct()


def _i32(value: int) -> tuple[int, int]:
    return T_I32, value


def _i64(value: int) -> tuple[int, int]:
    return T_I64, value


# --- Parquet pieces ------------------------------------------------------------------------------

# parquet.thrift: physical types, encodings, codecs, page types, field ids used below.
FLOAT, FIXED_LEN_BYTE_ARRAY, INT32 = 4, 7, 1
PLAIN, RLE, BYTE_STREAM_SPLIT = 0, 3, 9
# Our codec names -> (Parquet CompressionCodec, Arrow codec name). "lz4" is Parquet's LZ4_RAW, as
# pyarrow writes it.
CODECS = {"snappy": (1, "snappy"), "zstd": (6, "zstd"), "lz4": (7, "lz4_raw")}
DATA_PAGE, DATA_PAGE_V2 = 0, 3
# FileMetaData
FMD_SCHEMA, FMD_NUM_ROWS, FMD_ROW_GROUPS, FMD_KEY_VALUE = 2, 3, 4, 5
# SchemaElement
SE_NAME, SE_NUM_CHILDREN = 4, 5
# RowGroup
RG_COLUMNS, RG_TOTAL_BYTES, RG_NUM_ROWS, RG_FILE_OFFSET, RG_TOTAL_COMPRESSED = 1, 2, 3, 5, 6
# ColumnChunk
CC_FILE_OFFSET, CC_META = 2, 3
CC_INDEX_FIELDS = (4, 5, 6, 7)  # offset/column index: never written (write_page_index is off)
# ColumnMetaData
CMD_TYPE, CMD_ENCODINGS, CMD_PATH, CMD_CODEC, CMD_NUM_VALUES = 1, 2, 3, 4, 5
CMD_UNCOMPRESSED, CMD_COMPRESSED, CMD_DATA_OFFSET, CMD_INDEX_OFFSET, CMD_DICT_OFFSET = 6, 7, 9, 10, 11
CMD_ENCODING_STATS, CMD_BLOOM_OFFSET = 13, 14
# PageEncodingStats
PES_PAGE_TYPE, PES_ENCODING, PES_COUNT = 1, 2, 3
# PageHeader
PH_TYPE, PH_UNCOMPRESSED, PH_COMPRESSED, PH_DATA_PAGE_V2 = 1, 2, 3, 8
# DataPageHeaderV2
V2_NUM_VALUES, V2_NUM_NULLS, V2_NUM_ROWS, V2_ENCODING, V2_DEF_LENGTH, V2_REP_LENGTH, V2_IS_COMPRESSED = range(1, 8)


def _rle_run(value: int, count: int) -> bytes:
    """One run of the RLE/bit-packed hybrid encoding (levels here are < 256: one value byte)."""
    return _uvarint(count << 1) + bytes((value,))


@dataclass(frozen=True)
class _VectorLeaf:
    """How a vector column is laid out in Parquet (read from Arrow's own schema conversion)."""

    depth: int  # 2: list<list<x>> (one row per sequence), 1: fixed_size_list<x> (one row per token)
    max_definition: int
    physical_type: int
    value_dtype: np.dtype  # the Arrow buffer's dtype
    stored_dtype: np.dtype  # what PLAIN writes: uint16 is stored as INT32


def _vector_leaf(field: pa.Field, column: pq.ColumnSchema) -> _VectorLeaf | None:
    """The fast layout of ``field``, or None when pyarrow should write it."""
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
    if physical is None:
        return None
    layouts = {
        (pa.float32(), FLOAT): (np.float32, np.float32),
        (pa.float16(), FIXED_LEN_BYTE_ARRAY): (np.float16, np.float16),
        (pa.binary(2), FIXED_LEN_BYTE_ARRAY): (np.uint16, np.uint16),  # bfloat16 bit patterns
        (pa.uint16(), INT32): (np.uint16, np.int32),
    }
    dtypes = layouts.get((kind, physical))
    if dtypes is None or (physical == FIXED_LEN_BYTE_ARRAY and column.length != 2):
        return None
    return _VectorLeaf(depth, column.max_definition_level, physical, np.dtype(dtypes[0]), np.dtype(dtypes[1]))


def _leaf_paths(elements: Sequence[Struct]) -> list[list[bytes]]:
    """The path of every leaf column, in file order, from Parquet's flattened schema tree.

    (Names may hold dots, so pyarrow's dotted paths cannot be split.)
    """
    paths: list[list[bytes]] = []

    def subtree(position: int, prefix: list[bytes]) -> int:  # -> position after the subtree
        path = [*prefix, elements[position][SE_NAME][1]]
        children = elements[position].get(SE_NUM_CHILDREN, (T_I32, None))[1]
        if children is None:
            paths.append(path)
            return position + 1
        position += 1
        for _ in range(children):
            position = subtree(position, path)
        return position

    position = 1
    for _ in range(elements[0][SE_NUM_CHILDREN][1]):
        position = subtree(position, [])
    return paths


def _vector_values(array: pa.Array, leaf: _VectorLeaf) -> tuple[np.ndarray, np.ndarray, int] | None:
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


class VectorParquetWriter:
    """Writes a Parquet file one row group per ``write_table``; see the module docstring.

    ``options`` are ``pyarrow.parquet.ParquetWriter`` options. The file on disk is complete only
    after ``close``; ``abort`` leaves whatever was written (callers write under a temporary name).
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, options: Mapping[str, object]) -> None:
        self.schema = schema
        self.options = dict(options)
        template = self._mini_file(schema.empty_table())
        self._footer, _ = self._decode_footer(template)
        parquet_schema = pq.read_metadata(pa.BufferReader(template)).schema
        self._paths = _leaf_paths(self._footer[FMD_SCHEMA][1][1])
        # Top-level column -> its leaf columns' indexes, in file order.
        self._field_leaves: dict[str, list[int]] = {}
        for index, leaf_path in enumerate(self._paths):
            self._field_leaves.setdefault(leaf_path[0].decode(), []).append(index)
        compression = str(self.options.get("compression") or "none")
        self._codec_id: int = 0
        self._codec: pa.Codec | None = None
        if compression != "none":
            self._codec_id, arrow_name = CODECS[compression]
            level = self.options.get("compression_level")
            self._codec = pa.Codec(arrow_name, compression_level=level) if level is not None else pa.Codec(arrow_name)
        self._leaves: dict[str, _VectorLeaf] = {}
        for field in schema:
            indexes = self._field_leaves[field.name]
            leaf = _vector_leaf(field, parquet_schema.column(indexes[0])) if len(indexes) == 1 else None
            if leaf is not None:
                self._leaves[field.name] = leaf
        self._row_groups: list[Struct] = []
        self._rows = 0
        self._extra_metadata: dict[str, str] = {}
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._file.write(MAGIC)
        self._pos = len(MAGIC)

    @property
    def fast_columns(self) -> list[str]:
        """Columns whose chunks this writer encodes itself (when a batch has their shape)."""
        return list(self._leaves)

    def _mini_file(self, table: pa.Table) -> pa.Buffer:
        sink = pa.BufferOutputStream()
        writer = pq.ParquetWriter(sink, table.schema, **self.options)
        writer.write_table(table, row_group_size=max(table.num_rows, 1))
        writer.close()
        return sink.getvalue()

    @staticmethod
    def _decode_footer(data: pa.Buffer) -> tuple[Struct, int]:
        """(FileMetaData, where the column chunks end) of a whole Parquet file in memory."""
        view = memoryview(data)
        if bytes(view[-4:]) != MAGIC:
            raise ValueError("not a Parquet file")
        chunks_end = len(view) - 8 - int.from_bytes(view[-8:-4], "little")
        return decode_struct(bytes(view[chunks_end:-8])), chunks_end

    def write_table(self, table: pa.Table) -> None:
        """Append ``table`` as one row group."""
        if table.num_rows == 0:
            return
        if not table.schema.equals(self.schema):
            raise ValueError("table schema differs from the file's schema")
        fast: dict[str, list[tuple[np.ndarray, np.ndarray, int]]] = {}
        for name, column in zip(table.column_names, table.columns, strict=True):
            if name in self._leaves:
                chunks = [_vector_values(chunk, self._leaves[name]) for chunk in column.chunks if len(chunk)]
                complete = [chunk for chunk in chunks if chunk is not None]
                if len(complete) == len(chunks):
                    fast[name] = complete
        # pyarrow encodes the other columns into memory; their chunks are copied in schema order.
        row_group: Struct = {RG_NUM_ROWS: _i64(table.num_rows)}
        arrow_chunks: list[Struct] = []
        rest = [name for name in table.column_names if name not in fast]
        if rest:
            mini = self._mini_file(table.select(rest))
            source = memoryview(mini)
            footer, chunks_end = self._decode_footer(mini)
            row_groups = footer[FMD_ROW_GROUPS][1][1]
            if len(row_groups) != 1:
                raise AssertionError(f"expected one row group from pyarrow, got {len(row_groups)}")
            row_group = row_groups[0]
            arrow_chunks = row_group[RG_COLUMNS][1][1]
            if sum(chunk[CC_META][1][CMD_COMPRESSED][1] for chunk in arrow_chunks) != chunks_end - len(MAGIC):
                raise AssertionError("pyarrow's column chunks do not tile its file")
        pending = iter(arrow_chunks)
        start_of_group = self._pos
        columns: list[Struct] = []
        for name in table.column_names:
            if name in fast:
                path = self._paths[self._field_leaves[name][0]]
                meta = self._write_vector_chunk(path, self._leaves[name], fast[name])
                columns.append({CC_FILE_OFFSET: _i64(0), CC_META: (T_STRUCT, meta)})
                continue
            for index in self._field_leaves[name]:
                chunk = next(pending)
                meta = chunk[CC_META][1]
                if meta[CMD_PATH][1][1] != self._paths[index]:
                    raise AssertionError(f"pyarrow's column chunk {meta[CMD_PATH][1][1]} is out of schema order")
                if any(key in chunk for key in CC_INDEX_FIELDS) or CMD_BLOOM_OFFSET in meta:
                    raise AssertionError("page indexes and bloom filters are not supported")
                start = meta[CMD_DICT_OFFSET][1] if CMD_DICT_OFFSET in meta else meta[CMD_DATA_OFFSET][1]
                shift = self._pos - start
                self._write(source[start : start + meta[CMD_COMPRESSED][1]])
                for key in (CMD_DATA_OFFSET, CMD_DICT_OFFSET, CMD_INDEX_OFFSET):
                    if key in meta:
                        meta[key] = _i64(meta[key][1] + shift)
                columns.append(chunk)
        metas = [chunk[CC_META][1] for chunk in columns]
        row_group[RG_COLUMNS] = (T_LIST, (T_STRUCT, columns))
        row_group[RG_TOTAL_BYTES] = _i64(sum(meta[CMD_UNCOMPRESSED][1] for meta in metas))
        row_group[RG_TOTAL_COMPRESSED] = _i64(sum(meta[CMD_COMPRESSED][1] for meta in metas))
        row_group[RG_FILE_OFFSET] = _i64(start_of_group)
        self._row_groups.append(row_group)
        self._rows += table.num_rows

    def _write(self, data: bytes | bytearray | memoryview | pa.Buffer) -> None:
        self._file.write(data)
        self._pos += len(data)

    def _write_vector_chunk(
        self, path: list[bytes], leaf: _VectorLeaf, chunks: Sequence[tuple[np.ndarray, np.ndarray, int]]
    ) -> Struct:
        """Write one column chunk as DATA_PAGE_V2 pages of whole rows; return its ColumnMetaData."""
        first_offset = self._pos
        num_values = pages = uncompressed_total = 0
        split = self._codec is not None and leaf.physical_type == FLOAT
        encoding = BYTE_STREAM_SPLIT if split else PLAIN
        for values, lengths, width in chunks:
            rep_tail = _rle_run(leaf.depth, width - 1) if width > 1 else b""
            first_token = _rle_run(0, 1) + rep_tail
            next_token = _rle_run(1, 1) + rep_tail
            row_values = lengths * width
            ends = np.cumsum(row_values)
            row = 0
            while row < len(lengths):
                # Whole rows up to PAGE_BYTES of values (at least one row).
                done = ends[row - 1] if row else 0
                stop = max(
                    int(np.searchsorted(ends, done + PAGE_BYTES // leaf.stored_dtype.itemsize, "right")), row + 1
                )
                page_values = int(ends[stop - 1] - done)
                if leaf.depth == 1:  # one vector per row
                    rep = first_token * (stop - row)
                else:
                    rep = b"".join(first_token + next_token * (int(n) - 1) for n in lengths[row:stop])
                definition = _rle_run(leaf.max_definition, page_values)
                data = values[done : done + page_values]
                if data.dtype != leaf.stored_dtype:
                    data = data.astype(leaf.stored_dtype)
                raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
                if split:  # byte k of every value, for k = 0..itemsize-1
                    raw = np.ascontiguousarray(raw.reshape(-1, data.itemsize).T).reshape(-1)
                payload: pa.Buffer = (
                    self._codec.compress(raw, asbytes=False) if self._codec is not None else pa.py_buffer(raw)
                )
                levels = len(rep) + len(definition)
                header = bytearray()
                encode_struct(header, {
                    PH_TYPE: _i32(DATA_PAGE_V2),
                    PH_UNCOMPRESSED: _i32(levels + data.nbytes),
                    PH_COMPRESSED: _i32(levels + len(payload)),
                    PH_DATA_PAGE_V2: (T_STRUCT, {
                        V2_NUM_VALUES: _i32(page_values), V2_NUM_NULLS: _i32(0), V2_NUM_ROWS: _i32(stop - row),
                        V2_ENCODING: _i32(encoding), V2_DEF_LENGTH: _i32(len(definition)),
                        V2_REP_LENGTH: _i32(len(rep)), V2_IS_COMPRESSED: (T_TRUE, self._codec is not None),
                    }),
                })  # fmt: skip
                self._write(header)
                self._write(rep)
                self._write(definition)
                self._write(payload)
                uncompressed_total += len(header) + levels + data.nbytes
                num_values += page_values
                pages += 1
                row = stop
        total = self._pos - first_offset
        stats = {PES_PAGE_TYPE: _i32(DATA_PAGE), PES_ENCODING: _i32(encoding), PES_COUNT: _i32(pages)}
        return {
            CMD_TYPE: _i32(leaf.physical_type),
            CMD_ENCODINGS: (T_LIST, (T_I32, [RLE, encoding])),
            CMD_PATH: (T_LIST, (T_BINARY, path)),
            CMD_CODEC: _i32(self._codec_id),
            CMD_NUM_VALUES: _i64(num_values),
            CMD_UNCOMPRESSED: _i64(uncompressed_total),
            CMD_COMPRESSED: _i64(total),
            CMD_DATA_OFFSET: _i64(first_offset),
            CMD_ENCODING_STATS: (T_LIST, (T_STRUCT, [stats])),
        }

    def add_key_value_metadata(self, metadata: Mapping[str, str]) -> None:
        self._extra_metadata.update(metadata)

    def close(self) -> None:
        """Write the footer; the file is a complete Parquet file afterwards."""
        footer = dict(self._footer)
        footer[FMD_NUM_ROWS] = _i64(self._rows)
        footer[FMD_ROW_GROUPS] = (T_LIST, (T_STRUCT, self._row_groups))
        pairs = [
            pair
            for pair in footer.get(FMD_KEY_VALUE, (T_LIST, (T_STRUCT, [])))[1][1]
            if pair[1][1].decode() not in self._extra_metadata
        ]
        pairs += [
            {1: (T_BINARY, key.encode()), 2: (T_BINARY, value.encode())} for key, value in self._extra_metadata.items()
        ]
        footer[FMD_KEY_VALUE] = (T_LIST, (T_STRUCT, pairs))
        encoded = bytearray()
        encode_struct(encoded, footer)
        self._write(bytes(encoded) + len(encoded).to_bytes(4, "little") + MAGIC)
        self._file.close()

    def abort(self) -> None:
        self._file.close()
