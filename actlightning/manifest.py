"""``manifest.json``: what an export is (its settings) and what it holds (its complete shards).

The shard files are the truth: the manifest is rebuilt from their footers whenever a shard completes,
so a partial export is always self-describing, and resume never trusts anything but complete files.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

from actlightning.shards import SHARD_PATTERN, TMP_SUFFIX, ShardInfo

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
CARD = "README.md"
REPORT = "report.png"
# 2: bfloat16 vectors as 2-byte binaries (1: as uint16, 4 bytes on disk).
FORMAT_VERSION = 2


def library_versions() -> dict[str, str]:
    import datasets
    import lightning
    import pyarrow
    import torch
    import transformers

    from actlightning import __version__

    return {
        "actlightning": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
    }


def shard_files(folder: Path) -> list[Path]:
    """Complete shards in ``folder``, in name order."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_PATTERN.match(p.name))


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_json_atomic(path: Path, payload: Mapping) -> None:
    """Write ``payload`` to a temporary file and rename it over ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


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
        "shards": [asdict(s) for s in shards],
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
