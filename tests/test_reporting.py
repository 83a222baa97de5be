"""Plan, progress, summary, dataset card and the report picture."""

from __future__ import annotations

import json
import re
import shutil
from collections import namedtuple

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from actlightning.face.cli import main
from actlightning.read.report import NormStats, collect, render
from actlightning.read.report import main as report_main
from tests.helpers import export_args, run_export, run_main


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    result = run_main(
        export_args(
            checkpoints["gpt2"],
            games_file,
            out,
            **{"writer.dry_run": "true", "model.layers": "[1, 2]", "model.output_dtype": "float16"},
        )
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # 2 columns x 32 wide x 2 bytes + 4 bytes of token id; sizes in human units
    plan = next(line for line in result.stderr.splitlines() if "plan: 40 examples" in line)
    assert "2 vector columns (layer_1, layer_2), 132 bytes per token as float16" in plan
    assert re.search(r"about \d+(\.\d+)? kB in 5 shards; 0 B already written; [\d.]+ [kMGT]?B free at", plan), plan
    assert not out.exists()


def test_plan_text_uses_singulars_and_human_sizes(tmp_path, checkpoints, games_file):
    result = run_main(
        export_args(
            checkpoints["gpt2"],
            games_file,
            tmp_path / "out",
            **{"writer.dry_run": "true", "model.layers": "[1]", "data.limit": 1, "writer.batches_per_shard": 1},
        )
    )
    plan = next(line for line in result.stderr.splitlines() if "plan: " in line and "example" in line)
    assert "plan: 1 example, " in plan and " 1 vector column (layer_1)" in plan and " in 1 shard;" in plan, plan
    assert "0.00 GB" not in plan


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_plan_estimate_matches_the_export(tmp_path, checkpoints, games_file, dtype):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"model.layers": "[0, 3]", "model.output_dtype": dtype})
    manifest = json.loads((out / "manifest.json").read_text())
    plan = manifest["plan"]
    assert plan["examples"] == manifest["totals"]["examples"] == 40 and plan["tokens"] == manifest["totals"]["tokens"]
    assert plan["estimated_shards"] == manifest["totals"]["shards"]
    assert abs(plan["estimated_bytes"] - manifest["totals"]["bytes"]) < 0.15 * manifest["totals"]["bytes"] + 20_000
    # Per token, on disk (this small export's footers would hide a wrong size in the total):
    # bfloat16 takes 2 bytes a value, as float16 does (2-byte binaries).
    per_token = plan["bytes_per_token"]
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
    assert "free; free space, export less" in capsys.readouterr().err
    assert not out.exists()
    main(export_args(checkpoints["gpt2"], games_file, out, **{"writer.ignore_free_space": "true"}))
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_progress_bar_counts_tokens_bytes_and_shards(tmp_path, checkpoints, games_file):
    result = run_main(
        export_args(checkpoints["gpt2"], games_file, tmp_path / "out", **{"trainer.enable_progress_bar": "true"})
    )
    assert result.returncode == 0, result.stderr[-2000:]
    bar = result.stdout  # Lightning's TQDM bars write to stdout
    assert "Exporting" in bar and "tok/s" in bar and "shards=" in bar and "written=" in bar
    final = re.split(r"[\r\n]+", bar.strip())[-1]
    done, total = final.split("| ")[1].split(" ")[0].split("/")
    assert done == total, final
    shards = json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]["shards"]
    assert f"shards={shards}]" in final, "the final bar shows every shard"


def test_summary_and_manifest_carry_the_same_numbers(tmp_path, checkpoints, games_file, caplog):
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"data.limit": 30, "data.sort_by_length": "true"})
    manifest = json.loads((out / "manifest.json").read_text())
    summary = [m for m in caplog.messages if m.startswith("export complete:")][0]
    assert f"{manifest['totals']['examples']:,} examples" in summary
    assert f"{manifest['totals']['tokens']:,} tokens exported in {manifest['totals']['rows']:,} rows" in summary
    assert f"padding efficiency {manifest['data']['padding_efficiency']:.3f}" in summary
    assert "'limit': 10" in summary and manifest["data"]["removed"]["limit"] == 10
    run = manifest["run"]
    assert run["forward_tokens"] == run["exported_tokens"] == manifest["totals"]["tokens"] and run["seconds"] > 0


def test_token_layout_summary_tells_examples_rows_and_both_rates_apart(tmp_path, checkpoints, games_file, caplog):
    out = tmp_path / "out"
    run_export(
        checkpoints["gpt2"], games_file, out, **{"writer.layout": "token", "model.n_pos": 3, "model.layers": "[1]"}
    )
    manifest = json.loads((out / "manifest.json").read_text())
    totals, run = manifest["totals"], manifest["run"]
    assert totals["examples"] == 40 and totals["rows"] == totals["tokens"] == 40 * 3
    assert run["exported_tokens"] == 120 < run["forward_tokens"]
    summary = [m for m in caplog.messages if m.startswith("export complete:")][0]
    assert summary.startswith("export complete: 40 examples, 120 tokens exported in 120 rows (token layout)")
    assert f"forward pass {run['forward_tokens']:,} tokens at" in summary and "exported 120 tokens at" in summary


def test_dataset_card_describes_and_loads_the_export(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(checkpoints["llama"], games_file, out, **{"model.layers": "[2]", "model.output_dtype": "bfloat16"})
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:")
    assert str(checkpoints["llama"]) in card and "`[2]`" in card and "bfloat16" in card
    assert "`layer_2`" in card and "`example_id`" in card
    assert "`None`" not in card and "pypi.org" not in card, "unset settings and foreign links are left out"
    line = next(text for text in card.splitlines() if text.startswith("ds = load_dataset("))
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
    assert not png.exists() and (out / "manifest.json").exists()


def test_report_histograms_give_each_column_its_own_scale(tmp_path, checkpoints, games_file, monkeypatch):
    import matplotlib.figure

    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"model.layers": "[0, 4]"})
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    stats, lengths, export = collect(out)
    render(stats, lengths, export, tmp_path / "report.png")
    histograms = {ax.get_title().split(":")[0]: ax for ax in figures[0].axes if "L2 norm (dashed" in ax.get_title()}
    assert sorted(histograms) == ["layer_0", "layer_4"]
    for name, ax in histograms.items():
        norms = stats[name].norms()
        low, high = ax.get_xlim()
        # the axis spans this column's norms, not every column's
        assert low >= norms.min() - (norms.max() - norms.min()) and high <= norms.max() + (norms.max() - norms.min())


def test_norm_stats_flag_massive_activations():
    stats = NormStats()
    norms = np.ones(1000)
    norms[:3] = 500.0
    stats.add(norms)
    assert stats.maximum == 500.0 and abs(stats.mean - (997 + 1500) / 1000) < 1e-9
    assert (stats.norms() > 10 * np.median(stats.norms())).sum() == 3
