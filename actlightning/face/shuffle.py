"""``actlightning shuffle SRC DST --seed S``: a global, seeded shuffle of an export's token rows, in two
passes over the disk (see ``scatter``), in bounded memory, resumable, the same with any ``--workers``.

DST is an export in the token layout: every source row once (a sequence-layout source is exploded into
token rows), every value bit-equal to its source, each shard a uniform random sample of all rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actlightning.contracts import StorageDtype
from actlightning.errors import ConfigError
from actlightning.face.scatter import (
    SCRATCH,
    ShuffleJob,
    bucket_name,
    done_name,
    gather,
    job_state,
    output_name,
    read_state,
    scatter,
)
from actlightning.files.manifest import (
    CARD,
    MANIFEST,
    STATS,
    build_manifest,
    manifest_bytes,
    read_manifest,
    shard_names,
)
from actlightning.files.schema import build_features, build_schema, is_vector_column, storage_array, stored_dtype
from actlightning.files.shard_file import ShardInfo
from actlightning.files.storage import Location
from actlightning.humanize import human_bytes, plural
from actlightning.writer.card import card_of
from actlightning.writer.resume import READ_AHEAD

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# Bytes held per byte of a bucket or a task at its peak (the rows, their taken copy, Arrow's buffers).
MEMORY_FACTOR = 4


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def token_schema(source: Location, name: str) -> tuple[pa.Schema, tuple[str, ...]]:
    """The output schema (token layout, the source's labels and vectors, stored dtypes kept)."""
    with source.open(name) as handle:
        first = pq.ParquetFile(handle).read_row_group(0)
    schema = first.schema
    if "position" in schema.names:
        return schema, tuple(n for n in schema.names if is_vector_column(n))
    from datasets import Features  # the sequence layout's label features, to rebuild the schema

    features = Features.from_arrow_schema(schema)
    vectors = [f.name for f in schema if is_vector_column(f.name)]
    dtype = cast(StorageDtype, stored_dtype(schema.field(vectors[0])))
    labels = {
        n: features[n]
        for n in schema.names
        if n not in vectors and n not in ("example_id", "input_ids", "start_position")
    }
    # A vector's width: a row's first token's (bfloat16's nested lists do not say it in the schema).
    widths = {
        n: pc.list_value_length(storage_array(first.column(n).combine_chunks()).flatten())[0].as_py() for n in vectors
    }
    return build_schema(build_features(widths, dtype, labels, "token"), dtype), tuple(vectors)


def plan_tasks(manifest: dict, names: list[str], budget: int) -> list[list[str]]:
    """Source shards grouped in order into scatter tasks of at most ``budget`` bytes each."""
    sizes = {s["file"]: s["bytes"] for s in manifest.get("shards", [])}
    tasks: list[list[str]] = [[]]
    held = 0
    for name in names:
        size = sizes.get(name, 0)
        if size > budget:
            raise ConfigError(
                f"source shard {name} holds {human_bytes(size)}, more than --max_memory allows a task "
                f"({human_bytes(budget)}, a {MEMORY_FACTOR}th of it); raise --max_memory"
            )
        if tasks[-1] and held + size > budget:
            tasks.append([])
            held = 0
        tasks[-1].append(name)
        held += size
    return tasks


def prepare(args: argparse.Namespace) -> tuple[ShuffleJob, list[list[str]], dict]:
    """The job, its scatter tasks and the source's manifest; refuses what cannot work."""
    probe = ShuffleJob(args.src, args.dst, args.storage_options, args.seed, 1, b"", ())
    source, destination, scratch = probe.locations()
    manifest = read_manifest(source)
    names = shard_names(source)
    if manifest is None or not manifest.get("complete") or not names:
        raise ConfigError(f"{source.url} is not a complete export of this tool: finish it first (rerun its command)")
    budget = max(args.max_memory // MEMORY_FACTOR, 1)
    tokens = manifest["totals"]["tokens"]
    buckets = max(math.ceil(manifest["totals"]["bytes"] / budget), math.ceil(tokens / args.rows_per_shard), 1)
    schema, vectors = token_schema(source, names[0])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema):
        pass
    job = ShuffleJob(
        args.src, args.dst, args.storage_options, args.seed, buckets, sink.getvalue().to_pybytes(), vectors
    )
    return job, plan_tasks(manifest, names, budget), manifest


def check_destination(job: ShuffleJob, manifest: dict, overwrite: bool) -> str:
    """``done`` (nothing to do), ``resume`` or ``new``; clears DST with ``overwrite``; refuses a
    different shuffle (seed or source) or any other content in DST."""
    _, destination, scratch = job.locations()
    state, wanted = read_state(scratch), job_state(job, manifest)
    existing = read_manifest(destination)
    if not overwrite:
        if existing is not None and existing.get("settings", {}).get("shuffle") == wanted and existing.get("complete"):
            return "done"
        if state is not None and state != wanted:
            raise ConfigError(
                f"{destination.url} holds part of another shuffle (other seed or source); pass --overwrite"
            )
        others = [n for n in destination.names() if not n.startswith(".")]
        if state is None and others:
            raise ConfigError(f"{destination.url} is not empty ({others[:3]}); choose another DST or pass --overwrite")
        if state is not None:
            return "resume"
    for location in (scratch, destination):
        for name in location.names():
            if name != SCRATCH:  # the scratch folder itself (a local one lists as an entry)
                location.delete(name)
    destination.make()
    scratch.make()
    scratch.write_bytes("shuffle.json", json.dumps(wanted).encode())
    return "new"


def _scatter_task(arguments: tuple) -> None:
    job, task, shards = arguments
    scatter(job, task, shards, _staging(job.locations()[2], task))


def _gather_task(arguments: tuple) -> None:
    job, bucket, tasks = arguments
    gather(job, bucket, tasks, _staging(job.locations()[1], bucket))


def _staging(location: Location, index: int) -> Path:
    folder = location.staging_dir(index % 100)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run(job: ShuffleJob, tasks: list[list[str]], workers: int) -> None:
    """Both passes, skipping the tasks and buckets a previous run finished."""
    _, destination, scratch = job.locations()
    done = set(scratch.names())
    pending = [(job, t, shards) for t, shards in enumerate(tasks) if done_name(t) not in done]
    _map(_scatter_task, pending, workers)
    written = set(destination.names())
    buckets = [(job, b, len(tasks)) for b in range(job.buckets) if output_name(b) not in written]
    _map(_gather_task, buckets, workers)


def _map(function, items: list, workers: int) -> None:
    if workers <= 1 or len(items) <= 1:
        for item in items:
            function(item)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
        for _ in pool.imap_unordered(function, items):
            pass


def finish(job: ShuffleJob, manifest: dict, tasks: int) -> dict:
    """DST's manifest (the source's settings, the token layout and the shuffle), card, statistics;
    the temporaries removed."""
    source, destination, scratch = job.locations()
    with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:  # from a bucket, each footer is a round trip
        infos = list(pool.map(lambda name: ShardInfo.read(destination, name), shard_names(destination)))
    settings = {**manifest["settings"], "layout": "token", "shuffle": job_state(job, manifest)}
    extra = {key: manifest[key] for key in ("data", "stats") if key in manifest}
    result = build_manifest(settings, infos, True, extra)
    result["totals"]["examples"] = manifest["totals"].get("examples")  # a sequence's tokens span shards
    if STATS in source.names():
        destination.write_bytes(STATS, source.read_bytes(STATS))
    destination.write_bytes(MANIFEST, manifest_bytes(result))
    destination.write_text(CARD, card_of(result, destination, infos[0].file))
    for name in [*(bucket_name(t, b) for t in range(tasks) for b in range(job.buckets)), *map(done_name, range(tasks))]:
        scratch.delete(name)
    scratch.delete("shuffle.json")
    if not scratch.remote:
        with contextlib.suppress(OSError):
            Path(scratch.url).rmdir()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="actlightning shuffle", description=__doc__)
    parser.add_argument("src", help="a complete export: a folder or a URL (s3://...)")
    parser.add_argument("dst", help="where the shuffled export goes: a folder or a URL")
    parser.add_argument("--seed", type=int, required=True, help="the shuffle's seed (0 is a seed)")
    parser.add_argument("--max_memory", type=parse_size, default=parse_size("4GB"), help="memory budget, e.g. 4GB")
    parser.add_argument("--workers", type=int, default=1, help="processes for both passes")
    parser.add_argument("--rows_per_shard", type=int, default=1 << 20, help="token rows per output shard, about")
    parser.add_argument("--overwrite", action="store_true", help="start afresh over another shuffle in DST")
    parser.add_argument("--storage_options", type=json.loads, default=None, help="fsspec options for URLs, as JSON")
    args = parser.parse_args(argv)
    try:
        if args.workers < 1 or args.rows_per_shard < 1:
            raise ConfigError("--workers and --rows_per_shard must be positive")
        job, tasks, manifest = prepare(args)
        state = check_destination(job, manifest, args.overwrite)
        if state == "done":
            print(f"{args.dst} already holds this shuffle; nothing to do")
            return
        run(job, tasks, args.workers)
        result = finish(job, manifest, len(tasks))
    except ConfigError as error:
        print(f"actlightning: error: {error}", file=sys.stderr)
        sys.exit(2)
    totals = result["totals"]
    print(
        f"shuffled {plural(totals['rows'], 'token row')} into {plural(totals['shards'], 'shard')} "
        f"({human_bytes(totals['bytes'])}) in {args.dst}, seed {args.seed}"
    )
