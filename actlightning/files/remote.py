"""An export on a URL of any ``fsspec`` filesystem: listed, read and written object by object.

Shards are staged in a local folder, one file per writer thread at a time, and uploaded whole (an
object store has no rename, so an object appears complete or not at all).
"""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from actlightning.errors import ConfigError, first_line
from actlightning.files.storage import TMP_SUFFIX, WRITE_CHECK_PREFIX, Location, StorageError, display_url


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
