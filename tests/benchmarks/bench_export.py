"""Benchmark: export time against the forward-only floor, memory, writer and reader throughput.

Run by hand (not a test). It builds a GPT-2-small-shaped model (12 layers, 768 wide, random init,
character vocabulary, like the chess models this tool was made for) and a length-skewed chess dataset,
then measures, each phase in its own process so peak memory is its own:

1. floor: the same model over the same batches with ``output_hidden_states``, nothing kept;
2. export: the full export through the real CLI (``ActLightningCLI``), timed over the predict loop;
3. their ratio, tokens/s, bytes written, peak RSS and padding efficiency;
4. optionally: the same export on 4x the data (peak-memory scaling), the writer alone (encode + write
   shards from in-memory arrays) with 1..N threads, and the reader.

    python tests/benchmarks/bench_export.py --examples 96 --layers all
    python tests/benchmarks/bench_export.py --layers 6 --examples 96
    python tests/benchmarks/bench_export.py --device cuda --examples 4096 --batch-size 64 --writer-threads 8
    python tests/benchmarks/bench_export.py --only writer --writer-threads 1,2
    python tests/benchmarks/bench_export.py --only writer --vector-encoder arrow   # pyarrow's encoder, for comparison
    python tests/benchmarks/bench_export.py --hidden-size 256 --examples 128 --only export,scaling
    python tests/benchmarks/bench_export.py --only s3 --repeat 3      # local disk vs a local S3 server (moto)
    python tests/benchmarks/bench_export.py --only startup --layers 6 --repeat 3   # process start -> first batch

The scaling run needs enough batches (here 8 vs 32) to fill the writer pipeline in both runs; with
only a couple of batches the 1x run never holds ``max_pending_batches`` in flight.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def build_assets(workdir: Path, examples: int, hidden_size: int = 768, seed: int = 0) -> tuple[Path, Path]:
    """A GPT-2-small-shaped checkpoint (12 layers) and ``examples`` chess games with log-normal lengths."""
    from actlightning.face.demo import _random_move, save_checkpoint

    model_dir = workdir / f"gpt2-12x{hidden_size}-chess"
    if not (model_dir / "config.json").exists():
        save_checkpoint(model_dir, "gpt2", num_layers=12, hidden_size=hidden_size, context=1024, seed=seed)
    data = workdir / f"games-{examples}.jsonl"
    if not data.exists():
        import random

        rng = random.Random(seed)
        np_rng = np.random.default_rng(seed)
        with open(data, "w") as handle:
            for _ in range(examples):
                # about 5 characters (tokens) per move; median ~40 moves, long tail capped at the context
                moves = int(np.clip(np_rng.lognormal(3.7, 0.6), 1, 200))
                text = " ".join(_random_move(rng) for _ in range(moves))[:1023]
                handle.write(json.dumps({"Transcript": text, "WhiteElo": rng.randint(800, 2800)}) + "\n")
    return model_dir, data


def _set_mmap_threshold(nbytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD, fixed: what earlier versions of the CLI set to bound peak memory.

    Kept to reproduce RESULTS.md: it cost the forward pass 9-15% and bounded nothing measurable.
    """
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def _rss_mb() -> float:
    """Resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssKinds:
    """Peaks of anonymous and of file-backed resident memory, sampled every 2 ms on a thread.

    The kernel keeps only the total's peak. File-backed pages are clean page cache of memory-mapped
    files (Arrow caches): counted in RSS, but shared and dropped under memory pressure.
    """

    def __init__(self) -> None:
        import threading

        self.peaks = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], int(line.split()[1]) / 1024)
            time.sleep(0.002)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_anon_mb": self.peaks["RssAnon"], "peak_file_mb": self.peaks["RssFile"]}


def _data_module(model_dir: Path, data: Path, args) -> object:
    """The export's data module, planned as the CLI plans it (no model: no truncation, no search)."""
    from actlightning.contracts import ExportPlan
    from actlightning.data.module import ActivationDataModule

    dm = ActivationDataModule(
        path="json",
        data_files=str(data),
        input_column="Transcript",
        batch_size=args.batch_size,
        bucket_size=args.bucket_size,
        tokenizer=str(model_dir),
    )
    plan = ExportPlan({}, [], {}, "float32", None, {}, {})
    dm.plan_export(plan, None, lambda batch: True, args.batches_per_shard, None)
    return dm


