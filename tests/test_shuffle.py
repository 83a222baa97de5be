"""The global shuffle: every source token row exactly once and bit-equal, uniform, the same with any
number of workers, resumable after a crash at any point, bounded memory, folders and buckets alike."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actlightning.face import scatter as scatter_module
from actlightning.face import shuffle
from actlightning.files.schema import build_features, build_schema
from actlightning.files.shard_file import ShardFile, parquet_options
from actlightning.files.storage import LocalLocation
from actlightning.read.reader import column_vectors, open_export
from tests.helpers import REPO, run_export

SETTINGS = {"model.layers": "[1, 3]", "data.label_columns": "[WhiteElo, Site]", "model.output_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, checkpoints, games_file) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shuffle-src")
    out = {}
    for layout in ("sequence", "token"):
        out[layout] = root / layout
        run_export(checkpoints["gpt2"], games_file, out[layout], **SETTINGS, **{"writer.layout": layout})
    return out


def _shuffle(src, dst, *extra: str, seed: int = 5) -> None:
    shuffle.main([str(src), str(dst), "--seed", str(seed), "--max_memory", "1MB", "--rows_per_shard", "400", *extra])


def _rows(folder: Path) -> dict[tuple[int, int], tuple]:
    """(example_id, position) -> (token_id, labels, each vector's raw bytes), over every shard."""
    out = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        vectors = {n: column_vectors(table.column(n))[0] for n in ("layer_1", "layer_3")}
        if "position" in table.column_names:
            keys = zip(table.column("example_id").to_pylist(), table.column("position").to_pylist(), strict=True)
            tokens, labels = table.column("token_id").to_pylist(), table.select(["WhiteElo", "Site"]).to_pylist()
        else:  # a sequence row per example: its tokens in order
            keys, tokens, labels = [], [], []
            for row in table.select(["example_id", "start_position", "input_ids", "WhiteElo", "Site"]).to_pylist():
                for i, token in enumerate(row["input_ids"]):
                    keys.append((row["example_id"], row["start_position"] + i))
                    tokens.append(token)
                    labels.append({"WhiteElo": row["WhiteElo"], "Site": row["Site"]})
        for i, key in enumerate(keys):
            out[key] = (
                tokens[i],
                tuple(labels[i].values()),
                vectors["layer_1"][i].tobytes(),
                vectors["layer_3"][i].tobytes(),
            )
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


@pytest.mark.parametrize("layout", ["sequence", "token"])
def test_every_row_once_and_bit_equal(sources, tmp_path, layout):
    dst = tmp_path / "dst"
    _shuffle(sources[layout], dst)
    source, shuffled = _rows(sources[layout]), _rows(dst)
    assert sum(pq.read_metadata(p).num_rows for p in dst.glob("*.parquet")) == len(source), "no row twice"
    assert shuffled == source
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["complete"] and manifest["settings"]["layout"] == "token"
    assert manifest["settings"]["shuffle"]["seed"] == 5 and manifest["totals"]["rows"] == len(source)
    assert not (dst / ".shuffle").exists(), "temporaries removed"
    # Readers open it: datasets, ours (statistics carried over), polars, DuckDB.
    from datasets import load_dataset

    assert len(load_dataset("parquet", data_files=str(dst / "*.parquet"), split="train")) == len(source)
    carried, original = open_export(dst).stats("layer_3"), open_export(sources[layout]).stats("layer_3")
    assert carried["count"] == original["count"] and np.array_equal(carried["mean"], original["mean"])
    import duckdb
    import polars

    assert polars.read_parquet(str(dst / "*.parquet")).height == len(source)
    assert duckdb.sql(f"select count(*) from '{dst}/*.parquet'").fetchall()[0][0] == len(source)


def test_order_is_uniform_and_a_function_of_the_seed(sources, tmp_path):
    _shuffle(sources["token"], tmp_path / "a")
    _shuffle(sources["token"], tmp_path / "b", "--workers", "3")
    _shuffle(sources["token"], tmp_path / "c", seed=6)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b"), "the same output with 1 and 3 workers"
    assert _hashes(tmp_path / "a") != _hashes(tmp_path / "c")
    # Source order: shard, then row. No trace of it in the output order.
    source_index, shard_of = {}, {}
    for shard, path in enumerate(sorted(sources["token"].glob("*.parquet"))):
        table = pq.read_table(path, columns=["example_id", "position"])
        for key in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True):
            source_index[key], shard_of[key] = len(source_index), shard
    output = [pq.read_table(p, columns=["example_id", "position"]) for p in sorted((tmp_path / "a").glob("*.parquet"))]
    keys = [k for t in output for k in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True)]
    order = np.array([source_index[k] for k in keys])
    assert abs(np.corrcoef(np.arange(len(order)), order)[0, 1]) < 0.1
    # Every output shard draws from every source shard about in proportion to its size.
    sources_per_output = [
        [shard_of[k] for k in zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True)] for t in output
    ]
    overall = np.bincount([shard_of[k] for k in keys]) / len(keys)
    for drawn in sources_per_output:
        share = np.bincount(drawn, minlength=len(overall)) / len(drawn)
        assert np.abs(share - overall).max() < 4 * np.sqrt(overall.max() / len(drawn)) + 0.02


