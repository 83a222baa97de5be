"""CUDA checks and GPU throughput, in one run (for a lent GPU machine; see the README).

1. Fidelity on CUDA: tiny GPT-2 and Llama exports (float32 compute; right and left padding; sequence
   and token layouts) against the model's own unpadded forward; bfloat16 compute against the unpadded
   bfloat16 forward (reported).
2. Out of memory for real: the batch-size search and split-and-retry under a small memory cap, rows
   equal to an uncapped run within tolerance.
3. Throughput, back to back on one machine (GPT-2-small shape): the forward floor; `layers: [6]`;
   all 13 layers as float16 with 1, 2, 4 and 8 writer threads, direct vs `arrow` encoder; the writer
   alone; `dd` with fsync to the same disk; peak host RSS of each export.

    python tests/benchmarks/gpu_check.py --out results/   # prints a summary table last
    python tests/benchmarks/gpu_check.py --examples 16 --hidden-size 64 --threads 1,2 --out /tmp/r  # CPU dry run
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

from actlightning.face.cli import ActLightningCLI  # noqa: E402
from actlightning.face.demo import chess_games, save_checkpoint  # noqa: E402
from tests.helpers import Reference, read_rows, read_token_rows  # noqa: E402

# A dry run of the script's logic works on a machine without CUDA, too.
ACCELERATOR = "gpu" if torch.cuda.is_available() else "cpu"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def export(checkpoint: Path, data: Path, out: Path, **overrides) -> None:
    settings = {
        "model.checkpoint": str(checkpoint),
        "model.dtype": "float32",
        "data.path": "json",
        "data.data_files": str(data),
        "data.input_column": "Transcript",
        "data.batch_size": "8",
        "writer.output_dir": str(out),
        "writer.batches_per_shard": "2",
        "trainer.accelerator": ACCELERATOR,
        "trainer.devices": "1",
        "trainer.enable_progress_bar": "false",
        **{k: str(v) for k, v in overrides.items()},
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
        for side, layout in (("right", "sequence"), ("left", "sequence"), ("right", "token"), ("left", "token")):
            out = root / f"{arch}-{side}-{layout}"
            export(checkpoint, data, out, **{"data.padding_side": side, "writer.layout": layout})
            worst = 0.0
            rows = read_rows(out) if layout == "sequence" else read_token_rows(out)
            for row in rows:
                example = row["example_id"]
                tokens, expected = reference.of(texts[example])
                if layout == "sequence":
                    assert row["input_ids"] == tokens
                    pairs = [(row[n], expected[int(n[6:])]) for n in row if n.startswith("layer_")]
                else:
                    assert row["token_id"] == tokens[row["position"]]
                    pairs = [(row[n], expected[int(n[6:])][row["position"]]) for n in row if n.startswith("layer_")]
                for got, want in pairs:
                    worst = max(worst, float(np.abs(got - want).max()))
            results[f"{arch}-{side}-{layout}-float32-max-abs-diff-vs-cpu"] = worst
            assert worst <= 1e-4, f"{arch} {side} {layout}: {worst}"
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
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    checkpoint = save_checkpoint(root / "oom-model", "gpt2", num_layers=12, hidden_size=768, context=1024, seed=1)
    data = root / "long.jsonl"
    data.write_text("".join(json.dumps(g) + "\n" for g in chess_games(96, seed=2, min_moves=150, max_moves=200)))
    base = {
        "model.layers": "[3, 12]",
        "data.sort_by_length": "true",
        "data.sort_reversed": "true",
        "model.output_dtype": "float16",
    }
    export(checkpoint, data, root / "plain", **base, **{"data.batch_size": 8})
    # Cap this process at ~2.5 GB: batches of 96 x 1000 tokens do not fit.
    fraction = 2.5e9 / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        export(
            checkpoint, data, root / "search", **base, **{"data.batch_size": 96, "data.auto_find_batch_size": "true"}
        )
        found = json.loads((root / "search" / "manifest.json").read_text())["data"]["batch_size"]
        # Split and retry: a batch size far above what fits, no search.
        export(checkpoint, data, root / "split", **base, **{"data.batch_size": 96})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    plain = read_rows(root / "plain")
    for other in ("search", "split"):
        rows = read_rows(root / other)
        assert [r["example_id"] for r in rows] == [r["example_id"] for r in plain]
        for a, b in zip(plain, rows, strict=True):
            for name in ("layer_3", "layer_12"):
                np.testing.assert_allclose(a[name], b[name], atol=2e-3, rtol=2e-3)
    return {"batch_size_found_under_2.5GB_cap": found, "search_and_split_rows_equal_within_2e-3": True}


def dd_write_speed(folder: Path, megabytes: int = 2048) -> dict:
    """The disk's sequential write speed with fsync, as ``dd`` measures it (the export's ceiling)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "dd.bin"
    started = time.perf_counter()
    result = subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fsync"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    target.unlink(missing_ok=True)
    if result.returncode != 0:
        return {"failed": result.stderr[-500:]}
    return {"MB_per_s": round(megabytes * 1.048576 / seconds, 1), "dd": result.stderr.strip().splitlines()[-1]}