def phase_floor(args) -> dict:
    """The same batches through the plain model with output_hidden_states; nothing kept."""
    import torch
    from transformers import AutoModel

    from actlightning.data.batching import rank_batches
    from actlightning.data.collate import collate

    model_dir, data = Path(args.model_dir), Path(args.data)
    if args.mmap_threshold:
        _set_mmap_threshold(args.mmap_threshold)
    dm = _data_module(model_dir, data, args)
    shards = dm.plan.shards
    ids = list(range(len(shards)))
    planned = rank_batches(shards, ids, list(range(len(shards))))
    batches = [collate(dm.store, b, dm.pad_id) for b in planned]
    device = torch.device(args.device)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokens = sum(int(b.lengths.sum()) for b in batches)
    with torch.inference_mode():
        if device.type == "cuda":
            model(input_ids=batches[0].input_ids.to(device), output_hidden_states=True)  # CUDA context, kernels
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model(
                input_ids=batch.input_ids.to(device, non_blocking=True),
                attention_mask=batch.attention_mask.to(device, non_blocking=True),
                position_ids=batch.position_ids.to(device, non_blocking=True),
                output_hidden_states=True,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds, "peak_rss_mb": _peak_rss_mb()}


def phase_export(args) -> dict:
    """The full export through the real CLI."""
    from actlightning.face.cli import ActLightningCLI
    from actlightning.files.manifest import read_manifest
    from actlightning.files.storage import open_location

    settings = {
        "model.checkpoint": args.model_dir,
        "model.dtype": "float32",
        "model.output_dtype": args.output_dtype,
        "data.path": "json",
        "data.data_files": args.data,
        "data.input_column": "Transcript",
        "data.batch_size": args.batch_size,
        "data.bucket_size": args.bucket_size or None,
        # A folder, or a URL (s3://...: the AWS_* environment points it at the server).
        "writer.output_dir": args.out,
        "writer.overwrite": "true",
        "writer.batches_per_shard": args.batches_per_shard,
        "writer.vector_encoder": args.vector_encoder,
        # A comma list of thread counts is for the writer phase; the export uses the first.
        "writer.writer_threads": str(args.writer_threads).split(",")[0],
        "writer.compression": args.compression,
        "writer.compression_level": args.compression_level,
        "model.layers": None if args.layers == "all" else f"[{args.layers}]",
        "trainer.accelerator": "gpu" if args.device == "cuda" else "cpu",
    }
    if args.mmap_threshold:
        _set_mmap_threshold(args.mmap_threshold)
    start = time.perf_counter()
    ActLightningCLI(args=_predict_args(settings))
    total = time.perf_counter() - start
    manifest = read_manifest(open_location(args.out))
    assert manifest is not None, "the export wrote its manifest"
    return {
        "seconds": manifest["run"]["seconds"],
        "total_seconds_with_startup": total,
        "tokens": manifest["run"]["forward_tokens"],
        "tokens_per_second": manifest["run"]["forward_tokens_per_second"],
        "bytes": manifest["totals"]["bytes"],
        "shards": manifest["totals"]["shards"],
        "padding_efficiency": manifest["data"]["padding_efficiency"],
        "peak_rss_mb": _peak_rss_mb(),
        "cpu_seconds": _cpu_seconds(),
    }


