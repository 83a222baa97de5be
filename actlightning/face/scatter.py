"""The two passes of the global shuffle, each a pure function of its task (so any worker may run it).

Pass 1 (scatter) reads a group of source shards, explodes sequence rows into token rows, and sends
each row to one of ``buckets`` temporary files, the bucket drawn from a generator seeded by ``(seed,
shard)``. Pass 2 (gather) reads one bucket's files in task order, permutes its rows with a generator
seeded by ``(seed, bucket)``, and writes them as output shard ``bucket`` through the direct vector
writer. Every choice is seeded by what it concerns, never by who runs it: the output is the same with
any number of workers. Each file appears whole (written aside, then published), so a rerun redoes only
what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.files.schema import (
    EXAMPLE_ID,
    POSITION,
    storage_array,
    storage_type,
    token_columns,
)
from actlightning.files.shard_file import ShardFile, parquet_options, shard_name
from actlightning.files.storage import Location, open_location

SCRATCH = ".shuffle"  # temporaries, under DST
# Separates the bucket generators' seeds from the scatter generators'.
GATHER_STREAM = 1 << 40
# Token rows per row group of an output shard.
ROW_GROUP_ROWS = 1 << 16


@dataclass(frozen=True)
class ShuffleJob:
    """What every task needs: where things are, the seed, the buckets and the output schema."""

    source: str
    destination: str
    storage_options: dict | None
    seed: int
    buckets: int
    schema_bytes: bytes  # the output (token layout) schema, serialized
    vector_columns: tuple[str, ...]

    def locations(self) -> tuple[Location, Location, Location]:
        """The source, the destination and the scratch folder under it."""
        options = self.storage_options
        scratch = f"{self.destination.rstrip('/')}/{SCRATCH}"
        destination = open_location(self.destination, options)
        return open_location(self.source, options), destination, open_location(scratch, options)

    @property
    def schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(self.schema_bytes))


def bucket_name(task: int, bucket: int) -> str:
    # Arrow IPC, not Parquet: temporaries are written and read once, and IPC costs about a memcpy.
    return f"scatter-{task:05d}-bucket-{bucket:05d}.arrow"


def done_name(task: int) -> str:
    return f"scatter-{task:05d}.done"


def token_rows(table: pa.Table, schema: pa.Schema, vector_columns: tuple[str, ...]) -> pa.Table:
    """A source table as token rows in ``schema`` (a token-layout table passes through)."""
    if POSITION in table.column_names:
        return table.select(schema.names).cast(schema) if table.schema != schema else table
    tokens, lengths = token_columns(table)
    columns = {name: pa.array(values, schema.field(name).type) for name, values in tokens.items()}
    taken = pa.array(np.repeat(np.arange(table.num_rows), lengths), pa.int64())
    for field in schema:
        if field.name in columns:
            continue
        if field.name in vector_columns:  # list<list<x>> -> the rows' vectors, one per token
            vectors = storage_array(table.column(field.name).combine_chunks()).flatten()
            columns[field.name] = pa.FixedSizeListArray.from_arrays(vectors.flatten(), type=storage_type(field.type))
        else:
            columns[field.name] = table.column(field.name).take(taken)
    return pa.table([columns[f.name] for f in schema], schema=schema)


def scatter(job: ShuffleJob, task: int, shards: list[str], staging: Path) -> None:
    """Pass 1 for one task (a group of source shards): its rows sent to the buckets' files."""
    source, _, scratch = job.locations()
    parts: list[list[pa.Table]] = [[] for _ in range(job.buckets)]
    for name in shards:
        index = int(name.split("-")[1])
        if source.remote:
            with source.open(name) as handle:
                table = pq.read_table(handle)
        else:  # natively, not through a Python file object
            table = pq.read_table(source.path(name), memory_map=True)
        table = token_rows(table, job.schema, job.vector_columns)
        buckets = np.random.default_rng([job.seed, index]).integers(0, job.buckets, size=table.num_rows)
        order = np.argsort(buckets, kind="stable")  # rows of each bucket together, in source order
        bounds = np.searchsorted(buckets[order], np.arange(job.buckets + 1))
        table = table.take(pa.array(order))  # one copy; each bucket's rows are then a slice of it
        for bucket in range(job.buckets):
            if bounds[bucket + 1] > bounds[bucket]:
                parts[bucket].append(table.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket]))
    for bucket, tables in enumerate(parts):
        path = staging / f".{bucket_name(task, bucket)}.tmp"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, job.schema) as writer:
            for table in tables:
                writer.write_table(table)
        scratch.publish(path, bucket_name(task, bucket))
        parts[bucket] = []  # free each bucket's rows once written
    scratch.write_bytes(done_name(task), b"")


def gather(job: ShuffleJob, bucket: int, tasks: int, staging: Path) -> None:
    """Pass 2 for one bucket: its rows, from every task in task order, permuted and written as shard ``bucket``."""
    _, destination, scratch = job.locations()
    tables = []
    for task in range(tasks):
        with scratch.open(bucket_name(task, bucket)) as handle:
            tables.append(pa.ipc.open_file(handle).read_all())
    table = pa.concat_tables(tables).combine_chunks()
    del tables
    order = np.random.default_rng([job.seed, GATHER_STREAM + bucket]).permutation(table.num_rows)
    table = table.take(pa.array(order))
    options = parquet_options(job.schema, "none", list(job.vector_columns))
    shard = ShardFile(staging, bucket, 0, job.schema, options, location=destination)
    examples = len(np.unique(table.column(EXAMPLE_ID).to_numpy()))  # sequences with a token here
    for start in range(0, table.num_rows, ROW_GROUP_ROWS):  # readers split work by row groups
        part = table.slice(start, ROW_GROUP_ROWS)
        shard.write(part, part.num_rows, examples if start == 0 else 0)
    shard.close()


def output_name(bucket: int) -> str:
    return shard_name(bucket, 0)


def job_state(job: ShuffleJob, source_manifest: dict) -> dict:
    """What identifies a shuffle: a rerun over a partial DST must have the same (else refused)."""
    return {
        "seed": job.seed,
        "buckets": job.buckets,
        "source": job.source,
        "source_updated": source_manifest.get("updated"),
        "source_totals": source_manifest.get("totals"),
    }


def read_state(scratch: Location) -> dict | None:
    try:
        return json.loads(scratch.read_text("shuffle.json"))
    except FileNotFoundError:
        return None