@pytest.mark.parametrize("crash", ["scatter", "gather", "finish"])
def test_a_crash_at_any_point_then_the_same_command_gives_the_uninterrupted_output(
    sources, tmp_path, monkeypatch, crash
):
    _shuffle(sources["sequence"], tmp_path / "whole")
    calls = {"n": 0}
    original = {"scatter": shuffle.scatter, "gather": shuffle.gather, "finish": shuffle.finish}[crash]

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 or crash == "finish":
            raise KeyboardInterrupt  # like a kill: whatever was published stays, the rest is redone
        return original(*args, **kwargs)

    monkeypatch.setattr(shuffle, crash, dies)
    with pytest.raises(KeyboardInterrupt):
        _shuffle(sources["sequence"], tmp_path / "cut")
    monkeypatch.setattr(shuffle, crash, original)
    _shuffle(sources["sequence"], tmp_path / "cut")
    assert _hashes(tmp_path / "cut") == _hashes(tmp_path / "whole")


def test_killed_process_resumes(sources, tmp_path):
    dst = tmp_path / "dst"
    command = [sys.executable, "-m", "actlightning", "shuffle", str(sources["sequence"]), str(dst), "--seed", "5",
               "--max_memory", "1MB", "--rows_per_shard", "400"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill -9 once the scratch folder holds some of pass 1's files.
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((dst / ".shuffle").glob("*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=120).returncode == 0
    _shuffle(sources["sequence"], tmp_path / "whole")
    assert _hashes(dst) == _hashes(tmp_path / "whole")


def test_refuses_another_shuffle_over_a_partial_one(sources, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "dst"
    monkeypatch.setattr(shuffle, "gather", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _shuffle(sources["token"], dst)
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_:
        _shuffle(sources["token"], dst, seed=9)
    assert exit_.value.code == 2 and "another shuffle" in capsys.readouterr().err
    _shuffle(sources["token"], dst, "--overwrite", seed=9)
    _shuffle(sources["token"], dst, seed=9)
    assert "nothing to do" in capsys.readouterr().out


def _synthetic_export(folder: Path, shards: int, rows: int, width: int) -> None:
    """A token-layout export of random float32 vectors, written with the export's own shard files."""
    from actlightning.files.manifest import MANIFEST, build_manifest, manifest_bytes

    schema = build_schema(build_features({"layer_0": width}, "float32", {}, "token"), "float32")
    folder.mkdir(parents=True)
    infos = []
    rng = np.random.default_rng(0)
    for shard in range(shards):
        file = ShardFile(folder, shard, 0, schema, parquet_options(schema, "none", ["layer_0"]))
        ids = np.arange(shard * rows, (shard + 1) * rows)
        vectors = rng.standard_normal((rows, width), dtype=np.float32)
        table = pa.table(
            [pa.array(ids, pa.int64()), pa.array(np.zeros(rows, np.int32)), pa.array(np.zeros(rows, np.int32)),
             pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), width)],
            schema=schema,
        )  # fmt: skip
        file.write(table, rows, rows)
        infos.append(file.close())
    model = {"checkpoint": "synthetic", "revision": None, "dtype": "float32", "layers": [0], "hook_points": []}
    model.update(n_pos=None, output_dtype="float32", hidden_size=width, num_layers=1)
    data = {"path": "synthetic", "name": None, "split": "train", "data_files": None, "revision": None}
    settings = {"model": model, "data": {**data, "input_column": "text"}, "layout": "token"}
    manifest = build_manifest(settings, infos, True, {})
    LocalLocation(folder).write_bytes(MANIFEST, manifest_bytes(manifest))


def test_peak_memory_stays_within_the_budget_whatever_the_source_size(tmp_path):
    """A source 5x the budget: peak RSS within 2x the budget above the fixed overhead (imports, a tiny run)."""
    small, large = tmp_path / "small", tmp_path / "large"
    _synthetic_export(small, 2, 500, 64)  # 0.25 MB
    _synthetic_export(large, 30, 4096, 256)  # 30 x 4 MB = 126 MB
    code = (
        "import resource, sys; from actlightning.face.shuffle import main; main(sys.argv[1:]);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    peaks = {}
    for name, src in (("small", small), ("large", large)):
        args = [str(src), str(tmp_path / f"out-{name}"), "--seed", "1", "--max_memory", "24MB"]
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[name] = int(result.stdout.strip().splitlines()[-1])
    assert peaks["large"] - peaks["small"] <= 2 * 24, peaks
    assert sum(pq.read_metadata(p).num_rows for p in (tmp_path / "out-large").glob("*.parquet")) == 30 * 4096


def test_shuffles_from_and_to_a_bucket(sources, bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3", **bucket.options)
    for path in sources["token"].iterdir():
        fs.put_file(str(path), f"{bucket.name}/src/{path.name}")
    options = json.dumps(bucket.options)
    shuffle.main([bucket.url("src"), bucket.url("dst"), "--seed", "5", "--max_memory", "1MB", "--rows_per_shard", "400",
                  "--storage_options", options])  # fmt: skip
    _shuffle(sources["token"], tmp_path / "local")
    local = tmp_path / "from-s3"
    local.mkdir()
    for name in bucket.names("dst"):
        if name.endswith(".parquet"):
            fs.get_file(f"{bucket.name}/dst/{name}", str(local / name))
    assert _hashes(local) and _hashes(local) == _hashes(tmp_path / "local")
    assert not bucket.names("dst/.shuffle"), "temporaries removed"
    from actlightning.face.inspect import describe

    info = describe(bucket.url("dst"), bucket.options)  # inspect reads a bucket export too
    assert info["complete"] and info["layout"] == "token" and info["shards"] == len(_hashes(local))
    assert scatter_module.SCRATCH == ".shuffle"
