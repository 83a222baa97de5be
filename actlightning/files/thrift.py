"""The Thrift compact protocol, as Parquet footers and page headers use it, and the parquet.thrift
field ids this package reads and writes. A footer decoded and encoded again is byte-identical."""

from __future__ import annotations

from typing import Any

# Thrift compact protocol type codes.
T_TRUE, T_FALSE, T_BYTE, T_I16, T_I32, T_I64, T_DOUBLE, T_BINARY, T_LIST, T_SET, T_MAP, T_STRUCT = range(1, 13)

# A decoded Thrift struct: field id -> (type code, value). The value's Python type follows the code
# (int, bool, bytes, a nested Struct, or (element type, [values]) for lists), so it is typed Any.
ThriftValue = Any
Struct = dict[int, tuple[int, ThriftValue]]


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


def uvarint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _zigzag(value: int) -> bytes:
    return uvarint((value << 1) ^ (value >> 63))


def _encode_value(out: bytearray, kind: int, value: ThriftValue) -> None:
    if kind == T_BYTE:
        out.append(value)
    elif kind in (T_I16, T_I32, T_I64):
        out += _zigzag(value)
    elif kind == T_DOUBLE:
        out += value
    elif kind == T_BINARY:
        out += uvarint(len(value)) + value
    elif kind in (T_LIST, T_SET):
        element, items = value
        out.append((len(items) << 4 | element) if len(items) < 15 else (0xF0 | element))
        if len(items) >= 15:
            out += uvarint(len(items))
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


def i32(value: int) -> tuple[int, int]:
    return T_I32, value


def i64(value: int) -> tuple[int, int]:
    return T_I64, value


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
