"""Exports to an object store (``s3://``) against a real S3 server on 127.0.0.1 (moto), not a mock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actlightning.errors import ConfigError
from actlightning.files.remote import RemoteLocation
from actlightning.files.storage import open_location
from actlightning.read.reader import open_export
from actlightning.read.training import TokenVectors, iter_token_batches
from actlightning.writer.outputdir import clean_output_dir, inspect_output_dir
from tests.helpers import REPO, export_args, read_rows, run_main
from tests.s3 import KEY_ID, SECRET, start_server

LAYERS = {"model.layers": "[1, 3]"}


def _s3_args(checkpoint, games_file, bucket, prefix="export", options=True, **overrides) -> list[str]:
    args = export_args(checkpoint, games_file, "unused", **{**LAYERS, **overrides})
    args[args.index("unused")] = bucket.url(prefix)
    if options:
        args += ["--writer.storage_options", json.dumps(bucket.options)]
    return args


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["example_id"] for r in a] == [r["example_id"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["input_ids"] == y["input_ids"]
        for name in (k for k in x if k.startswith("layer_")):
            np.testing.assert_allclose(x[name], y[name], rtol=0, atol=1e-5)


def test_export_to_s3_equals_the_local_export_keeps_no_secret_and_reads_back(
    tmp_path, checkpoints, games_file, bucket, monkeypatch
):
    local = tmp_path / "local"
    assert run_main(export_args(checkpoints["gpt2"], games_file, local, **LAYERS)).returncode == 0
    log_file, staging = tmp_path / "log.txt", tmp_path / "staging"
    staging.mkdir()
    written = []  # every object put whole (not the shards, which are uploaded from their staged files)
    put = RemoteLocation.write_bytes
    monkeypatch.setattr(RemoteLocation, "write_bytes", lambda self, n, d: written.append(n) or put(self, n, d))
    args = _s3_args(checkpoints["gpt2"], games_file, bucket, **{"writer.staging_dir": staging})
    result = run_main([*args, "--log_file", str(log_file)])
    assert result.returncode == 0, result.stderr[-3000:]
    # 5 shards in well under 30 s: the manifest is put when the export starts and when it ends, not per shard.
    assert written.count("manifest.json") == 2, written

    names = bucket.names()
    assert names == sorted(p.name for p in local.iterdir()), "the same files: shards, manifest, config, card"
    remote = bucket.download("export", tmp_path / "downloaded")
    for name in (n for n in names if n.endswith(".parquet")):
        assert pq.read_table(remote / name).equals(pq.read_table(local / name)), name
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"] == json.loads((local / "manifest.json").read_text())["totals"]
    assert list(staging.iterdir()) == [], "staged shards and their folders are deleted"

    # Credentials reach no file of the export, the log or the console; config.yaml keeps the keys only.
    texts = {name: (remote / name).read_bytes().decode("utf-8", "replace") for name in names}
    texts |= {"log": log_file.read_text(), "stdout": result.stdout, "stderr": result.stderr}
    for where, text in texts.items():
        assert SECRET not in text and KEY_ID not in text, f"a credential leaked into {where}"
    assert "storage_options:" in texts["config.yaml"] and "<redacted>" in texts["config.yaml"]
    assert "storage_options=storage_options" in texts["README.md"] and bucket.url() in texts["README.md"]

    # The reader, straight from the bucket.
    export = open_export(bucket.url(), storage_options=bucket.options)
    assert export.rows == 40 and export.vector_columns == ["layer_1", "layer_3"]
    _same_rows(read_rows(remote), read_rows(local))
    from_s3 = torch.cat(list(iter_token_batches(bucket.url(), "layer_3", 50, storage_options=bucket.options)))
    from_disk = torch.cat(list(iter_token_batches(local, "layer_3", 50)))
    assert torch.equal(from_s3, from_disk)
    vectors = TokenVectors(bucket.url(), "layer_1", 64, shuffle_buffer=100, seed=1, storage_options=bucket.options)
    assert sum(len(b) for b in vectors) == len(from_disk)
    streamed = export.dataset(columns=["example_id", "layer_1"])  # an IterableDataset: nothing downloaded first
    rows = sorted(streamed, key=lambda r: r["example_id"])
    assert [r["example_id"] for r in rows] == list(range(40)) and set(rows[0]) == {"example_id", "layer_1"}
    assert torch.equal(rows[0]["layer_1"], torch.from_numpy(read_rows(local)[0]["layer_1"]))

    # A rerun finds the export complete before any weights load.
    again = run_main(args)
    assert again.returncode == 0 and "already complete; nothing to do" in again.stderr + again.stdout


def test_reading_one_column_from_s3_fetches_only_its_chunks(tmp_path, checkpoints, games_file, bucket, monkeypatch):
    every_layer = {"model.layers": "[0, 1, 2, 3, 4]", "writer.batches_per_shard": 10}
    assert run_main(_s3_args(checkpoints["gpt2"], games_file, bucket, **every_layer)).returncode == 0
    import s3fs

    fetched = []
    fetch = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", lambda self, s, e: fetched.append(e - s) or fetch(self, s, e))
    export = open_export(bucket.url(), storage_options=bucket.options)
    list(iter_token_batches(bucket.url(), "layer_1", 64, storage_options=bucket.options))
    shard_bytes = sum(s["bytes"] for s in export.manifest["shards"])
    # Five vector columns of equal size: one of them is under a fifth of the bytes, plus the footers.
    assert 0 < sum(fetched) < 0.4 * shard_bytes, (sum(fetched), shard_bytes)


def test_missing_bucket_is_one_line_before_any_weights(tmp_path, checkpoints, games_file, bucket):
    bucket.name = "no-such-bucket-actlightning"
    result = run_main(_s3_args(checkpoints["gpt2"], games_file, bucket))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("actlightning: error: writer.output_dir s3://no-such-bucket-actlightning/export")
    assert "is not writable" in lines[-1] and "bucket does not exist" in lines[-1]
    assert "plan:" not in result.stderr, "stopped before the data and the weights"


def test_bucket_policy_resume_overwrite_and_foreign_objects(bucket):
    location = RemoteLocation(bucket.url(), bucket.options)
    settings = {"model": {"layers": [1]}}
    assert inspect_output_dir(location, settings, overwrite=False) == "new"
    assert bucket.names() == [], "the write check leaves nothing behind"
    fs = bucket.fs
    fs.pipe_file(f"{bucket.name}/export/shard-00000-rank00.parquet", b"PAR1")
    manifest = {"format_version": 2, "complete": False, "settings": settings}
    fs.pipe_file(f"{bucket.name}/export/manifest.json", json.dumps(manifest).encode())
    assert inspect_output_dir(location, settings, overwrite=False) == "resume"
    with pytest.raises(ConfigError, match=r"different settings \(model.layers\)"):
        inspect_output_dir(location, {"model": {"layers": [2]}}, overwrite=False)
    fs.pipe_file(f"{bucket.name}/export/notes.txt", b"mine")
    with pytest.raises(ConfigError, match="files this tool did not write"):
        inspect_output_dir(location, settings, overwrite=True)
    fs.rm_file(f"{bucket.name}/export/notes.txt")
    fs.pipe_file(f"{bucket.name}/other/notes.txt", b"next to the export, not in it")
    assert inspect_output_dir(location, {"x": 1}, overwrite=True) == "overwrite"
    clean_output_dir(location, "overwrite")
    assert bucket.names() == [] and bucket.names("other") == ["notes.txt"], "only our objects were deleted"
    fs.pipe_file(f"{bucket.name}/object", b"x")
    with pytest.raises(ConfigError, match="is an object, not a prefix"):
        inspect_output_dir(RemoteLocation(f"s3://{bucket.name}/object", bucket.options), settings, overwrite=False)


def _start_slow(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.slow_export", *args],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_shards(bucket, process: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if sum(n.endswith(".parquet") for n in bucket.names()) >= count:
            return
        time.sleep(0.05)


def test_killed_s3_export_resumes_to_the_uninterrupted_one(tmp_path, checkpoints, games_file, bucket, monkeypatch):
    # 20 shards of one batch of 2, each forward slowed down: time enough to kill it in the middle.
    small = {"data.batch_size": 2, "writer.batches_per_shard": 1}
    local = tmp_path / "local"
    assert run_main(export_args(checkpoints["gpt2"], games_file, local, **LAYERS, **small)).returncode == 0
    # Credentials from the standard environment, as on a cloud node (no storage_options).
    args = _s3_args(checkpoints["gpt2"], games_file, bucket, options=False, **small)
    process = _start_slow(args, bucket.env)
    _wait_for_shards(bucket, process, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    done = sum(n.endswith(".parquet") for n in bucket.names())
    assert 2 <= done < 20, f"killed in the middle ({done} of 20 shards)"
    for key, value in bucket.env.items():
        monkeypatch.setenv(key, value)
    result = run_main(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {done} complete shards" in result.stderr
    _same_rows(read_rows(bucket.download("export", tmp_path / "remote")), read_rows(local))


def test_server_gone_mid_run_is_one_line_and_a_rerun_resumes(tmp_path, checkpoints, games_file, monkeypatch):
    from tests.s3 import Bucket

    server, endpoint = start_server()
    bucket = Bucket.create(endpoint, "gone")
    small = {"data.batch_size": 2, "writer.batches_per_shard": 1}  # 20 shards: the server goes mid-run
    local = tmp_path / "local"
    assert run_main(export_args(checkpoints["gpt2"], games_file, local, **LAYERS, **small)).returncode == 0
    args = _s3_args(checkpoints["gpt2"], games_file, bucket, options=False, **small)
    process = _start_slow(args, bucket.env)
    _wait_for_shards(bucket, process, 1)
    server.stop()
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"actlightning: error: uploading {bucket.url()}/"), last
    assert "failed: EndpointConnectionError: Could not connect to the endpoint URL" in last
    server, _ = start_server(int(endpoint.rsplit(":", 1)[1]))  # back, with what was uploaded
    try:
        for key, value in bucket.env.items():
            monkeypatch.setenv(key, value)
        result = run_main(args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming:" in result.stderr
        _same_rows(read_rows(bucket.download("export", tmp_path / "remote")), read_rows(local))
    finally:
        server.stop()


def test_two_processes_upload_every_row_once(tmp_path, checkpoints, games_file, bucket):
    local = tmp_path / "local"
    assert run_main(export_args(checkpoints["gpt2"], games_file, local, **LAYERS)).returncode == 0
    args = _s3_args(
        checkpoints["gpt2"], games_file, bucket, options=False, **{"trainer.devices": 2, "trainer.strategy": "ddp"}
    )
    env = {**os.environ, **bucket.env}
    result = subprocess.run(
        [sys.executable, "-m", "actlightning", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = [n for n in bucket.names() if n.endswith(".parquet")]
    assert {n.split("-rank")[1] for n in names} == {"00.parquet", "01.parquet"}, "both ranks uploaded shards"
    remote = bucket.download("export", tmp_path / "remote")
    _same_rows(read_rows(remote), read_rows(local))
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["rows"] == 40 and len(manifest["shards"]) == len(names)


def test_staging_folder_too_small_for_the_staged_shards_is_refused(
    tmp_path, checkpoints, games_file, bucket, monkeypatch
):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    result = run_main(_s3_args(checkpoints["gpt2"], games_file, bucket, **{"writer.writer_threads": 2}))
    assert result.returncode == 2
    assert "writer.staging_dir: 2 shards of about" in result.stderr and "are staged at once" in result.stderr
    assert [n for n in bucket.names() if not n.startswith(".")] == [], "nothing uploaded"


def test_unknown_protocol_and_wrong_options_are_named_before_any_weights(tmp_path, checkpoints, games_file, bucket):
    result = run_main(export_args(checkpoints["gpt2"], games_file, "nosuch://x/y"))
    assert result.returncode == 2 and "writer.output_dir nosuch://x/y: Protocol not known: nosuch" in result.stderr
    wrong = {**bucket.options, "no_such_option": 1}
    result = run_main(
        [
            *_s3_args(checkpoints["gpt2"], games_file, bucket, options=False),
            "--writer.storage_options",
            json.dumps(wrong),
        ]
    )
    assert result.returncode == 2 and "unexpected keyword argument 'no_such_option'" in result.stderr
    assert "plan:" not in result.stderr
    with pytest.raises(ConfigError, match="writer.storage_options is set but writer.output_dir is a local path"):
        open_location(tmp_path, {"key": "x"})


def test_denied_write_is_one_line_before_any_weights(tmp_path, checkpoints, games_file):
    """A server that checks credentials (moto with authorization on, in its own process) refuses ours."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        options = {"endpoint_url": endpoint, "key": KEY_ID, "secret": SECRET}
        args = export_args(checkpoints["gpt2"], games_file, "s3://denied/export")
        result = run_main([*args, "--writer.storage_options", json.dumps(options)])
    finally:
        server.terminate()
        server.wait()
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "writer.output_dir s3://denied/export is not writable: PermissionError" in last, last
    assert "plan:" not in result.stderr and SECRET not in result.stderr
