"""Parquet footers: pyarrow's own, decoded to take its schema and its small columns' chunks, and ours,
rebuilt from them with the row groups this package wrote."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.files.thrift import (
    FMD_KEY_VALUE,
    FMD_NUM_ROWS,
    FMD_ROW_GROUPS,
    SE_NAME,
    SE_NUM_CHILDREN,
    T_BINARY,
    T_I32,
    T_LIST,
    T_STRUCT,
    Struct,
    decode_struct,
    encode_struct,
    i64,
)

MAGIC = b"PAR1"


def mini_file(table: pa.Table, options: Mapping[str, object]) -> pa.Buffer:
    """``table`` as a whole Parquet file in memory, one row group, written by pyarrow."""
    sink = pa.BufferOutputStream()
    writer = pq.ParquetWriter(sink, table.schema, **options)
    writer.write_table(table, row_group_size=max(table.num_rows, 1))
    writer.close()
    return sink.getvalue()


def decode_footer(data: pa.Buffer) -> tuple[Struct, int]:
    """(FileMetaData, where the column chunks end) of a whole Parquet file in memory."""
    view = memoryview(data)
    if bytes(view[-4:]) != MAGIC:
        raise ValueError("not a Parquet file")
    chunks_end = len(view) - 8 - int.from_bytes(view[-8:-4], "little")
    return decode_struct(bytes(view[chunks_end:-8])), chunks_end


def leaf_paths(elements: Sequence[Struct]) -> list[list[bytes]]:
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


def encode_footer(template: Struct, rows: int, row_groups: list[Struct], metadata: Mapping[str, str]) -> bytes:
    """The file's tail (footer, its length, the magic): ``template``'s schema and key-value metadata,
    with ``metadata`` replacing or adding keys, over ``row_groups``."""
    footer = dict(template)
    footer[FMD_NUM_ROWS] = i64(rows)
    footer[FMD_ROW_GROUPS] = (T_LIST, (T_STRUCT, row_groups))
    pairs = [
        pair
        for pair in footer.get(FMD_KEY_VALUE, (T_LIST, (T_STRUCT, [])))[1][1]
        if pair[1][1].decode() not in metadata
    ]
    pairs += [{1: (T_BINARY, key.encode()), 2: (T_BINARY, value.encode())} for key, value in metadata.items()]
    footer[FMD_KEY_VALUE] = (T_LIST, (T_STRUCT, pairs))
    encoded = bytearray()
    encode_struct(encoded, footer)
    return bytes(encoded) + len(encoded).to_bytes(4, "little") + MAGIC