def phase_writer(args) -> dict:
    """Encode + write shards from in-memory arrays (no model), with each number of threads."""
    import pyarrow as pa  # noqa: F401
    import torch

    from actlightning.contracts import Prediction
    from actlightning.files.schema import build_features, build_schema
    from actlightning.files.shard_file import parquet_options
    from actlightning.files.tables import batch_to_table
    from actlightning.writer.threads import ShardWriterPool

    hidden, layers, rows, length = 768, 13 if args.layers == "all" else len(args.layers.split(",")), 16, 256
    columns = [f"layer_{i}" for i in range(layers)]
    schema = build_schema(build_features(dict.fromkeys(columns, hidden), args.output_dtype), args.output_dtype)
    torch_dtype = getattr(torch, args.output_dtype)
    prediction = Prediction(
        example_id=torch.arange(rows),
        n_tokens=torch.full((rows,), length),
        start_position=torch.zeros(rows, dtype=torch.int32),
        input_ids=torch.zeros(rows * length, dtype=torch.int32),
        vectors={c: torch.randn(rows * length, hidden).to(torch_dtype) for c in columns},
        max_abs=torch.zeros(len(columns)),
    )
    batch_bytes = sum(t.numel() * t.element_size() for t in prediction.vectors.values())
    results = {}
    for threads in [int(t) for t in str(args.writer_threads).split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            pool = ShardWriterPool(
                threads,
                folder=Path(folder),
                rank=0,
                schema=schema,
                options=parquet_options(schema, args.compression, columns, args.compression_level),
                encode=lambda item: (batch_to_table(item, schema), rows * length, rows),
                max_pending=2,
                vector_encoder=args.vector_encoder,
            )
            shards, per_shard = 4 * threads, 4
            start = time.perf_counter()
            for shard in range(shards):
                for i in range(per_shard):
                    pool.submit(shard, prediction, i == per_shard - 1)
            pool.close()
            seconds = time.perf_counter() - start
            on_disk = sum(f.stat().st_size for f in Path(folder).glob("*.parquet"))
        results[f"threads_{threads}_mb_per_s"] = shards * per_shard * batch_bytes / seconds / 1e6
        results[f"threads_{threads}_disk_over_input"] = on_disk / (shards * per_shard * batch_bytes)
    return results


def phase_reader(args) -> dict:
    """Read one layer's token vectors back from the export with the streaming reader."""
    from actlightning.read.training import iter_token_batches

    start = time.perf_counter()
    tokens = nbytes = 0
    for batch in iter_token_batches(args.out, args.reader_layer, batch_size=4096):
        tokens += batch.shape[0]
        nbytes += batch.numel() * batch.element_size()
    seconds = time.perf_counter() - start
    return {"tokens_per_second": tokens / seconds, "mb_per_s": nbytes / seconds / 1e6, "tokens": tokens}


def phase_load(args) -> dict:
    """Load the model as an export does (configure_model) and measure time and peak host memory."""
    from actlightning.model.module import ActivationModule

    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    module = ActivationModule(args.model_dir, layers=layers)
    module.check_settings()
    before = _rss_mb()
    start = time.perf_counter()
    module.configure_model()
    # Touch every weight, as the forward does: memory-mapped pages count once read.
    for parameter in module.model.parameters():
        parameter.detach().sum()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "rss_after_load_mb": _rss_mb(),
        "rss_before_load_mb": before,
        "peak_rss_mb": _peak_rss_mb(),
        **module.load_plan(),
    }


