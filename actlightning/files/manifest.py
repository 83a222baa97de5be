"""``manifest.json``: what an export is (its settings) and what it holds (its complete shards).

The shard files are the truth: the manifest is rebuilt from their footers whenever a shard completes,
so a partial export is always self-describing, and resume never trusts anything but complete files.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from actlightning.files.shard_file import SHARD_PATTERN, ShardInfo
from actlightning.files.storage import Location, as_location

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
CARD = "README.md"
REPORT = "report.png"
# Each vector column's statistics with their vectors (the manifest keeps the scalars).
STATS = "stats.json"
# 2: bfloat16 vectors as 2-byte binaries (1: as uint16, 4 bytes on disk).
FORMAT_VERSION = 2


def library_versions() -> dict[str, str]:
    """Versions of the libraries that made an export, from their installed metadata (importing them
    would cost the light verbs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    from actlightning import __version__

    versions = {"actlightning": __version__, "python": platform.python_version()}
    for name in ("torch", "lightning", "transformers", "datasets", "pyarrow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def shard_names(location: Location | Path) -> list[str]:
    """Names of the complete shards of an export, in name order."""
    return [name for name in as_location(location).names() if SHARD_PATTERN.match(name)]


def read_manifest(location: Location | Path) -> dict | None:
    """The manifest at ``location``, or ``None`` (one read: no listing of a folder of many shards)."""
    try:
        return json.loads(as_location(location).read_text(MANIFEST))
    except FileNotFoundError:
        return None


def manifest_bytes(payload: Mapping) -> bytes:
    """``manifest.json``'s contents; ``Location.write_bytes`` writes them whole (temporary file + rename locally)."""
    return (json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n").encode()


def build_manifest(
    settings: Mapping,
    shards: Iterable[ShardInfo],
    complete: bool,
    extra: Mapping | None = None,
) -> dict:
    """The manifest of an export holding ``shards``."""
    shards = sorted(shards, key=lambda s: (s.shard_index, s.file))
    return {
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": dict(settings),
        "totals": {
            "shards": len(shards),
            "rows": sum(s.rows for s in shards),
            "examples": sum(s.examples for s in shards),
            "tokens": sum(s.tokens for s in shards),
            "bytes": sum(s.bytes for s in shards),
        },
        "shards": [s.summary() for s in shards],
        **(dict(extra) if extra else {}),
        "versions": library_versions(),
    }


def settings_differences(old: Mapping, new: Mapping) -> list[str]:
    """Names of settings whose values differ between two exports (``a.b`` for nested keys)."""
    differences = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            differences += [f"{key}.{sub}" for sub in settings_differences(before, after)]
        elif before != after:
            differences.append(key)
    return differences