def _bench(root: Path, examples: int, hidden_size: int, extra: list[str]) -> dict:
    bench = REPO / "tests" / "benchmarks" / "bench_export.py"
    command = [
        sys.executable,
        str(bench),
        "--device",
        DEVICE,
        "--examples",
        str(examples),
        "--batch-size",
        "64",
        "--batches-per-shard",
        "8",
        "--hidden-size",
        str(hidden_size),
        "--workdir",
        str(root / "bench"),
        *extra,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"failed": result.stderr[-1500:]}
    report = json.loads(result.stdout[result.stdout.index("{") :])
    import shutil

    shutil.rmtree(root / "bench" / "export", ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def throughput(root: Path, examples: int, hidden_size: int = 768, threads: str = "1,2,4,8") -> dict:
    """Every number of the GPU headline, back to back on this machine."""
    results: dict = {"dd_fsync": dd_write_speed(root / "bench")}
    floor = _bench(root, examples, hidden_size, ["--only", "floor"])
    results["floor_all_layers"] = floor.get("floor", floor)
    floor6 = _bench(root, examples, hidden_size, ["--only", "floor", "--layers", "6"])
    results["floor_layer6"] = floor6.get("floor", floor6)
    runs = [("layer6-fp16-direct-1thread", ["--layers", "6", "--writer-threads", "1"])]
    for encoder in ("direct", "arrow"):
        for count in threads.split(","):
            runs.append(
                (
                    f"all-layers-fp16-{encoder}-{count}threads",
                    ["--layers", "all", "--writer-threads", count, "--vector-encoder", encoder],
                )
            )
    for name, extra in runs:
        report = _bench(root, examples, hidden_size, ["--only", "export", *extra])
        if "export" not in report:
            results[name] = report
            continue
        done = report["export"]
        own_floor = results["floor_layer6" if "layer6" in name else "floor_all_layers"]
        floor_rate = own_floor.get("tokens_per_second") if isinstance(own_floor, dict) else None
        results[name] = {
            "export_tokens_per_s": done["tokens_per_second"],
            "export_over_own_floor_rate": round(done["tokens_per_second"] / floor_rate, 3) if floor_rate else None,
            "export_MB_per_s": round(done["bytes"] / done["seconds"] / 1e6, 1),
            "peak_rss_mb": done.get("peak_rss_mb"),
            "wall_s": report["wall_s"],
        }
    writer = _bench(root, examples, hidden_size, ["--only", "writer", "--writer-threads", threads])
    results["writer_alone"] = writer.get("writer", writer)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--only", default="fidelity,oom,throughput")
    parser.add_argument("--hidden-size", type=int, default=768, help="throughput model width (768: GPT-2 small)")
    parser.add_argument("--threads", default="1,2,4,8", help="writer threads to compare")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    for name, check in [("fidelity", fidelity), ("oom", out_of_memory), ("throughput", throughput)]:
        if name not in args.only:
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            try:
                if name == "throughput":
                    summary[name] = throughput(Path(folder), args.examples, args.hidden_size, args.threads)
                else:
                    summary[name] = check(Path(folder))
            except Exception:  # report it and go on to the next check
                summary[name] = "FAILED: " + traceback.format_exc()[-3000:]
        summary[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
