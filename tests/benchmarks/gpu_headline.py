"""The GPU headline at the scale users run (issue 25), in one run sized for a lent H200 (<= 6 minutes).

1. big: a Llama-3-8B-shaped model (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336,
   vocabulary 128256), random bfloat16 weights made on the machine and saved with only the blocks an
   export of ``model.layers: [16]`` loads (0-16; the config keeps all 32), pre-tokenized sequences of
   512-2048 tokens, ``data.auto_find_batch_size`` with a token budget. Tokens/s in the loop and for the
   whole process, the model-FLOP floor (2 x non-embedding parameters used x tokens over the chip's
   dense bf16 peak) and the fraction reached, peak GPU memory, bytes/s written, host peak RSS.
2. all layers: ``bench_export.py`` on the GPT-2-small shape, all 13 layers float16, batch 64, 8 writer
   threads (export / floor), against ``dd`` with fsync to the same disk.
3. startup: ``bench_export.py --only startup`` (process start to the first forward pass, tokens cached).

    python tests/benchmarks/gpu_headline.py --out $OUT                   # on the GPU machine
    python tests/benchmarks/gpu_headline.py --tiny --out /tmp/headline   # CPU dry run of the same logic

Prints a short table last; writes ``headline.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PEAK_BF16_FLOPS = 989e12  # H200 SXM, dense bf16 (the data sheet's 1,979 TFLOP/s is with sparsity)
LLAMA3_8B = {"hidden_size": 4096, "num_layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256}
TINY = {"hidden_size": 64, "num_layers": 32, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512}


def build_checkpoint(folder: Path, shape: dict, keep_blocks: int) -> tuple[Path, int]:
    """A random Llama checkpoint whose config has every layer but whose weights hold only the first
    ``keep_blocks`` blocks (what the export loads); returns it and the non-embedding parameters kept."""
    from transformers import LlamaConfig, LlamaModel

    from actlightning.face.demo import char_tokenizer

    config = LlamaConfig(
        hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"], vocab_size=shape["vocab"],
        max_position_embeddings=4096, dtype="bfloat16",
    )  # fmt: skip
    short = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": keep_blocks})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaModel(short).to(torch.bfloat16)
    body = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    model.save_pretrained(folder)
    config.save_pretrained(folder)  # the full depth: the export loads the first blocks only
    char_tokenizer().save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder, body


def build_sequences(path: Path, count: int, vocab: int, low: int, high: int, seed: int = 0) -> int:
    """``count`` pre-tokenized sequences of ``low``..``high`` tokens as Parquet; returns the tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lengths = rng.integers(low, high + 1, size=count)
    ids = [rng.integers(1, vocab, size=int(n)).astype(np.int32) for n in lengths]
    pq.write_table(pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))}), path)
    return int(lengths.sum())


