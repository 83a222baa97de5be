"""The direct vector-column Parquet writer: files equal to pyarrow's, whatever the shape, else fallback."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import List, Value

from actlightning.contracts import Prediction
from actlightning.files import pages
from actlightning.files.schema import build_features, build_schema
from actlightning.files.shard_file import ShardFile, parquet_options
from actlightning.files.tables import batch_to_table
from actlightning.files.thrift import decode_struct, encode_struct
from actlightning.files.vector_parquet import VectorParquetWriter, vector_leaves

WIDTHS = {"layer_0": 7, "layer_2": 1, "hook_blocks.0.mlp": 33}


def _batches(dtype: str, layout: str, seed: int = 0, count: int = 3) -> tuple[pa.Schema, list[pa.Table]]:
    """``count`` predicted batches with random lengths (1 included), string labels with a null."""
    rng = np.random.default_rng(seed)
    # A struct label between the base and vector columns: several leaves to keep in order.
    labels = {"Site": Value("string"), "Meta": {"elo": Value("int64"), "tags": List(Value("string"))}}
    schema = build_schema(build_features(WIDTHS, dtype, labels, layout), dtype)
    tables = []
    for index in range(count):
        lengths = torch.tensor([1, *rng.integers(1, 50, size=4)])
        tokens = int(lengths.sum())
        prediction = Prediction(
            example_id=torch.arange(5) + 10 * index,
            n_tokens=lengths,
            start_position=torch.tensor(rng.integers(0, 9, size=5), dtype=torch.int32),
            input_ids=torch.tensor(rng.integers(0, 90, size=tokens), dtype=torch.int32),
            vectors={name: torch.randn(tokens, width).to(getattr(torch, dtype)) for name, width in WIDTHS.items()},
            max_abs=torch.zeros(len(WIDTHS)),
        )
        meta = [{"elo": 1200 + i, "tags": ["x"] * i} for i in range(4)] + [None]
        labels = pa.table(
            {"Site": pa.array(["a", None, "ccc", "", "e"]), "Meta": pa.array(meta, schema.field("Meta").type)}
        )
        tables.append(batch_to_table(prediction, schema, labels, layout))
    return schema, tables


def _count_direct_chunks(monkeypatch) -> list:
    """A list that grows by one each time a vector column chunk is written directly."""
    calls = []
    original = VectorParquetWriter._write_vector_chunk
    monkeypatch.setattr(
        VectorParquetWriter, "_write_vector_chunk", lambda self, *a: calls.append(1) or original(self, *a)
    )
    return calls


def _write_both(tmp_path, schema, tables, compression="none"):
    options = parquet_options(schema, compression, list(WIDTHS))
    writer = VectorParquetWriter(tmp_path / "direct.parquet", schema, options)
    for table in tables:
        writer.write_table(table)
    writer.add_key_value_metadata({"actlightning": '{"shard_index": 3}'})
    writer.close()
    reference = pq.ParquetWriter(tmp_path / "arrow.parquet", schema, **options)
    for table in tables:
        reference.write_table(table, row_group_size=table.num_rows)
    reference.close()
    return writer, pq.read_table(tmp_path / "direct.parquet"), pq.read_table(tmp_path / "arrow.parquet")


@pytest.mark.parametrize("layout", ["sequence", "token"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_direct_file_reads_back_equal_to_pyarrows(tmp_path, monkeypatch, dtype, layout):
    monkeypatch.setattr(pages, "PAGE_BYTES", 512)  # many pages per column chunk, rows never split
    chunks = _count_direct_chunks(monkeypatch)
    schema, tables = _batches(dtype, layout)
    writer, direct, arrow = _write_both(tmp_path, schema, tables)
    assert list(vector_leaves(schema, writer.options)) == list(WIDTHS)
    assert len(chunks) == len(WIDTHS) * len(tables), "every vector chunk went the direct way"
    assert direct.schema.equals(schema)
    assert [f.metadata for f in direct.schema] == [f.metadata for f in schema]  # bfloat16 marker etc.
    assert direct.equals(arrow)
    assert direct.equals(pa.concat_tables(tables))
    metadata = pq.read_metadata(tmp_path / "direct.parquet")
    assert metadata.num_row_groups == len(tables)
    assert metadata.metadata[b"actlightning"] == b'{"shard_index": 3}'
    assert b"huggingface" in metadata.metadata and b"ARROW:schema" in metadata.metadata
    # Row groups are addressable on their own (offsets were moved correctly).
    for index, table in enumerate(tables):
        assert pq.ParquetFile(tmp_path / "direct.parquet").read_row_group(index).equals(table)


@pytest.mark.parametrize("layout", ["sequence", "token"])
def test_chunked_and_permuted_tables_are_written_exactly(tmp_path, monkeypatch, layout):
    """The shuffle buffer writes ``concat_tables(...).take(...)``: several chunks, rows permuted."""
    schema, tables = _batches("float16", layout, seed=1)
    table = pa.concat_tables(tables)
    table = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    table = pa.concat_tables([table.slice(0, 7), table.slice(7, 0), table.slice(7)])  # an empty chunk too
    assert table.column("layer_0").num_chunks == 3
    chunks = _count_direct_chunks(monkeypatch)
    _, direct, arrow = _write_both(tmp_path, schema, [table])
    assert len(chunks) == len(WIDTHS)
    assert direct.equals(arrow) and direct.equals(table)


def test_other_shapes_fall_back_to_pyarrow(tmp_path, monkeypatch):
    # A null vector and a ragged list<list<float32>>: pyarrow writes that column, for that batch only.
    schema = pa.schema([("example_id", pa.int64()), ("layer_0", pa.list_(pa.list_(pa.float32())))])
    good = pa.table({"example_id": [0, 1], "layer_0": [[[1.0, 2.0]], [[3.0, 4.0], [5.0, 6.0]]]}, schema=schema)
    null = pa.table({"example_id": [2, 3], "layer_0": [None, [[7.0, 8.0]]]}, schema=schema)
    ragged = pa.table({"example_id": [4], "layer_0": [[[1.0], [2.0, 3.0]]]}, schema=schema)
    empty_row = pa.table({"example_id": [5], "layer_0": [[]]}, schema=schema)
    options = {"compression": "none", "data_page_version": "2.0"}
    writer = VectorParquetWriter(tmp_path / "mixed.parquet", schema, options)
    assert list(vector_leaves(schema, options)) == ["layer_0"]
    for table in (good, null, ragged, empty_row):
        writer.write_table(table)
    writer.close()
    assert pq.read_table(tmp_path / "mixed.parquet").equals(pa.concat_tables([good, null, ragged, empty_row]))

    # A row too large for one 32-bit page goes to pyarrow, which may split it.
    monkeypatch.setattr(pages, "MAX_PAGE_BYTES", 12)
    big = pa.table({"example_id": [6], "layer_0": [[[1.0, 2.0], [3.0, 4.0]]]}, schema=schema)  # 16 bytes
    small = pa.table({"example_id": [7, 8], "layer_0": [[[1.0, 2.0]], [[5.0, 6.0]]]}, schema=schema)  # 8 bytes a row
    direct = _count_direct_chunks(monkeypatch)
    writer = VectorParquetWriter(tmp_path / "big.parquet", schema, options)
    writer.write_table(big)
    writer.write_table(small)
    writer.close()
    assert len(direct) == 1, "only the small rows were written directly"
    assert pq.read_table(tmp_path / "big.parquet").equals(pa.concat_tables([big, small]))

    # Shapes this tool does not write stay with pyarrow.
    shapes = pa.schema(
        [("a", pa.list_(pa.list_(pa.float32(), 2))), ("b", pa.list_(pa.float32(), 2)), ("c", pa.list_(pa.float16()))]
    )
    table = pa.table({"a": [[[1.0, 2.0]]], "b": [[3.0, 4.0]], "c": [[5.0]]}, schema=shapes)
    writer = VectorParquetWriter(tmp_path / "shapes.parquet", shapes, options)
    assert list(vector_leaves(shapes, options)) == ["b"]
    writer.write_table(table)
    writer.close()
    assert pq.read_table(tmp_path / "shapes.parquet").equals(table)

    # Nothing but vector columns: no pyarrow chunks in the row group at all.
    only = pa.schema([("layer_0", pa.list_(pa.list_(pa.float32())))])
    writer = VectorParquetWriter(tmp_path / "only.parquet", only, options)
    writer.write_table(good.select(["layer_0"]))
    writer.close()
    assert pq.read_table(tmp_path / "only.parquet").equals(good.select(["layer_0"]))


def test_thrift_footer_reencodes_byte_for_byte(tmp_path):
    schema, tables = _batches("float16", "sequence")
    _write_both(tmp_path, schema, tables)
    for name in ("arrow.parquet", "direct.parquet"):
        data = (tmp_path / name).read_bytes()
        size = int.from_bytes(data[-8:-4], "little")
        footer = data[-8 - size : -8]
        encoded = bytearray()
        encode_struct(encoded, decode_struct(footer))
        assert bytes(encoded) == footer


def _random_struct(rng: np.random.Generator, depth: int = 0) -> dict:
    """A random Thrift struct of every type the codec handles (no booleans inside lists: Parquet has none)."""
    from actlightning.files.thrift import (
        T_BINARY,
        T_BYTE,
        T_DOUBLE,
        T_I16,
        T_I32,
        T_I64,
        T_LIST,
        T_STRUCT,
        T_TRUE,
    )

    def value(kind: int):
        if kind == T_TRUE:
            return bool(rng.integers(2))
        if kind == T_BYTE:
            return int(rng.integers(0, 256))
        if kind in (T_I16, T_I32, T_I64):
            bits = {T_I16: 15, T_I32: 31, T_I64: 63}[kind]
            return int(rng.integers(-(2**bits), 2**bits - 1, dtype=np.int64))
        if kind == T_DOUBLE:
            return rng.bytes(8)
        if kind == T_BINARY:
            return rng.bytes(int(rng.integers(0, 40)))
        if kind == T_LIST:
            element = int(rng.choice([T_BYTE, T_I32, T_I64, T_BINARY] + ([T_STRUCT] if depth < 2 else [])))
            count = int(rng.choice([0, 3, 14, 15, 40]))  # short and long list headers
            return element, [value(element) for _ in range(count)]
        return _random_struct(rng, depth + 1)

    kinds = [T_TRUE, T_BYTE, T_I16, T_I32, T_I64, T_DOUBLE, T_BINARY, T_LIST] + ([T_STRUCT] if depth < 2 else [])
    ids = np.cumsum(rng.choice([1, 2, 15, 16, 300], size=int(rng.integers(0, 8))))  # short and long field headers
    return {int(i): (int(k), value(int(k))) for i, k in zip(ids, rng.choice(kinds, size=len(ids)), strict=True)}


def test_thrift_codec_round_trips_random_structs():
    rng = np.random.default_rng(7)
    for _ in range(300):
        struct = _random_struct(rng)
        encoded = bytearray()
        encode_struct(encoded, struct)
        assert decode_struct(bytes(encoded)) == struct
        again = bytearray()
        encode_struct(again, decode_struct(bytes(encoded)))
        assert again == encoded


def test_write_error_in_a_vector_page_removes_the_partial_shard(tmp_path):
    """A real write failure (the file-size limit: EFBIG, as a full disk gives ENOSPC) while vector pages
    are written raises, and aborting leaves no file behind."""
    import resource
    import signal

    schema, tables = _batches("float16", "sequence")
    shard = ShardFile(tmp_path, 0, 0, schema, parquet_options(schema, "none", list(WIDTHS)))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Past 16 kB of file, writes fail: inside the first row group's vector pages.
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, limits[1]))
    try:
        with pytest.raises(OSError):
            for table in tables:
                shard.write(table, 10, 1)
            shard.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    shard.abort()
    assert list(tmp_path.iterdir()) == []


def _duckdb_column(path, name: str, layout: str, dtype: str) -> np.ndarray:
    import duckdb

    rows = duckdb.sql(f"SELECT \"{name}\" FROM read_parquet('{path}')").fetchall()
    values = [v for (row,) in rows for v in (row if layout == "token" else [x for token in row for x in token])]
    if dtype == "bfloat16":  # 2-byte binaries (BLOB): the raw bit patterns
        return np.frombuffer(b"".join(values), dtype=np.uint16)
    return np.asarray(values, dtype=np.float32)


def _polars_column(path, name: str, layout: str, dtype: str) -> np.ndarray:
    import polars as pl

    series = pl.read_parquet(path, columns=[name])[name]
    if series.dtype.is_extension():  # HF's Array2D: read its storage
        series = series.ext.storage()
    flat = series.explode().explode() if layout == "sequence" else series.explode()
    if layout == "token" and flat.dtype.is_nested():
        flat = flat.explode()
    if dtype == "bfloat16":
        return np.frombuffer(b"".join(flat.to_list()), dtype=np.uint16)
    return flat.cast(pl.Float32).to_numpy()


def _exported(tables: list[pa.Table], name: str, dtype: str) -> np.ndarray:
    from actlightning.read.reader import column_vectors

    vectors, _ = column_vectors(pa.concat_tables(tables).column(name))
    return vectors.reshape(-1) if dtype == "bfloat16" else vectors.reshape(-1).astype(np.float32)


@pytest.mark.parametrize("codec", ["none", "zstd", "lz4", "snappy"])
@pytest.mark.parametrize("layout", ["sequence", "token"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_independent_readers_read_every_dtype_layout_and_codec(tmp_path, monkeypatch, dtype, layout, codec):
    """pyarrow, DuckDB and polars read the direct writer's files bit for bit (values compared exactly)."""
    monkeypatch.setattr(pages, "PAGE_BYTES", 512)  # several compressed pages per chunk
    chunks = _count_direct_chunks(monkeypatch)
    schema, tables = _batches(dtype, layout)
    writer, direct, arrow = _write_both(tmp_path, schema, tables, compression=codec)
    assert len(chunks) == len(WIDTHS) * len(tables), "compressed or not, vectors go the direct way"
    assert direct.equals(arrow) and direct.equals(pa.concat_tables(tables))
    path = tmp_path / "direct.parquet"
    metadata = pq.read_metadata(path)
    vector_chunk = next(
        metadata.row_group(0).column(i)
        for i in range(metadata.num_columns)
        if metadata.row_group(0).column(i).path_in_schema.startswith("layer_0")
    )
    assert vector_chunk.compression == (
        "UNCOMPRESSED" if codec == "none" else {"zstd": "ZSTD", "lz4": "LZ4", "snappy": "SNAPPY"}[codec]
    )
    if codec != "none" and dtype == "float32":
        assert "BYTE_STREAM_SPLIT" in vector_chunk.encodings
    for name in WIDTHS:
        expected = _exported(tables, name, dtype)
        for read in (_duckdb_column, _polars_column):
            got = read(path, name, layout, dtype)
            assert got.dtype == expected.dtype and np.array_equal(got, expected, equal_nan=True), (read.__name__, name)


def test_bfloat16_takes_two_bytes_a_value_on_disk(tmp_path):
    sizes = {}
    for dtype in ("float16", "bfloat16"):
        schema, tables = _batches(dtype, "token", seed=4)
        writer = VectorParquetWriter(
            tmp_path / f"{dtype}.parquet", schema, parquet_options(schema, "none", list(WIDTHS))
        )
        for table in tables:
            writer.write_table(table)
        writer.close()
        metadata = pq.read_metadata(tmp_path / f"{dtype}.parquet")
        sizes[dtype] = sum(
            metadata.row_group(g).column(c).total_compressed_size
            for g in range(metadata.num_row_groups)
            for c in range(metadata.num_columns)
            if metadata.row_group(g).column(c).path_in_schema.startswith(tuple(WIDTHS))
        )
    assert sizes["bfloat16"] <= 1.05 * sizes["float16"]
