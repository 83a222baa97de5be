"""The cost of an export before any forward pass: bytes per token, the estimated size and shards,
and whether the output's disk (or, for a URL, the staging disk) has room."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from actlightning.contracts import ExportPlan, Layout
from actlightning.errors import ConfigError
from actlightning.files.manifest import read_manifest
from actlightning.files.storage import Location, nearest_existing
from actlightning.humanize import human_bytes, plural
from actlightning.writer.cost import bytes_per_token, exported_tokens
from actlightning.writer.summary import loading_text

log = logging.getLogger(__name__)


def free_space(location: Location) -> tuple[int, str, bool]:
    """(free bytes, where they were measured, whether that is the output itself): for a URL, the
    local staging folder, since what lands locally is the staged shards."""
    measured = location.free_space()
    if measured is not None:
        return measured[0], measured[1], True
    staging = location.staging_dir(0)
    return shutil.disk_usage(nearest_existing(staging)).free, f"{staging} (staging for {location.url})", False


def estimate(plan: ExportPlan, location: Location, layout: Layout, overwrite: bool) -> dict[str, Any]:
    """What the export will write (the manifest's ``plan``); a streaming export knows only its cost
    per token. Logged as the plan's lines."""
    per_token = bytes_per_token(plan.widths, plan.storage_dtype, layout)
    free, probe, _ = free_space(location)
    cost: dict[str, Any] = {
        "examples": None,
        "tokens": None,
        "columns": plan.widths,
        "bytes_per_token": per_token,
        "estimated_bytes": None,
        "estimated_shards": None,
        "already_written_bytes": 0,
        "free_bytes": free,
        "model": plan.model_loading,
    }
    columns = f"{plural(len(plan.widths), 'vector column')} ({', '.join(plan.widths)})"
    if plan.shards is None or plan.lengths is None:
        log.info(
            "plan: streaming, so examples, tokens and size are counted as they come; %s, %s per token as %s "
            "(%s per million tokens); %s free at %s",
            columns, plural(per_token, "byte"), plan.storage_dtype, human_bytes(per_token * 1_000_000),
            human_bytes(free), probe,
        )  # fmt: skip
        log.info(loading_text(plan.model_loading))
        return cost
    # Batch by batch: a list of every batch's positions would cost ~15 bytes a row more at the peak.
    examples = tokens = 0
    for shard in plan.shards:
        for batch in shard:
            examples += len(batch)
            tokens += int(exported_tokens(plan.lengths[batch], plan.n_pos).sum())
    existing = read_manifest(location)
    cost.update(
        examples=examples,
        tokens=tokens,
        estimated_bytes=tokens * per_token,
        estimated_shards=len(plan.shards),
        already_written_bytes=existing["totals"]["bytes"] if existing and not overwrite else 0,
    )
    log.info(
        "plan: %s, %s to export, %s, %s per token as %s -> about %s in %s; %s already written; %s free at %s",
        plural(examples, "example"), plural(tokens, "token"), columns, plural(per_token, "byte"),
        plan.storage_dtype, human_bytes(cost["estimated_bytes"]), plural(len(plan.shards), "shard"),
        human_bytes(cost["already_written_bytes"]), human_bytes(free), probe,
    )  # fmt: skip
    log.info(loading_text(plan.model_loading))
    return cost


def check_room(cost: dict[str, Any], location: Location, writer_threads: int) -> None:
    """Refuse an export the disk cannot hold (``writer.ignore_free_space`` skips this check)."""
    estimate, already = cost["estimated_bytes"], cost["already_written_bytes"]
    if estimate is None:
        return
    free, probe, is_output = free_space(location)
    if is_output and estimate - already > free:
        raise ConfigError(
            f"the export needs about {human_bytes(estimate - already)} but {probe} has {human_bytes(free)} free; "
            "free space, export less (model.layers, model.n_pos, data.limit, writer.max_shards), "
            "or set writer.ignore_free_space: true"
        )
    # A URL: the bucket's space is not known; the staging folder holds one shard per writer thread.
    shards = cost["estimated_shards"]
    staged = writer_threads * max(estimate // max(shards, 1), cost["bytes_per_token"]) if shards else 0
    if not is_output and staged > free:
        raise ConfigError(
            f"writer.staging_dir: {plural(writer_threads, 'shard')} of about "
            f"{human_bytes(staged // writer_threads)} are staged at once before upload, but {probe} has "
            f"{human_bytes(free)} free; set writer.staging_dir to a larger local disk, lower "
            "writer.batches_per_shard or writer.writer_threads, or set writer.ignore_free_space: true"
        )
