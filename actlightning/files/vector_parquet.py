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


The Thrift codec (``thrift``), the page layout and its compression (``pages``) and the footer
(``footer``) are modules of their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.files.footer import MAGIC, decode_footer, encode_footer, leaf_paths, mini_file
from actlightning.files.pages import ChunkWriter, VectorChunk, VectorLeaf, vector_leaf, vector_values
from actlightning.files.thrift import (
    CC_FILE_OFFSET,
    CC_INDEX_FIELDS,
    CC_META,
    CMD_BLOOM_OFFSET,
    CMD_COMPRESSED,
    CMD_DATA_OFFSET,
    CMD_DICT_OFFSET,
    CMD_INDEX_OFFSET,
    CMD_PATH,
    CMD_UNCOMPRESSED,
    CODECS,
    FMD_ROW_GROUPS,
    FMD_SCHEMA,
    RG_COLUMNS,
    RG_FILE_OFFSET,
    RG_NUM_ROWS,
    RG_TOTAL_BYTES,
    RG_TOTAL_COMPRESSED,
    T_LIST,
    T_STRUCT,
    Struct,
    i64,
)


class _Template:
    """What pyarrow would write for ``schema`` under ``options``: the footer, every leaf column's
    path, each top-level column's leaves (indexes, in file order), and the vector columns' layout."""

    def __init__(self, schema: pa.Schema, options: Mapping[str, object]) -> None:
        data = mini_file(schema.empty_table(), options)
        self.footer, _ = decode_footer(data)
        self.paths = leaf_paths(self.footer[FMD_SCHEMA][1][1])
        self.field_leaves: dict[str, list[int]] = {}
        for index, path in enumerate(self.paths):
            self.field_leaves.setdefault(path[0].decode(), []).append(index)
        parquet_schema = pq.read_metadata(pa.BufferReader(data)).schema
        self.leaves: dict[str, VectorLeaf] = {}
        for field in schema:
            indexes = self.field_leaves[field.name]
            leaf = vector_leaf(field, parquet_schema.column(indexes[0])) if len(indexes) == 1 else None
            if leaf is not None:
                self.leaves[field.name] = leaf


def vector_leaves(schema: pa.Schema, options: Mapping[str, object]) -> dict[str, VectorLeaf]:
    """The columns of ``schema`` the writer encodes itself (when a batch has their shape)."""
    return _Template(schema, options).leaves


