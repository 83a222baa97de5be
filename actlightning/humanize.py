"""Numbers for people: sizes in kB/MB/GB and counted nouns in the plan, the summary and the bar."""

from __future__ import annotations


def human_bytes(count: float) -> str:
    """``1536`` -> ``1.5 kB``: decimal units (as disks and buckets count), three significant digits."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            break
        value /= 1000
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 shard``, ``2 shards``, ``1,000 vector columns``."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"