def big_model(root: Path, tiny: bool) -> dict:
    shape = TINY if tiny else LLAMA3_8B
    start = time.perf_counter()
    checkpoint, body = build_checkpoint(root / "llama-8b-shape", shape, keep_blocks=17)
    built = time.perf_counter() - start
    data = root / "sequences.parquet"
    tokens = build_sequences(data, 16 if tiny else 640, shape["vocab"], 32 if tiny else 512, 64 if tiny else 2048)
    out = root / "big-export"
    settings = {
        "model.checkpoint": str(checkpoint), "model.dtype": "bfloat16", "model.layers": "[16]",
        "data.path": "parquet", "data.data_files": str(data), "data.input_column": "input_ids",
        "data.batch_size": 256, "data.max_tokens": 8192 if tiny else 262144, "data.sort_by_length": "true",
        "data.auto_find_batch_size": "true", "writer.output_dir": str(out), "writer.overwrite": "true",
        "writer.batches_per_shard": 8, "writer.writer_threads": 4,
        "trainer.accelerator": "gpu" if torch.cuda.is_available() else "cpu", "trainer.enable_progress_bar": "false",
    }  # fmt: skip
    command = [sys.executable, "-m", "actlightning", "predict"]
    command += [x for key, value in settings.items() for x in (f"--{key}", str(value))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    process = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    manifest = json.loads((out / "manifest.json").read_text())
    run = manifest["run"]
    floor_seconds = 2 * body * run["forward_tokens"] / PEAK_BF16_FLOPS
    return {
        "checkpoint_build_seconds": built,
        "non_embedding_parameters_used": body,
        "tokens": tokens,
        "loop_tokens_per_second": run["forward_tokens_per_second"],
        "process_tokens_per_second": run["forward_tokens"] / process,
        "process_seconds": process,
        "seconds_to_first_batch": run.get("seconds_to_first_batch"),
        "flop_floor_tokens_per_second": run["forward_tokens"] / floor_seconds,
        "fraction_of_flop_floor": floor_seconds / run["seconds"],
        "bytes_written_per_second": manifest["totals"]["bytes"] / run["seconds"],
        "batch_search": {k: v for k, v in manifest["data"].items() if k in ("batch_size", "max_tokens")},
        "peak_gpu_memory_note": "see the export's log (torch.cuda.max_memory_allocated is per process)",
        "log_tail": result.stderr[-1500:],
    }


def bench(args: list[str], out: Path) -> dict:
    path = out / f"bench-{args[1]}.json"
    subprocess.run(
        [sys.executable, str(REPO / "tests/benchmarks/bench_export.py"), *args, "--json", str(path)], check=True
    )
    return json.loads(path.read_text())


def dd_fsync(folder: Path, megabytes: int) -> float:
    """MB/s of ``dd`` writing ``megabytes`` with fsync at the end."""
    target = folder / "dd.bin"
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", "conv=fsync"],
                   check=True, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - start
    target.unlink()
    return megabytes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("headline"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU dry run of the same logic")
    parser.add_argument("--only", default="big,all_layers,startup")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory(dir=args.out if args.tiny else None) as folder:
        root = Path(folder)
        if "big" in args.only:
            results["big"] = big_model(root, args.tiny)
        small = ["--examples", "32", "--hidden-size", "64"] if args.tiny else ["--examples", "4096"]
        gpu = ["--device", "cuda", "--batch-size", "64", "--writer-threads", "8"] if torch.cuda.is_available() else []
        if "all_layers" in args.only:
            results["all_layers"] = bench(["--only", "floor,export", *small, *gpu], args.out)
            results["dd_fsync_mb_per_s"] = dd_fsync(root, 64 if args.tiny else 4096)
        if "startup" in args.only:
            results["startup"] = bench(["--only", "startup", "--layers", "6", "--repeat", "2", *small, *gpu], args.out)
    results["host_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    (args.out / "headline.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(summary(results))


def summary(results: dict) -> str:
    lines = [f"device: {results['device']}"]
    big = results.get("big")
    if big:
        floor = big["flop_floor_tokens_per_second"]
        lines.append(
            f"8B-shape layer 16: {big['loop_tokens_per_second']:,.0f} tok/s in the loop, "
            f"{big['process_tokens_per_second']:,.0f} for the process; floor {floor:,.0f} "
            f"tok/s -> {big['fraction_of_flop_floor']:.2f} of it; first batch {big['seconds_to_first_batch']} s"
        )
    if "all_layers" in results:
        export, floor = results["all_layers"]["export"], results["all_layers"]["floor"]
        mb = export["bytes"] / export["seconds"] / 1e6
        limit = min(floor["tokens_per_second"], results["dd_fsync_mb_per_s"] / mb * export["tokens_per_second"])
        lines.append(
            f"all 13 layers: {export['tokens_per_second']:,.0f} tok/s ({mb:,.0f} MB/s); floor "
            f"{floor['tokens_per_second']:,.0f}; dd {results['dd_fsync_mb_per_s']:,.0f} MB/s -> "
            f"{export['tokens_per_second'] / limit:.2f} of min(floor, disk); peak RSS {export['peak_rss_mb']:,.0f} MB"
        )
    if "startup" in results:
        lines.append(f"first batch: {results['startup']['startup']['seconds_to_first_batch_median']} s (median)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
