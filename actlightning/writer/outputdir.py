"""The output-folder policy: what a folder holds, and whether (and how) an export may go there.

``new``: empty or absent. ``resume``: an unfinished export of the same settings. ``complete``: a
finished one (nothing to do). ``overwrite``: another export of this tool, to be replaced
(``writer.overwrite``). Anything else is refused with a ``ConfigError`` naming the setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from actlightning.errors import ConfigError
from actlightning.files.manifest import (
    CARD,
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    REPORT,
    STATS,
    read_manifest,
    settings_differences,
)
from actlightning.files.shard_file import SHARD_PATTERN, is_tmp_file
from actlightning.files.storage import Location, as_location

ExportState = Literal["new", "resume", "complete", "overwrite"]


def _own(entries: list[str]) -> list[str]:
    """Which of ``entries`` this tool writes (shards, temporary files, manifest, ...)."""
    return [
        n for n in entries if n in (MANIFEST, CONFIG, CARD, REPORT, STATS) or is_tmp_file(n) or SHARD_PATTERN.match(n)
    ]


def own_files(location: Location | Path) -> list[str]:
    """Names of the files at ``location`` that this tool wrote."""
    return _own(as_location(location).names())


def inspect_output_dir(location: Location | Path, settings: dict, overwrite: bool) -> ExportState:
    """What ``location`` holds, read-only (a URL gets one tiny write check);
    raises ``ConfigError`` when it cannot take this export."""
    location = as_location(location)
    folder = location.url
    location.check_writable()
    entries = [name for name in location.names() if not is_tmp_file(name)]
    if not entries:
        return "new"
    if overwrite:
        foreign = sorted(set(entries) - set(_own(entries)))
        if foreign:
            raise ConfigError(
                f"writer.overwrite would clear {folder}, but it holds files this tool did not write: "
                f"{foreign[:5]}; choose another writer.output_dir"
            )
        return "overwrite"
    manifest = read_manifest(location) if MANIFEST in entries else None
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


def clean_output_dir(location: Location | Path, state: ExportState) -> None:
    """Delete this tool's files (``overwrite``) or leftover temporary files (``resume``); make the folder."""
    location = as_location(location)
    # Temporary files are shards a killed run never finished: the plan redoes their examples.
    entries = location.names()
    for name in _own(entries) if state == "overwrite" else [n for n in entries if is_tmp_file(n)]:
        location.delete(name)
    location.make()
