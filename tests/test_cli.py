"""The CLI end to end: `python -m actlightning predict --config ...`, configs, overrides, output dir rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from datasets import Array2D, load_dataset

from tests.helpers import REPO, assert_rows_match_reference, export_args, read_rows, run_cli, run_export, run_main

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_cli_demo_config_with_overrides_loads_with_datasets(tmp_path):
    out = tmp_path / "run1"
    result = run_cli(
        [
            "predict",
            "--config",
            "configs/demo.yaml",
            "--trainer.devices",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--data.batch_size",
            "16",
            "--writer.output_dir",
            str(out),
            "--writer.max_shards",
            "2",
            "--model.layers",
            "[0, 2, -1]",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(out.glob("*.parquet"))
    assert [p.name for p in shards] == ["shard-00000-rank00.parquet", "shard-00001-rank00.parquet"]
    dataset = load_dataset("parquet", data_files=str(out / "*.parquet"), split="train")
    # 2 shards x 4 batches x 16 sequences
    assert len(dataset) == 128
    assert dataset.features["layer_2"] == Array2D(shape=(None, 64), dtype="float16")
    assert set(dataset.column_names) == {
        "example_id",
        "input_ids",
        "start_position",
        "Site",
        "WhiteElo",
        "BlackElo",
        "Scores",
        "layer_0",
        "layer_2",
        "layer_4",
    }
    row = dataset.with_format("torch")[0]
    assert row["layer_4"].shape == (len(row["input_ids"]), 64)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["settings"]["model"]["layers"] == [0, 2, 4]
    assert manifest["totals"]["rows"] == 128
    assert manifest["totals"]["tokens"] == sum(len(ids) for ids in dataset["input_ids"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["batch_size"] == 16
    assert config["writer"]["output_dir"] == str(out)
    # From the command line, the summary and the manifest say when the first batch came.
    first = manifest["run"]["seconds_to_first_batch"]
    assert 0 < first < 300 and f"(first batch {first:.1f} s after the process started)" in result.stderr


def test_weights_load_while_the_data_side_plans(tmp_path, checkpoints, games_file, monkeypatch):
    """In one process the weights start loading on a thread before the data is selected and planned,
    and the Trainer's configure_model takes them from that thread; in-process runs report no startup."""
    from actlightning.data.module import ActivationDataModule
    from actlightning.model.module import ActivationModule

    events = []
    for cls, name in ((ActivationModule, "start_loading"), (ActivationDataModule, "plan_export")):
        original = getattr(cls, name)
        monkeypatch.setattr(
            cls, name, lambda self, *a, _o=original, _n=name, **k: events.append(_n) or _o(self, *a, **k)
        )
    taken = []
    from actlightning.model import loading

    result = loading.BackgroundLoad.result
    monkeypatch.setattr(loading.BackgroundLoad, "result", lambda self: taken.append(1) or result(self))
    run_export(checkpoints["gpt2"], games_file, tmp_path / "out")
    assert events == ["start_loading", "plan_export"] and taken == [1]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "seconds_to_first_batch" not in manifest["run"]
    texts = [json.loads(line)["Transcript"] for line in games_file.read_text().splitlines()]
    assert_rows_match_reference(read_rows(tmp_path / "out"), texts, checkpoints["gpt2"])


def test_console_script_is_installed():
    import shutil

    script = shutil.which("actlightning")
    assert script is not None, "pip install -e . installs the `actlightning` console script"
    result = subprocess.run([script, "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--writer.output_dir" in result.stdout


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses_and_every_key_is_commented(config):
    result = run_main(["predict", "--config", str(config), "--print_config"])
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert {"model", "data", "writer", "trainer"} <= set(printed)
    for line in config.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in stripped, f"{config.name}: key without a comment: {stripped!r}"


def test_refuses_non_empty_output_dir_without_overwrite(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        run_export(checkpoints["gpt2"], games_file, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_another_export(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"model.layers": "[1]"})
    with pytest.raises(ValueError, match="different settings.*model.layers"):
        run_export(checkpoints["gpt2"], games_file, out, **{"model.layers": "[2]"})
    run_export(checkpoints["gpt2"], games_file, out, **{"model.layers": "[2]", "writer.overwrite": "true"})
    columns = load_dataset("parquet", data_files=str(out / "*.parquet"), split="train").column_names
    assert "layer_2" in columns and "layer_1" not in columns


def test_log_file_receives_logs(tmp_path, checkpoints, games_file):
    log_file = tmp_path / "logs" / "export.log"
    result = run_main(export_args(checkpoints["gpt2"], games_file, tmp_path / "out") + ["--log_file", str(log_file)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "export complete" in log_file.read_text()


def test_saved_dataset_folder_is_accepted(tmp_path, checkpoints, games_file, saved_dataset):
    run_export(checkpoints["gpt2"], games_file, tmp_path / "out", **{"data.path": str(saved_dataset)})
    assert len(load_dataset("parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train")) == 40


def test_reader_import_loads_neither_lightning_nor_transformers():
    heavy = "('lightning', 'transformers', 'datasets')"
    code = f"import sys, actlightning.reader; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_names_the_tool_and_offers_only_prediction_trainer_flags():
    top = run_main(["--help"])
    assert top.returncode == 0 and top.stdout.startswith("usage: actlightning ")
    assert "Export the hidden states" in top.stdout
    predict = run_main(["predict", "--help"])
    assert predict.returncode == 0
    assert "--trainer.devices" in predict.stdout and "--trainer.strategy" in predict.stdout
    assert "--trainer.num_nodes" in predict.stdout and "--trainer.precision" in predict.stdout
    for training_only in ("gradient_clip_val", "max_epochs", "val_check_interval", "weights_only", "seed_everything"):
        assert training_only not in predict.stdout
    assert "<class" not in predict.stdout


def test_an_export_prints_no_third_party_noise(tmp_path, checkpoints, games_file):
    result = run_main(export_args(checkpoints["gpt2"], games_file, tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "not writable", "Loading weights"):
        assert noise not in result.stderr + result.stdout, noise
