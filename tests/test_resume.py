"""Several processes, crash safety and exact resume."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from actlightning.files.shard_file import ShardFile, ShardWriteError
from tests.helpers import REPO, export_args, read_rows, run_cli, run_export, run_main


def _assert_same_export(a, b):
    rows_a, rows_b = read_rows(a), read_rows(b)
    assert [r["example_id"] for r in rows_a] == [r["example_id"] for r in rows_b]
    for x, y in zip(rows_a, rows_b, strict=True):
        assert x["input_ids"] == y["input_ids"]
        for name in (k for k in x if k.startswith("layer_")):
            np.testing.assert_allclose(x[name], y[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_export_every_example_once(tmp_path, checkpoints, games_file, strategy):
    run_export(checkpoints["llama"], games_file, tmp_path / "single", **{"data.sort_by_length": "true"})
    args = export_args(
        checkpoints["llama"],
        games_file,
        tmp_path / "ddp",
        **{"data.sort_by_length": "true", "trainer.devices": 2, "trainer.strategy": strategy},
    )
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "ddp").glob("*.parquet"))
    assert {n.split("-rank")[1] for n in names} == {"00.parquet", "01.parquet"}, "both ranks wrote shards"
    _assert_same_export(tmp_path / "single", tmp_path / "ddp")
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["totals"]["rows"] == 40
    assert len(manifest["shards"]) == len(names)
    _assert_same_statistics(tmp_path / "single", tmp_path / "ddp")


def _assert_same_statistics(a, b) -> None:
    """Statistics (summed from every shard's footer) equal within float tolerance of the activations:
    a float16 value may round one ulp apart between runs, which moves a mean by ~1e-3 / count."""
    stats_a, stats_b = (json.loads((folder / "stats.json").read_text()) for folder in (a, b))
    assert sorted(stats_a) == sorted(stats_b)
    for column, values in stats_a.items():
        assert values["count"] == stats_b[column]["count"]
        for key in ("mean", "var", "mean_norm", "mean_squared_norm"):
            np.testing.assert_allclose(values[key], stats_b[column][key], rtol=1e-5, atol=1e-6)


def _demo_args(out, *extra):
    return [
        "predict",
        "--config",
        "configs/demo.yaml",
        "--writer.output_dir",
        str(out),
        "--data.batch_size",
        "2",
        "--writer.batches_per_shard",
        "1",
        "--model.layers",
        "[1, 4]",
        "--model.output_dtype",
        "float32",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "cpu",
        *extra,
    ]


def _run_and_kill(out, at_shards: int) -> bool:
    """Start the demo export, SIGKILL it once ``at_shards`` shards exist; False if it finished first."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "actlightning", *_demo_args(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while process.poll() is None:
            if (out / "manifest.json").exists() and len(list(out.glob("*.parquet"))) >= at_shards:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if process.poll() is None:
            process.kill()


def test_killed_exports_resume_to_exactly_the_uninterrupted_export(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    monkeypatch.chdir(REPO)  # the demo config's paths are relative to the repository
    assert run_main(_demo_args(reference)).returncode == 0
    out = tmp_path / "out"
    rng = random.Random(0)
    kills = 0
    for at_shards in (0, rng.randint(5, 40), rng.randint(80, 120)):
        kills += _run_and_kill(out, at_shards)
        # Whatever the moment of the kill, every visible shard is complete and readable.
        for shard in out.glob("*.parquet"):
            pq.read_table(shard)
        assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert kills == 3, "each run was killed before it finished"
    # The last resume runs on two processes: the plan does not depend on the device count.
    result = run_cli(_demo_args(out, "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files were cleaned up"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["rows"] == 256
    _assert_same_export(reference, out)
    _assert_same_statistics(reference, out)  # the killed runs' shards count, from their footers


def test_finished_export_is_not_recomputed(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = run_main(export_args(checkpoints["gpt2"], games_file, out))
    assert result.returncode == 0
    assert "already complete" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resume_refuses_other_settings_naming_them(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"writer.max_shards": 1})
    result = run_main(
        export_args(
            checkpoints["gpt2"], games_file, out, **{"writer.max_shards": 1, "model.n_pos": 3, "data.dedupe": "true"}
        )
    )
    assert result.returncode != 0
    assert "different settings (data.dedupe, model.n_pos)" in result.stderr


def test_write_error_stops_run_naming_file_and_keeps_complete_shards(tmp_path, checkpoints, games_file, monkeypatch):
    out = tmp_path / "out"
    original = ShardFile.write
    calls = []

    def failing_write(self, *args):
        calls.append(self.tmp_path)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args)

    monkeypatch.setattr(ShardFile, "write", failing_write)
    with pytest.raises(ShardWriteError, match=r"shard-00002-rank00\.parquet.*No space left on device"):
        run_export(checkpoints["gpt2"], games_file, out)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["shard-00000-rank00.parquet", "shard-00001-rank00.parquet"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "the broken shard was removed"
    for shard in out.glob("*.parquet"):
        assert pq.read_metadata(shard).num_rows == 8
    monkeypatch.setattr(ShardFile, "write", original)
    run_export(checkpoints["gpt2"], games_file, out)
    assert [r["example_id"] for r in read_rows(out)] == list(range(40))


def _start(module: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # SIGINT as a terminal's Ctrl-C would send it (a shell may start background jobs ignoring it).
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_says_what_is_complete_and_a_rerun_resumes(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    args = export_args(checkpoints["gpt2"], games_file, out, **{"data.batch_size": 1, "writer.batches_per_shard": 2})
    process = _start("tests.slow_export", args)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.parquet"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    complete = len(list(out.glob("*.parquet")))
    assert 2 <= complete < 20
    assert f"interrupted: {complete} complete shards in {out}" in stderr, stderr[-3000:]
    assert "Rerun the same command to resume" in stderr
    result = run_main(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["example_id"] for r in read_rows(out)] == list(range(40))


def test_ctrl_c_while_starting_is_one_line(tmp_path):
    process = _start("actlightning", ["predict", "--help"])
    time.sleep(0.5)  # inside the imports, which take seconds
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    if process.returncode == 0:
        pytest.skip("the imports finished within 0.5 s on this machine")
    assert process.returncode == 130, stderr
    assert stderr.strip() == "actlightning: interrupted while starting; nothing was written"
