"""What an export tells its user: the plan line, the end-of-run summary, what Ctrl-C left, and the
manifest's ``data`` numbers."""

from __future__ import annotations

from typing import Any

from actlightning.contracts import DataCounts
from actlightning.files.manifest import shard_names
from actlightning.files.storage import Location
from actlightning.humanize import human_bytes, plural


def data_summary(counts: DataCounts) -> dict[str, Any]:
    """The manifest's ``data``: rows removed by each step, and the selection and plan numbers."""
    summary: dict[str, Any] = {
        "removed": dict(counts.removed),
        "loaded": counts.loaded,
        "selected": counts.selected,
        "tokens": counts.tokens,
        "truncated": counts.truncated,
    }
    if counts.padded_tokens:
        summary["padding_efficiency"] = round(counts.real_tokens / counts.padded_tokens, 4)
    if counts.planned_shards is not None:
        summary["planned_shards"] = counts.planned_shards
        summary["planned_tokens_this_rank"] = counts.planned_tokens_this_rank
    return {**summary, **counts.found}


def run_numbers(seconds: float, forward: int, exported: int, shards: int) -> dict[str, Any]:
    """The manifest's ``run``: this run's time, tokens through the forward and exported, and shards."""
    elapsed = max(seconds, 1e-9)
    return {
        "seconds": round(seconds, 3),
        "forward_tokens": forward,
        "forward_tokens_per_second": round(forward / elapsed, 1),
        "exported_tokens": exported,
        "exported_tokens_per_second": round(exported / elapsed, 1),
        "shards": shards,
    }


def summary_text(manifest: dict, shards_this_run: int) -> str:
    """The end-of-run summary: the same numbers as ``manifest.json``.

    Examples are sequences; rows are examples in the sequence layout and tokens in the token layout.
    The forward pass runs every token of a sequence, the export keeps ``n_pos`` of them: both rates
    are given, each named.
    """
    totals, run, data = manifest["totals"], manifest.get("run", {}), manifest.get("data", {})
    layout = manifest.get("settings", {}).get("layout", "sequence")
    efficiency = data.get("padding_efficiency")
    return (
        f"export complete: {plural(totals.get('examples', totals['rows']), 'example')}, "
        f"{plural(totals['tokens'], 'token')} exported in {plural(totals['rows'], 'row')} ({layout} layout), "
        f"{plural(totals['shards'], 'shard')}, {human_bytes(totals['bytes'])}. "
        f"This run: {plural(shards_this_run, 'shard')} in {run.get('seconds', 0):.1f} s"
        f"{_first_batch(run)}; "
        f"forward pass {run.get('forward_tokens', 0):,} tokens at "
        f"{run.get('forward_tokens_per_second', 0):,.0f} tokens/s, "
        f"exported {run.get('exported_tokens', 0):,} tokens at "
        f"{run.get('exported_tokens_per_second', 0):,.0f} tokens/s; "
        f"padding efficiency {'n/a' if efficiency is None else f'{efficiency:.3f}'}; "
        f"rows removed by each step: {data.get('removed', {})}"
    )


def _first_batch(run: dict) -> str:
    seconds = run.get("seconds_to_first_batch")
    return "" if seconds is None else f" (first batch {seconds:.1f} s after the process started)"


def loading_text(loading: dict) -> str:
    """The plan's line on loading the model: blocks, parameters and bytes loaded of the full model."""
    return "plan: loading {} of {} ({:,} of {:,} parameters, {} of {} as {}){}".format(
        loading["blocks_loaded"],
        plural(loading["blocks"], "block"),
        loading["parameters_loaded"],
        loading["parameters"],
        human_bytes(loading["weight_bytes_loaded"]),
        human_bytes(loading["weight_bytes"]),
        loading["dtype"],
        "" if loading["blocks_loaded"] < loading["blocks"] else ": the export needs the full forward",
    )


def interrupted_text(location: Location, shards_this_run: int) -> str:
    """What Ctrl-C leaves behind, and how to go on."""
    complete = len(shard_names(location))
    return (
        f"interrupted: {plural(complete, 'complete shard')} in {location.url} ({shards_this_run} from this run); "
        "the shard being written was discarded. Rerun the same command to resume where it stopped."
    )
