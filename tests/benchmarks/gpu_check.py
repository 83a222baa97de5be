"""CUDA checks and GPU throughput, in one run (for a lent GPU machine; see the README).

1. Fidelity on CUDA: tiny GPT-2 and Llama exports (float32 compute, right and left padding) against the
   model's own unpadded forward; bfloat16 compute against the unpadded bfloat16 forward (reported).
2. Out of memory for real: the batch-size search and split-and-retry under a small memory cap, rows
   identical to an uncapped run.
3. Throughput: the benchmark's floor and export phases on a GPT-2-small-shaped model.

    python tests/benchmarks/gpu_check.py --out results/   # prints a summary table last
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from actlightning.cli import ActLightningCLI  # noqa: E402
from actlightning.demo import chess_games, save_checkpoint  # noqa: E402
from tests.helpers import Reference, read_rows  # noqa: E402

# A dry run of the script's logic works on a machine without CUDA, too.
ACCELERATOR = "gpu" if torch.cuda.is_available() else "cpu"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def export(checkpoint: Path, data: Path, out: Path, **overrides) -> None:
    settings = {
        "model.checkpoint": str(checkpoint), "model.dtype": "float32", "data.path": "json",
        "data.data_files": str(data), "data.input_column": "Transcript", "data.batch_size": "8",
        "writer.output_dir": str(out), "writer.batches_per_shard": "2", "trainer.accelerator": ACCELERATOR,
        "trainer.devices": "1", "trainer.enable_progress_bar": "false", **{k: str(v) for k, v in overrides.items()},
    }
    args = ["predict"]
    for key, value in settings.items():
        args += [f"--{key}", value]
    ActLightningCLI(args=args)


def fidelity(root: Path) -> dict:
    data = root / "games.jsonl"
    data.write_text("".join(json.dumps(g) + "\n" for g in chess_games(64, seed=5, min_moves=1, max_moves=60)))
    texts = [json.loads(line)["Transcript"] for line in data.read_text().splitlines()]
    results = {}
    for arch in ("gpt2", "llama"):
        checkpoint = save_checkpoint(root / arch, arch, num_layers=4, hidden_size=64, context=512, seed=3)
        reference = Reference(checkpoint)
        for side in ("right", "left"):
            out = root / f"{arch}-{side}"
            export(checkpoint, data, out, **{"data.padding_side": side})
            worst = 0.0
            for row in read_rows(out):
                tokens = reference.tokens(texts[row["example_id"]])
                expected = reference.hidden_states(tokens)
                assert row["input_ids"] == tokens
                for name in (k for k in row if k.startswith("layer_")):
                    worst = max(worst, float(np.abs(row[name] - expected[int(name[6:])]).max()))
            results[f"{arch}-{side}-float32-max-abs-diff-vs-cpu"] = worst
            assert worst <= 1e-4, f"{arch} {side}: {worst}"
        # bfloat16 compute: compare with the same model's unpadded bfloat16 forward on the GPU.
        out = root / f"{arch}-bf16"
        export(checkpoint, data, out, **{"model.dtype": "bfloat16", "data.sort_by_length": "true"})
        from transformers import AutoModel

        model = AutoModel.from_pretrained(checkpoint, dtype=torch.bfloat16).to(DEVICE).eval()
        worst, scale = 0.0, 0.0
        with torch.inference_mode():
            for row in read_rows(out):
                tokens = torch.tensor([reference.tokens(texts[row["example_id"]])], device=DEVICE)
                hidden = model(tokens, output_hidden_states=True).hidden_states
                for name in (k for k in row if k.startswith("layer_")):
                    want = hidden[int(name[6:])][0].float().cpu().numpy()
                    worst = max(worst, float(np.abs(row[name] - want).max()))
                    scale = max(scale, float(np.abs(want).max()))
        results[f"{arch}-bfloat16-max-abs-diff-vs-unpadded-bf16 (max |x| {scale:.1f})"] = worst
    return results


def out_of_memory(root: Path) -> dict:
    checkpoint = save_checkpoint(root / "oom-model", "gpt2", num_layers=12, hidden_size=768, context=1024, seed=1)
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps(g) + "\n" for g in chess_games(96, seed=2, min_moves=150, max_moves=200)))
    base = {"model.layers": "[3, 12]", "data.sort_by_length": "true", "data.sort_reversed": "true", "model.output_dtype": "float16"}
    export(checkpoint, data, root / "plain", **base, **{"data.batch_size": 8})
    # Cap this process at ~2.5 GB: batches of 96 x 1000 tokens do not fit.
    fraction = 2.5e9 / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        export(checkpoint, data, root / "search", **base, **{"data.batch_size": 96, "data.auto_find_batch_size": "true"})
        found = json.loads((root / "search" / "manifest.json").read_text())["data"]["batch_size"]
        # Split and retry: a batch size far above what fits, no search.
        export(checkpoint, data, root / "split", **base, **{"data.batch_size": 96})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    plain = read_rows(root / "plain")
    for other in ("search", "split"):
        rows = read_rows(root / other)
        assert [r["example_id"] for r in rows] == [r["example_id"] for r in plain]
        for a, b in zip(plain, rows):
            for name in ("layer_3", "layer_12"):
                np.testing.assert_allclose(a[name], b[name], atol=2e-3, rtol=2e-3)
    return {"batch_size_found_under_2.5GB_cap": found, "search_and_split_rows_identical": True}


def throughput(root: Path, examples: int) -> dict:
    bench = REPO / "tests" / "benchmarks" / "bench_export.py"
    results = {}
    runs = [
        ("all-layers-fp16-1thread", ["--layers", "all", "--writer-threads", "1"]),
        ("all-layers-fp16-8threads", ["--layers", "all", "--writer-threads", "8"]),
        ("layer6-fp16-8threads", ["--layers", "6", "--writer-threads", "8", "--only", "export"]),
    ]
    for name, extra in runs:
        command = [sys.executable, str(bench), "--device", DEVICE, "--examples", str(examples), "--batch-size", "64",
                   "--batches-per-shard", "8", "--workdir", str(root / "bench"), *extra]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            results[name] = f"failed: {result.stderr[-1500:]}"
            continue
        report = json.loads(result.stdout[result.stdout.index("{"):])
        results[name] = {
            "floor_tokens_per_s": report.get("floor", {}).get("tokens_per_second"),
            "export_tokens_per_s": report["export"]["tokens_per_second"],
            "export_over_floor": report.get("export_over_floor"),
            "export_MB_per_s": report["export"]["bytes"] / report["export"]["seconds"] / 1e6,
            "peak_rss_mb": report["export"]["peak_rss_mb"],
            "wall_s": round(time.perf_counter() - started, 1),
        }
        import shutil

        shutil.rmtree(root / "bench" / "export", ignore_errors=True)
    results["writer_alone"] = json.loads(
        subprocess.run([sys.executable, str(bench), "--only", "writer", "--writer-threads", "1,4,8",
                        "--workdir", str(root / "bench")], capture_output=True, text=True).stdout.split('"writer": ')[1].split("}")[0] + "}"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--only", default="fidelity,oom,throughput")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    for name, check in [("fidelity", fidelity), ("oom", out_of_memory), ("throughput", throughput)]:
        if name not in args.only:
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                summary[name] = check(Path(folder), args.examples) if name == "throughput" else check(Path(folder))
            except Exception:  # noqa: BLE001 - report and go on to the next check
                summary[name] = "FAILED: " + traceback.format_exc()[-3000:]
        summary[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