class VectorParquetWriter:
    """Writes a Parquet file one row group per ``write_table``; see the module docstring.

    ``options`` are ``pyarrow.parquet.ParquetWriter`` options. The file on disk is complete only
    after ``close``; ``abort`` leaves whatever was written (callers write under a temporary name).
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, options: Mapping[str, object]) -> None:
        self.schema = schema
        self.options = dict(options)
        self._template = _Template(schema, self.options)
        compression = str(self.options.get("compression") or "none")
        codec_id, codec = 0, None
        if compression != "none":
            codec_id, arrow_name = CODECS[compression]
            level = self.options.get("compression_level")
            codec = pa.Codec(arrow_name, compression_level=level) if level is not None else pa.Codec(arrow_name)
        self._chunks = ChunkWriter(self._write, codec, codec_id)
        self._row_groups: list[Struct] = []
        self._rows = 0
        self._extra_metadata: dict[str, str] = {}
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close()/abort()
        self._file.write(MAGIC)
        self._pos = len(MAGIC)

    def _direct_chunks(self, table: pa.Table) -> dict[str, list[VectorChunk]]:
        """The vector columns of ``table`` whose every chunk has the direct shape, with their chunks."""
        direct: dict[str, list[VectorChunk]] = {}
        for name, column in zip(table.column_names, table.columns, strict=True):
            leaf = self._template.leaves.get(name)
            if leaf is not None:
                chunks = [vector_values(chunk, leaf) for chunk in column.chunks if len(chunk)]
                complete = [chunk for chunk in chunks if chunk is not None]
                if len(complete) == len(chunks):
                    direct[name] = complete
        return direct

    def write_table(self, table: pa.Table) -> None:
        """Append ``table`` as one row group."""
        if table.num_rows == 0:
            return
        if not table.schema.equals(self.schema):
            raise ValueError("table schema differs from the file's schema")
        direct = self._direct_chunks(table)
        # pyarrow encodes the other columns into memory; their chunks are copied in schema order.
        rest = [name for name in table.column_names if name not in direct]
        row_group, source, arrow_chunks = self._arrow_row_group(table.select(rest)) if rest else ({}, None, [])
        row_group[RG_NUM_ROWS] = i64(table.num_rows)
        pending = iter(arrow_chunks)
        start_of_group = self._pos
        columns: list[Struct] = []
        for name in table.column_names:
            leaves = self._template.field_leaves[name]
            if name in direct:
                path = self._template.paths[leaves[0]]
                meta = self._write_vector_chunk(path, self._template.leaves[name], direct[name])
                columns.append({CC_FILE_OFFSET: i64(0), CC_META: (T_STRUCT, meta)})
            else:
                columns += [self._copy_chunk(next(pending), source, self._template.paths[i]) for i in leaves]
        metas = [chunk[CC_META][1] for chunk in columns]
        row_group[RG_COLUMNS] = (T_LIST, (T_STRUCT, columns))
        row_group[RG_TOTAL_BYTES] = i64(sum(meta[CMD_UNCOMPRESSED][1] for meta in metas))
        row_group[RG_TOTAL_COMPRESSED] = i64(sum(meta[CMD_COMPRESSED][1] for meta in metas))
        row_group[RG_FILE_OFFSET] = i64(start_of_group)
        self._row_groups.append(row_group)
        self._rows += table.num_rows

    def _arrow_row_group(self, table: pa.Table) -> tuple[Struct, memoryview, list[Struct]]:
        """pyarrow's row group of ``table`` (written into memory), the file's bytes and its column chunks."""
        mini = mini_file(table, self.options)
        footer, chunks_end = decode_footer(mini)
        row_groups = footer[FMD_ROW_GROUPS][1][1]
        if len(row_groups) != 1:
            raise AssertionError(f"expected one row group from pyarrow, got {len(row_groups)}")
        chunks = row_groups[0][RG_COLUMNS][1][1]
        if sum(chunk[CC_META][1][CMD_COMPRESSED][1] for chunk in chunks) != chunks_end - len(MAGIC):
            raise AssertionError("pyarrow's column chunks do not tile its file")
        return row_groups[0], memoryview(mini), chunks

    def _copy_chunk(self, chunk: Struct, source: memoryview | None, path: list[bytes]) -> Struct:
        """Copy one of pyarrow's column chunks from ``source`` into the file, its offsets moved."""
        assert source is not None, "pyarrow wrote the columns this chunk belongs to"
        meta = chunk[CC_META][1]
        if meta[CMD_PATH][1][1] != path:
            raise AssertionError(f"pyarrow's column chunk {meta[CMD_PATH][1][1]} is out of schema order")
        if any(key in chunk for key in CC_INDEX_FIELDS) or CMD_BLOOM_OFFSET in meta:
            raise AssertionError("page indexes and bloom filters are not supported")
        start = meta[CMD_DICT_OFFSET][1] if CMD_DICT_OFFSET in meta else meta[CMD_DATA_OFFSET][1]
        shift = self._pos - start
        self._write(source[start : start + meta[CMD_COMPRESSED][1]])
        for key in (CMD_DATA_OFFSET, CMD_DICT_OFFSET, CMD_INDEX_OFFSET):
            if key in meta:
                meta[key] = i64(meta[key][1] + shift)
        return chunk

    def _write(self, data: bytes | bytearray | memoryview | pa.Buffer) -> int:
        self._file.write(data)
        self._pos += len(data)
        return len(data)

    def _write_vector_chunk(self, path: list[bytes], leaf: VectorLeaf, chunks: list[VectorChunk]) -> Struct:
        """Write one column chunk as DATA_PAGE_V2 pages of whole rows; return its ColumnMetaData."""
        return self._chunks.column_chunk(self._pos, path, leaf, chunks)

    def add_key_value_metadata(self, metadata: Mapping[str, str]) -> None:
        self._extra_metadata.update(metadata)

    def close(self) -> None:
        """Write the footer; the file is a complete Parquet file afterwards."""
        self._write(encode_footer(self._template.footer, self._rows, self._row_groups, self._extra_metadata))
        self._file.close()

    def abort(self) -> None:
        self._file.close()
