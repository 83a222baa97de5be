"""Shard layout: batches_per_shard, max_shards, short last batches and label columns."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actlightning.files.vector_parquet import VectorParquetWriter
from tests.helpers import read_rows, run_export


@pytest.mark.parametrize(
    ("batch_size", "batches_per_shard", "max_shards", "expected_rows"),
    [
        (4, 2, None, [8, 8, 8, 8, 8]),  # 40 rows, even split
        (3, 2, None, [6, 6, 6, 6, 6, 6, 4]),  # short last batch (40 = 13 * 3 + 1)
        (3, 2, 3, [6, 6, 6]),  # max_shards: exactly 3 full shards, none a batch short
        (7, 10, None, [40]),  # a single shard ending in a short batch
        (5, 1, 8, [5] * 8),  # max_shards equal to the number of batches
    ],
)
def test_shards_hold_expected_rows(
    tmp_path, checkpoints, games_file, batch_size, batches_per_shard, max_shards, expected_rows
):
    overrides = {"data.batch_size": batch_size, "writer.batches_per_shard": batches_per_shard, "model.layers": "[1]"}
    if max_shards is not None:
        overrides["writer.max_shards"] = max_shards
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **overrides)
    shards = sorted(out.glob("*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in shards] == expected_rows
    assert [p.name for p in shards] == [f"shard-{i:05d}-rank00.parquet" for i in range(len(expected_rows))]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left behind"
    ids = [r["example_id"] for r in read_rows(out)]
    assert len(ids) == len(set(ids)) == sum(expected_rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == expected_rows


def test_label_columns_of_several_types_survive(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(
        checkpoints["llama"],
        games_file,
        out,
        **{"data.label_columns": "[Site, WhiteElo, Scores]", "model.layers": "[0]", "data.sort_by_length": "true"},
    )
    games = [json.loads(line) for line in games_file.read_text().splitlines()]
    rows = read_rows(out)
    schema = pq.read_schema(sorted(out.glob("*.parquet"))[0])
    assert str(schema.field("WhiteElo").type) == "int64"
    assert pa.types.is_list(schema.field("Scores").type)
    for row in rows:
        game = games[row["example_id"]]
        assert (row["Site"], row["WhiteElo"], row["Scores"]) == (game["Site"], game["WhiteElo"], game["Scores"])


def test_several_writer_threads_write_identical_shards(tmp_path, checkpoints, games_file):
    settings = {
        "data.batch_size": 3,
        "writer.batches_per_shard": 2,
        "model.layers": "[0, 3]",
        "data.label_columns": "[Site]",
    }
    run_export(checkpoints["gpt2"], games_file, tmp_path / "one", **settings)
    run_export(
        checkpoints["gpt2"],
        games_file,
        tmp_path / "three",
        **settings,
        **{"writer.writer_threads": 3, "writer.max_pending_batches": 1},
    )
    one, three = sorted((tmp_path / "one").glob("*.parquet")), sorted((tmp_path / "three").glob("*.parquet"))
    assert [p.name for p in one] == [p.name for p in three]
    for a, b in zip(one, three, strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))


@pytest.mark.parametrize(
    ("layout", "compression"), [("sequence", "none"), ("token", "none"), ("sequence", "zstd"), ("token", "lz4")]
)
def test_direct_and_arrow_vector_encoders_write_the_same_data(
    tmp_path, checkpoints, games_file, layout, compression, monkeypatch
):
    settings = {
        "data.batch_size": 3,
        "model.layers": "[0, 3]",
        "model.output_dtype": "float16",
        "data.label_columns": "[Site, Scores]",
        "writer.layout": layout,
        "writer.compression": compression,
    }
    if compression == "zstd":
        settings["writer.compression_level"] = 3
    direct_chunks = []
    original = VectorParquetWriter._write_vector_chunk
    monkeypatch.setattr(
        VectorParquetWriter, "_write_vector_chunk", lambda self, *a: direct_chunks.append(1) or original(self, *a)
    )
    run_export(checkpoints["gpt2"], games_file, tmp_path / "direct", **settings)
    assert len(direct_chunks) == 2 * 14, "two vector columns in each of the 14 batches, written directly"
    run_export(checkpoints["gpt2"], games_file, tmp_path / "arrow", **settings, **{"writer.vector_encoder": "arrow"})
    assert len(direct_chunks) == 2 * 14
    direct, arrow = sorted((tmp_path / "direct").glob("*.parquet")), sorted((tmp_path / "arrow").glob("*.parquet"))
    assert [p.name for p in direct] == [p.name for p in arrow]
    for a, b in zip(direct, arrow, strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))
        assert pq.read_metadata(a).metadata == pq.read_metadata(b).metadata
        if compression != "none":
            group = pq.read_metadata(a).row_group(0)
            vector = next(
                group.column(i)
                for i in range(group.num_columns)
                if group.column(i).path_in_schema.startswith("layer_0")
            )
            assert vector.compression != "UNCOMPRESSED"
