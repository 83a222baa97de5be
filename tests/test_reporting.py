"""Plan, progress, summary, dataset card and the report picture."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from actlightning.cli import main
from actlightning.report import NormStats
from actlightning.report import main as report_main
from tests.helpers import export_args, run_cli, run_export


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    result = run_cli(export_args(checkpoints["gpt2"], games_file, out, **{"writer.dry_run": "true", "model.layers": "[1, 2]", "model.output_dtype": "float16"}))
    assert result.returncode == 0, result.stderr[-2000:]
    # 2 columns x 32 wide x 2 bytes + 4 bytes of token id
    assert "plan: 40 examples" in result.stderr and "132 bytes per token as float16" in result.stderr
    assert "in 5 shards" in result.stderr and "free at" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_plan_estimate_matches_the_export(tmp_path, checkpoints, games_file, caplog, dtype):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"model.layers": "[0, 3]", "model.output_dtype": dtype})
    manifest = json.loads((out / "manifest.json").read_text())
    planned = [r for r in caplog.messages if r.startswith("plan:") and "examples" in r][0]
    estimate_gb = float(planned.split("about ")[1].split(" GB")[0])
    assert abs(estimate_gb * 1e9 - manifest["totals"]["bytes"]) < 0.15 * manifest["totals"]["bytes"] + 0.01e9
    # Per token, on disk (this small export's footers would hide a wrong size in the total):
    # bfloat16 takes 4 bytes a value, as Parquet stores uint16 in INT32.
    per_token = int(planned.split(" bytes per token")[0].rsplit(" ", 1)[1])
    vector_bytes = 0
    for shard in out.glob("*.parquet"):
        metadata = pq.read_metadata(shard)
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                if chunk.path_in_schema.startswith("layer_"):
                    vector_bytes += chunk.total_compressed_size
    assert vector_bytes / manifest["totals"]["tokens"] == pytest.approx(per_token - 4, rel=0.1)


def test_estimate_above_free_space_stops_before_exporting(tmp_path, checkpoints, games_file, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(export_args(checkpoints["gpt2"], games_file, out))
    assert exit_info.value.code == 2
    assert "GB free; free space, export less" in capsys.readouterr().err
    assert not out.exists()
    main(export_args(checkpoints["gpt2"], games_file, out, **{"writer.ignore_free_space": "true"}))
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_progress_bar_counts_tokens_bytes_and_shards(tmp_path, checkpoints, games_file):
    result = run_cli(export_args(checkpoints["gpt2"], games_file, tmp_path / "out", **{"trainer.enable_progress_bar": "true"}))
    assert result.returncode == 0, result.stderr[-2000:]
    bar = result.stdout  # Lightning's TQDM bars write to stdout
    assert "Exporting" in bar and "tok/s" in bar and "shards=" in bar and "written=" in bar
    final = bar.strip().splitlines()[-1]
    done, total = final.split("| ")[1].split(" ")[0].split("/")
    assert done == total, final


def test_summary_and_manifest_carry_the_same_numbers(tmp_path, checkpoints, games_file, caplog):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"data.limit": 30, "data.sort_by_length": "true"})
    manifest = json.loads((out / "manifest.json").read_text())
    summary = [m for m in caplog.messages if m.startswith("export complete:")][0]
    assert f"{manifest['totals']['rows']:,} examples" in summary
    assert f"{manifest['totals']['tokens']:,} tokens" in summary
    assert f"padding efficiency {manifest['data']['padding_efficiency']}" in summary
    assert "'limit': 10" in summary and manifest["data"]["removed"]["limit"] == 10
    assert manifest["run"]["tokens"] == manifest["totals"]["tokens"] and manifest["run"]["seconds"] > 0


def test_dataset_card_describes_and_loads_the_export(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(checkpoints["llama"], games_file, out, **{"model.layers": "[2]", "model.output_dtype": "bfloat16"})
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:")
    assert str(checkpoints["llama"]) in card and "`[2]`" in card and "bfloat16" in card
    assert "`layer_2`" in card and "`example_id`" in card
    line = next(l for l in card.splitlines() if l.startswith("ds = load_dataset("))
    namespace = {"load_dataset": load_dataset}
    exec(line, namespace)  # the card's own loading line works
    assert len(namespace["ds"]) == 40


def test_report_renders_a_png_from_a_tiny_export(tmp_path, checkpoints, games_file, capsys):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"model.output_dtype": "float16"})
    report_main([str(out)])
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = capsys.readouterr().out
    assert all(f"layer_{i}" in text for i in range(5)) and "mean norm" in text
    # the picture is one of this tool's files: a rerun with overwrite may delete it
    run_export(checkpoints["gpt2"], games_file, out, **{"model.output_dtype": "float16", "writer.overwrite": "true"})


def test_norm_stats_flag_massive_activations():
    stats = NormStats()
    norms = np.ones(1000)
    norms[:3] = 500.0
    stats.add(norms)
    assert stats.maximum == 500.0 and abs(stats.mean - (997 + 1500) / 1000) < 1e-9
    assert (stats.norms() > 10 * np.median(stats.norms())).sum() == 3
