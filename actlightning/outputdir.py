"""The output-folder policy: what a folder holds, and whether (and how) an export may go there.

``new``: empty or absent. ``resume``: an unfinished export of the same settings. ``complete``: a
finished one (nothing to do). ``overwrite``: another export of this tool, to be replaced
(``writer.overwrite``). Anything else is refused with a ``ConfigError`` naming the setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from actlightning.errors import ConfigError
from actlightning.manifest import (
    CARD,
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    REPORT,
    read_manifest,
    settings_differences,
    shard_files,
)
from actlightning.shards import is_tmp_file

ExportState = Literal["new", "resume", "complete", "overwrite"]


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent (where it would be created)."""
    return next(p for p in [path, *path.absolute().parents] if p.exists())


def own_files(folder: Path) -> list[str]:
    """Names of the files in ``folder`` that this tool wrote (shards, temporary files, manifest, ...)."""
    entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    own = [n for n in entries if n in (MANIFEST, CONFIG, CARD, REPORT) or is_tmp_file(n)]
    return own + [p.name for p in shard_files(folder)]


def inspect_output_dir(folder: Path, settings: dict, overwrite: bool) -> ExportState:
    """What ``folder`` holds, read-only; raises ``ConfigError`` when it cannot take this export."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"writer.output_dir {folder} exists and is not a directory; choose a folder")
    existing_parent = nearest_existing(folder)
    if not os.access(existing_parent, os.W_OK | os.X_OK):
        raise ConfigError(f"writer.output_dir {folder} is not writable ({existing_parent} denies writing)")
    entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    if not entries:
        return "new"
    if overwrite:
        foreign = sorted(set(entries) - set(own_files(folder)))
        if foreign:
            raise ConfigError(
                f"writer.overwrite would clear {folder}, but it holds files this tool did not write: "
                f"{foreign[:5]}; choose another writer.output_dir"
            )
        return "overwrite"
    manifest = read_manifest(folder) if MANIFEST in entries else None
    if manifest is None:
        raise ConfigError(
            f"writer.output_dir {folder} is not empty and holds no export of this tool "
            f"(found {entries[:5]}); choose an empty or new folder"
        )
    differences = settings_differences(manifest.get("settings", {}), settings)
    if differences:
        raise ConfigError(
            f"writer.output_dir {folder} holds an export with different settings ({', '.join(differences)}); "
            "use another writer.output_dir, or writer.overwrite: true to replace it"
        )
    if manifest.get("complete"):
        return "complete"
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"writer.output_dir {folder} holds an unfinished export in file format "
            f"{manifest.get('format_version')}, this version writes format {FORMAT_VERSION}: its shards "
            "cannot be mixed; use another writer.output_dir, or writer.overwrite: true to start afresh"
        )
    return "resume"


def clean_output_dir(folder: Path, state: ExportState) -> None:
    """Delete this tool's files (``overwrite``) or leftover temporary files (``resume``); make the folder."""
    if state == "overwrite":
        for name in own_files(folder):
            (folder / name).unlink(missing_ok=True)
    elif folder.exists():
        # Temporary files are shards a killed run never finished: the plan redoes their examples.
        for path in folder.iterdir():
            if is_tmp_file(path.name):
                path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
