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

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from actlightning.errors import ConfigError, ExportError, first_line

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


class RemoteLocation(Location):
    """A prefix of an ``fsspec`` filesystem (``s3://bucket/prefix``). Shards are staged in a local
    folder, one file per writer thread at a time, and uploaded whole (s3fs uploads big files in parts)."""

    remote = True

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, staging_root: str | Path | None = None
    ) -> None:
        import fsspec

        self.url = display_url(url.rstrip("/"))
        try:
            # A new instance: the environment (AWS_*) is read now, not when some earlier one was made.
            self.fs, self.root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **dict(storage_options or {}))
        except ImportError as error:  # fsspec names the package: "Install gcsfs to access Google Storage"
            hint = " (pip install 'actlightning[s3]')" if url.startswith(("s3://", "s3a://")) else ""
            raise ConfigError(f"writer.output_dir {self.url}: {first_line(error)}{hint}") from None
        except ValueError as error:
            if "Protocol not known" in str(error):
                raise ConfigError(f"writer.output_dir {self.url}: {first_line(error)} to fsspec") from None
            raise ConfigError(f"writer.storage_options do not suit {self.url}: {first_line(error)}") from None
        except TypeError as error:  # an option the filesystem does not take
            raise ConfigError(f"writer.storage_options do not suit {self.url}: {first_line(error)}") from None
        self.root = self.root.rstrip("/")
        # Keyed by the URL: a rerun finds (and clears) what a killed run of the same export left.
        key = hashlib.sha1(self.url.encode()).hexdigest()[:12]
        self._staging_root = Path(staging_root or tempfile.gettempdir()) / f"actlightning-staging-{key}"

    def _full(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _fail(self, action: str, name: str, error: BaseException) -> StorageError:
        return StorageError(f"{action} {self.path(name)} failed: {type(error).__name__}: {first_line(error)}")

    def names(self) -> list[str]:
        # Listings are cached by fsspec: other ranks' shards appear only in a fresh one.
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        except Exception as error:
            raise self._fail("listing", "", error) from error
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory")

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self._full(name))
        except FileNotFoundError:
            raise  # an absent file is an answer (no manifest yet), not a failure
        except Exception as error:
            raise self._fail("reading", name, error) from error

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._full(name), data)  # one PUT: the object appears whole
        except Exception as error:
            raise self._fail("uploading", name, error) from error

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._full(name))
        except FileNotFoundError:
            pass
        except Exception as error:
            raise self._fail("deleting", name, error) from error

    def open(self, name: str) -> IO[bytes]:
        # No read-ahead cache: each read is one ranged request, so a column-pruned read fetches only
        # the footer and the chunks of the columns asked for.
        try:
            return self.fs.open(self._full(name), "rb", cache_type="none")
        except Exception as error:
            raise self._fail("opening", name, error) from error

    def size(self, name: str) -> int:
        try:
            return int(self.fs.size(self._full(name)))
        except Exception as error:
            raise self._fail("reading the size of", name, error) from error

    def path(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def check_writable(self) -> None:
        probe = f"{WRITE_CHECK_PREFIX}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            if self.fs.isfile(self.root):
                raise ConfigError(f"writer.output_dir {self.url} is an object, not a prefix; choose a folder URL")
            self.fs.pipe_file(self._full(probe), b"")
            self.fs.rm_file(self._full(probe))
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError(
                f"writer.output_dir {self.url} is not writable: {type(error).__name__}: {first_line(error)}"
            ) from None

    def staging_dir(self, rank: int) -> Path:
        return self._staging_root / f"rank{rank:02d}"

    def publish(self, tmp: Path, name: str) -> None:
        try:
            self.fs.put_file(str(tmp), self._full(name))
        except Exception as error:
            raise self._fail("uploading", name, error) from error
        tmp.unlink(missing_ok=True)

    def free_space(self) -> tuple[int, str] | None:
        return None


def open_location(
    output_dir: str | Path, storage_options: Mapping[str, Any] | None = None, staging_root: str | Path | None = None
) -> Location:
    """A ``RemoteLocation`` for a URL, a ``LocalLocation`` for a path (``file://`` included)."""
    if is_url(output_dir):
        return RemoteLocation(str(output_dir), storage_options, staging_root)
    if storage_options:
        raise ConfigError("writer.storage_options is set but writer.output_dir is a local path; it applies to URLs")
    text = str(output_dir)
    return LocalLocation(re.sub(r"^(file|local)://", "", text))


def as_location(where: Location | str | Path) -> Location:
    return where if isinstance(where, Location) else open_location(where)