def build_data_rows(workdir: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` chess transcripts (~270 characters, i.e. tokens, each) as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = workdir / f"games-{rows}.parquet"
    if path.exists():
        return path
    import random

    from actlightning.face.demo import _random_move

    rng = random.Random(seed)
    moves = [_random_move(rng) for _ in range(4096)]
    np_rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, 100_000):
        count = min(100_000, rows - start)
        counts = np.clip(np_rng.lognormal(3.9, 0.5, size=count), 1, 200).astype(int)
        picks = np_rng.integers(0, len(moves), size=int(counts.sum()))
        ends = np.cumsum(counts)
        texts = [" ".join(moves[i] for i in picks[e - c : e])[:1023] for c, e in zip(counts, ends, strict=True)]
        table = pa.table({"Transcript": texts, "WhiteElo": np_rng.integers(800, 2800, size=count)})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()
    return path


def _predict_args(settings: dict) -> list[str]:
    """``predict --key value ...`` for the set ``settings`` (None: left at its default); CPU unless
    said otherwise, no progress bar."""
    settings = {"trainer.accelerator": "cpu", "trainer.enable_progress_bar": "false", **settings}
    return ["predict", *(x for key, value in settings.items() if value is not None for x in (f"--{key}", str(value)))]


def _parquet_data(args) -> dict:
    """The data phases' settings: the benchmark model over ``args.data`` (a Parquet file or glob)."""
    return {
        "model.checkpoint": args.model_dir,
        "data.path": "parquet",
        "data.data_files": args.data,
        "data.input_column": "Transcript",
        "writer.output_dir": args.out,
        "writer.overwrite": "true",
    }


def phase_tokenizer(args) -> dict:
    """The fast tokenizer alone, batches of 4,096 texts: the floor of the data side."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    start = time.perf_counter()
    tokens = 0
    for batch in pq.ParquetFile(args.data).iter_batches(batch_size=4096, columns=["Transcript"]):
        tokens += sum(len(ids) for ids in tokenizer(batch.column(0).to_pylist())["input_ids"])
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "peak_rss_mb": _peak_rss_mb()}


def phase_data(args) -> dict:
    """The data side of an export through the real CLI, up to the plan (``writer.dry_run``)."""
    from actlightning.face.cli import ActLightningCLI

    settings = {
        **_parquet_data(args),
        "writer.dry_run": "true",
        "writer.ignore_free_space": "true",
        "data.num_proc": args.num_proc,
    }
    kinds = RssKinds()
    start = time.perf_counter()
    ActLightningCLI(args=_predict_args(settings))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), **kinds.stop()}


def phase_stream_first_batch(args) -> dict:
    """Seconds from start to the first batch of a streaming export (the model loaded, one shard)."""
    from actlightning.data import stream
    from actlightning.face.cli import ActLightningCLI

    start = time.perf_counter()
    first = {}
    original = stream.collate

    def timed(*a, **k):
        first.setdefault("seconds", time.perf_counter() - start)
        return original(*a, **k)

    stream.collate = timed
    settings = {
        **_parquet_data(args),
        "model.layers": "[1]",
        "data.streaming": "true",
        "data.bucket_size": 256,
        "writer.max_shards": 1,
        "writer.batches_per_shard": 2,
    }
    ActLightningCLI(args=_predict_args(settings))
    return {
        "first_batch_seconds": first.get("seconds"),
        "total_seconds": time.perf_counter() - start,
        "peak_rss_mb": _peak_rss_mb(),
    }


PHASES = {
    "tokenizer": phase_tokenizer,
    "data": phase_data,
    "stream": phase_stream_first_batch,
    "load": phase_load,
    "floor": phase_floor,
    "export": phase_export,
    "writer": phase_writer,
    "reader": phase_reader,
}


def run_phase(name: str, args, **overrides) -> dict:
    """Run one phase in a fresh process and return its JSON result."""
    options = {**vars(args), **overrides}
    command = [sys.executable, __file__, "--phase", name]
    for key, value in options.items():
        if key in ("phase", "only") or value is None:
            continue
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--hidden-size", type=int, default=768, help="model width (768: GPT-2 small)")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated hidden_states indices, e.g. 6")
    parser.add_argument("--output-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bucket-size", type=int, default=256)
    parser.add_argument("--batches-per-shard", type=int, default=4)
    parser.add_argument("--writer-threads", default="1", help="threads; a comma list for the writer phase")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--compression-level", type=int, default=None, help="zstd level (unset: the codec's default)")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="fix glibc's M_MMAP_THRESHOLD at this many bytes in the floor and export (unset: glibc's default)",
    )
    parser.add_argument("--vector-encoder", default="direct", choices=["direct", "arrow"])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "actlightning-bench"))
    parser.add_argument(
        "--repeat", type=int, default=1, help="floor/export pairs to run (the median ratio is reported)"
    )
    parser.add_argument(
        "--only", default="floor,export", help="phases: floor,export,scaling,writer,reader,load,data,s3,startup"
    )
    parser.add_argument("--reader-layer", default="layer_6")
    parser.add_argument("--data-rows", type=int, default=100_000, help="rows of the data phase (and 4x that)")
    parser.add_argument("--num-proc", type=int, default=None, help="data.num_proc of the data phase")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, data = build_assets(workdir, args.examples, args.hidden_size)
    out = workdir / "export"
    common = {"model_dir": str(model_dir), "data": str(data), "out": str(out)}
    phases = args.only.split(",")
    report: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("phase", "model_dir", "data", "out")}}
    ratios = []
    for _ in range(args.repeat):
        # Floor and export back to back, repeatedly: a shared machine's speed drifts by 20-30% over
        # minutes, so only adjacent pairs compare; the median pair is reported.
        if "floor" in phases:
            report["floor"] = run_phase("floor", args, **common)
        if "export" in phases:
            report["export"] = run_phase("export", args, **common)
        if "floor" in report and "export" in report:
            ratios.append(report["export"]["seconds"] / report["floor"]["seconds"])
    if ratios:
        report["export_over_floor_each_pair"] = [round(r, 3) for r in ratios]
        report["export_over_floor"] = float(np.median(ratios))
    if "s3" in phases:
        report["s3"] = s3_against_local(args, common, workdir)
    if "scaling" in phases:
        # The same games four times over: the same lengths (so the same largest batch), 4x the rows.
        data4 = workdir / f"games-{args.examples}-x4.jsonl"
        data4.write_text(data.read_text() * 4)
        report["export_4x_data"] = run_phase(
            "export", args, **{**common, "data": str(data4), "out": str(workdir / "export4x")}
        )
        if "export" in report:
            report["peak_rss_4x_over_1x"] = report["export_4x_data"]["peak_rss_mb"] / report["export"]["peak_rss_mb"]
    if "data" in phases:
        # The data side at scale: cold (tokenizing into the cache) and warm (cache hit) dry runs,
        # against the fast tokenizer's own time; then 4x the rows; then streaming's first batch.
        import shutil

        report["data"] = {}
        for rows in (args.data_rows, 4 * args.data_rows):
            path = build_data_rows(workdir, rows)
            cache = workdir / f"hf-cache-{rows}"
            shutil.rmtree(cache, ignore_errors=True)
            os.environ["HF_DATASETS_CACHE"] = str(cache)
            data_args = {**common, "data": str(path), "out": str(workdir / "data-out")}
            entry = {"tokenizer_alone": run_phase("tokenizer", args, **data_args)}
            entry["first_run"] = run_phase("data", args, **data_args)
            entry["second_run"] = run_phase("data", args, **data_args)
            entry["first_over_tokenizer"] = entry["first_run"]["seconds"] / entry["tokenizer_alone"]["seconds"]
            entry["stream_first_batch"] = run_phase("stream", args, **data_args)
            report["data"][f"rows_{rows}"] = entry
        # Bytes of peak memory per added row, 1x -> 4x rows (dry run, cache hit): in all, anonymous
        # (what the process allocates) and file-backed (mapped Arrow files' pages it touched).
        for key, name in [("peak_rss_mb", "all"), ("peak_anon_mb", "anon"), ("peak_file_mb", "file")]:
            one, four = (report["data"][f"rows_{r}"]["second_run"][key] for r in (args.data_rows, 4 * args.data_rows))
            report["data"][f"peak_rss_growth_bytes_per_extra_row_{name}"] = (four - one) * 2**20 / (3 * args.data_rows)
    if "load" in phases:
        # Truncated loading: `layers: [1]` builds and loads 1 of 12 blocks.
        full, short = (run_phase("load", args, **common, layers=layers) for layers in ("all", "1"))
        report["load_all"], report["load_layer1"] = full, short
        saved_mb = (full["weight_bytes_loaded"] - short["weight_bytes_loaded"]) / 2**20
        report["load_layer1_parameters_fraction"] = short["parameters_loaded"] / full["parameters"]
        grown = {
            name: r["rss_after_load_mb"] - r["rss_before_load_mb"] for name, r in (("all", full), ("layer1", short))
        }
        report["load_layer1_rss_drop_over_bytes_saved"] = (grown["all"] - grown["layer1"]) / saved_mb
        report["load_layer1_time_fraction"] = short["seconds"] / full["seconds"]
    if "startup" in phases:
        report["startup"] = startup(args, common, workdir)
    if "writer" in phases:
        report["writer"] = run_phase("writer", args, **common)
    if "reader" in phases:
        report["reader"] = run_phase("reader", args, **common)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def startup(args, common: dict, workdir: Path) -> dict:
    """Seconds from process start to the first forward pass, through the real command line (``python
    -m actlightning predict``, a new process each run) on a dataset whose tokens are cached: a first run
    warms the token cache, then ``--repeat`` measured runs (the manifest's ``run.seconds_to_first_batch``,
    and the whole process's wall time). Also the command line's imports alone, in a new process."""
    settings = {
        "model.checkpoint": common["model_dir"],
        "model.layers": f"[{args.layers}]" if args.layers != "all" else None,
        "data.path": "json",
        "data.data_files": common["data"],
        "data.input_column": "Transcript",
        "data.batch_size": args.batch_size,
        "writer.output_dir": str(workdir / "startup"),
        "writer.overwrite": "true",
        "writer.max_shards": 1,
        "trainer.accelerator": "gpu" if args.device == "cuda" else "cpu",
    }
    command = [sys.executable, "-m", "actlightning", *_predict_args(settings)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for index in range(args.repeat + 1):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"startup run failed:\n{result.stderr[-4000:]}")
        manifest = json.loads((workdir / "startup" / "manifest.json").read_text())
        if index:  # the first run tokenized into the cache
            runs.append({"seconds_to_first_batch": manifest["run"]["seconds_to_first_batch"], "process_seconds": wall})
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import actlightning.face.cli"], check=True, env=env, cwd=REPO)
    imports = time.perf_counter() - start
    firsts = [r["seconds_to_first_batch"] for r in runs]
    return {"runs": runs, "seconds_to_first_batch_median": float(np.median(firsts)), "imports_seconds": imports}


def s3_against_local(args, common: dict, workdir: Path) -> dict:
    """The same export to local disk and to an S3 server on 127.0.0.1 (moto, in this process), back
    to back, ``--repeat`` pairs; the median ratio is reported."""
    from tests.s3 import Bucket, start_server

    server, endpoint = start_server()
    try:
        bucket = Bucket.create(endpoint, "bench")
        os.environ.update(bucket.env)  # the export processes find the server through AWS_ENDPOINT_URL
        pairs = []
        for _ in range(args.repeat):
            local = run_phase("export", args, **{**common, "out": str(workdir / "export-local")})
            server_cpu = _cpu_seconds()  # the S3 server runs on threads of this process
            remote = run_phase("export", args, **{**common, "out": bucket.url("export")})
            remote["server_cpu_seconds"] = _cpu_seconds() - server_cpu
            pairs.append({"local": local, "s3": remote, "ratio": remote["seconds"] / local["seconds"]})
        ratios = [p["ratio"] for p in pairs]
        return {
            "pairs": pairs,
            "s3_over_local_each_pair": [round(r, 3) for r in ratios],
            "s3_over_local": float(np.median(ratios)),
        }
    finally:
        server.stop()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
