"""Benchmark of the training side (issue 23): the global shuffle against a plain copy and ``dd``, and the
training reader against pyarrow reading the same column alone. Run by hand; numbers go to RESULTS.md.

    python tests/benchmarks/bench_training.py                      # ~400 MB synthetic export, float16
    python tests/benchmarks/bench_training.py --shards 4 --rows 4096 --width 64   # a quick look

The source is a synthetic token-layout export (random float16 vectors, written with the export's own
shard files), so the benchmark needs no model.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def build_source(folder: Path, shards: int, rows: int, width: int) -> int:
    """A token-layout export of ``shards`` x ``rows`` float16 vectors of ``width``; returns its bytes."""
    import pyarrow as pa

    from actlightning.files.manifest import MANIFEST, build_manifest, manifest_bytes
    from actlightning.files.schema import build_features, build_schema
    from actlightning.files.shard_file import ShardFile, parquet_options
    from actlightning.files.storage import LocalLocation

    schema = build_schema(build_features({"layer_0": width}, "float16", {}, "token"), "float16")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    infos = []
    for shard in range(shards):
        file = ShardFile(folder, shard, 0, schema, parquet_options(schema, "none", ["layer_0"]))
        for start in range(0, rows, 8192):  # row groups of 8k tokens, as an export writes batches
            n = min(8192, rows - start)
            ids = np.arange(n) + shard * rows + start
            vectors = rng.standard_normal((n, width), dtype=np.float32).astype(np.float16)
            columns = [pa.array(ids, pa.int64()), pa.array(np.zeros(n, np.int32)), pa.array(np.zeros(n, np.int32))]
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), width))
            file.write(pa.table(columns, schema=schema), n, n)
        infos.append(file.close())
    model = {"checkpoint": "synthetic", "revision": None, "dtype": "float16", "layers": [0], "hook_points": []}
    model.update(n_pos=None, output_dtype="float16", hidden_size=width, num_layers=1)
    data = {"path": "synthetic", "name": None, "split": "train", "data_files": None, "revision": None}
    settings = {"model": model, "data": {**data, "input_column": "text"}, "layout": "token"}
    LocalLocation(folder).write_bytes(MANIFEST, manifest_bytes(build_manifest(settings, infos, True, {})))
    return sum(info.bytes for info in infos)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - start


def copy_rate(source: Path, work: Path, nbytes: int) -> dict:
    copy = work / "copy"
    start = time.perf_counter()
    shutil.copytree(source, copy)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(copy)
    dd = timed(["dd", "if=/dev/zero", f"of={work / 'dd.bin'}", "bs=1M", f"count={nbytes >> 20}", "conv=fsync"])
    (work / "dd.bin").unlink()
    return {"copy_gb_per_s": nbytes / seconds / 1e9, "dd_fsync_gb_per_s": nbytes / dd / 1e9}


def shuffle_rate(source: Path, work: Path, nbytes: int, workers: int, memory: str) -> dict:
    dst = work / f"shuffled-{workers}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    command = [sys.executable, "-m", "actlightning", "shuffle", str(source), str(dst), "--seed", "0"]
    seconds = timed([*command, "--max_memory", memory, "--workers", str(workers), "--overwrite"])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(dst)
    return {
        "seconds": seconds,
        "gb_per_s": nbytes / seconds / 1e9,
        "largest_child_peak_rss_mb": max(peak, before) / 1024,
    }


def reader_rates(source: Path, batch: int) -> dict:
    import torch

    from actlightning.reader import TokenVectors

    start = time.perf_counter()
    tokens = nbytes = 0
    for path in sorted(source.glob("*.parquet")):
        column = pq.read_table(path, columns=["layer_0"]).column(0)
        values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        tokens, nbytes = tokens + len(column), nbytes + values.nbytes
    baseline = time.perf_counter() - start
    results = {"pyarrow_alone": {"tokens_per_second": tokens / baseline, "gb_per_s": nbytes / baseline / 1e9}}
    for workers in (1, 2, 4):
        vectors = TokenVectors(source, "layer_0", batch, shuffle_buffer=4 * batch, seed=0)
        loader = torch.utils.data.DataLoader(vectors, batch_size=None, num_workers=workers)
        start = time.perf_counter()
        count = sum(len(b) for b in loader)
        seconds = time.perf_counter() - start
        rate = count / seconds
        results[f"workers_{workers}"] = {"tokens_per_second": rate, "over_pyarrow": rate * baseline / tokens}
    counts = []
    start = time.perf_counter()
    for rank in range(2):
        ranked = TokenVectors(source, "layer_0", batch, 4 * batch, 0, rank=rank, world_size=2, even_batches=True)
        counts.append(sum(1 for _ in torch.utils.data.DataLoader(ranked, batch_size=None, num_workers=2)))
    seconds = time.perf_counter() - start
    results["even_batches_two_ranks"] = {"batches": counts, "tokens_per_second": sum(counts) * batch / seconds}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16384, help="token rows per source shard")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--max-memory", default="128MB")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="actlightning-training-bench-") as folder:
        work = Path(folder)
        source = work / "source"
        nbytes = build_source(source, args.shards, args.rows, args.width)
        report: dict = {"settings": vars(args), "source_bytes": nbytes}
        report["copy"] = copy_rate(source, work, nbytes)
        for workers in (1, 2):
            report[f"shuffle_workers_{workers}"] = shuffle_rate(source, work, nbytes, workers, args.max_memory)
            report[f"shuffle_workers_{workers}"]["over_copy"] = (
                report[f"shuffle_workers_{workers}"]["gb_per_s"] / report["copy"]["copy_gb_per_s"]
            )
        report["reader"] = reader_rates(source, args.batch)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
