"""Where an export lives: a local folder, or a URL of any ``fsspec`` filesystem (``s3://``, ``gs://``, ...).

Both kinds give the writer, the output-folder policy and the reader the same few operations: list
the file names, read and write small files whole, open a file for ranged reads (Parquet footers and
column chunks), delete, and *publish* a finished shard. A shard is always written to a local file
first; publishing renames it into a local folder (after ``fsync``), or uploads it whole (an object
store has no rename, so an object appears complete or not at all) and deletes the local file.

Remote filesystems come from ``fsspec`` (what ``datasets`` uses for its ``storage_options``): the same
options and environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, ...) work for both.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from actlightning.errors import ConfigError, ExportError

TMP_SUFFIX = ".tmp"
# A tiny object written and deleted to learn, before any weights load, that the location takes writes.
WRITE_CHECK_PREFIX = ".actlightning-write-check"
REDACTED = "<redacted>"


class StorageError(ExportError):
    """Reading or writing the export's location failed (server gone, access denied, bucket missing)."""


def is_url(output_dir: str | Path) -> bool:
    """``True`` for ``scheme://...`` other than ``file://``; a plain path is a local folder."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", str(output_dir))
    return match is not None and match.group(1).lower() not in ("file", "local")


def display_url(url: str) -> str:
    """``url`` without a password (``scheme://user:secret@host`` -> ``scheme://user@host``)."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://[^/@:]*):[^/@]*@", r"\1@", url)


def redact(options: Any) -> Any:
    """``storage_options`` with every value replaced by ``<redacted>`` (keys kept): what is saved."""
    if isinstance(options, Mapping):
        return {key: redact(value) for key, value in options.items()}
    return None if options is None else REDACTED


class Location:
    """The folder of an export (see the module docstring); ``url`` is safe to print."""

    url: str
    remote: bool = False

    def names(self) -> list[str]:
        """Names of the files directly in the folder, sorted; ``[]`` when it does not exist."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole file; readers see the old file or the new one, never half of one."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        """A seekable binary file for ranged reads (only the bytes read are fetched)."""
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def path(self, name: str) -> str:
        """The file's full path or URL (for ``datasets``' ``data_files`` and the dataset card)."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Raise ``ConfigError`` naming ``writer.output_dir`` if this location cannot take an export."""
        raise NotImplementedError

    def make(self) -> None:
        """Create the folder (object stores have no folders: nothing to do)."""

    def staging_dir(self, rank: int) -> Path:
        """The local folder where this rank writes shards before publishing them."""
        raise NotImplementedError

    def publish(self, tmp: Path, name: str) -> None:
        """Make the finished local file ``tmp`` this location's file ``name``."""
        raise NotImplementedError

    def free_space(self) -> tuple[int, str] | None:
        """Free bytes where the export's bytes land, and where that was measured; ``None``: unknown."""
        return None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent (where it would be created)."""
    return next(p for p in [path, *path.absolute().parents] if p.exists())


class LocalLocation(Location):
    """A folder on a local (or shared, mounted) filesystem; shards are renamed into it after ``fsync``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.url = str(self.folder)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []

    def read_bytes(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.folder / name
        tmp = target.with_name(f".{name}.{os.getpid()}{TMP_SUFFIX}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def open(self, name: str) -> IO[bytes]:
        return open(self.folder / name, "rb")

    def size(self, name: str) -> int:
        return (self.folder / name).stat().st_size

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def check_writable(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"writer.output_dir {self.folder} exists and is not a directory; choose a folder")
        existing_parent = nearest_existing(self.folder)
        if not os.access(existing_parent, os.W_OK | os.X_OK):
            raise ConfigError(f"writer.output_dir {self.folder} is not writable ({existing_parent} denies writing)")

    def make(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def staging_dir(self, rank: int) -> Path:
        return self.folder

    def publish(self, tmp: Path, name: str) -> None:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.folder / name)
        _fsync_dir(self.folder)

    def free_space(self) -> tuple[int, str] | None:
        probe = nearest_existing(self.folder)
        return shutil.disk_usage(probe).free, str(probe)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_location(
    output_dir: str | Path, storage_options: Mapping[str, Any] | None = None, staging_root: str | Path | None = None
) -> Location:
    """A ``RemoteLocation`` for a URL, a ``LocalLocation`` for a path (``file://`` included)."""
    if is_url(output_dir):
        from actlightning.files.remote import RemoteLocation

        return RemoteLocation(str(output_dir), storage_options, staging_root)
    if storage_options:
        raise ConfigError("writer.storage_options is set but writer.output_dir is a local path; it applies to URLs")
    text = str(output_dir)
    return LocalLocation(re.sub(r"^(file|local)://", "", text))


def as_location(where: Location | str | Path) -> Location:
    return where if isinstance(where, Location) else open_location(where)
