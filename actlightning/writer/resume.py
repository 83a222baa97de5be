"""Resume: what the complete shards of an unfinished export already hold (read from the files, never
from the manifest), so that the plan redoes exactly the rest."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq

from actlightning.files.schema import EXAMPLE_ID
from actlightning.files.shard_file import ShardInfo
from actlightning.files.storage import Location

log = logging.getLogger(__name__)
# Shards read at a time: from a bucket each is a round trip, and a resume of thousands of shards
# would otherwise wait on them one by one.
READ_AHEAD = 16


def read_shard(location: Location, name: str) -> tuple[ShardInfo, np.ndarray]:
    """A complete shard's footer and its example ids (one column: a URL fetches only its chunks)."""
    with location.open(name) as handle:  # one open: the footer is read once
        parquet = pq.ParquetFile(handle)
        ids = parquet.read(columns=[EXAMPLE_ID]).column(0).to_numpy()
        size = handle.seek(0, os.SEEK_END)
    return ShardInfo.from_footer(name, parquet.metadata, size), ids


def complete_shards(location: Location, names: list[str]) -> tuple[list[ShardInfo], np.ndarray | None]:
    """The shards ``names`` of ``location`` and the example ids they hold (None when there are none)."""
    with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
        read = list(pool.map(lambda name: read_shard(location, name), names))
    if not read:
        return [], None
    done = np.concatenate([ids for _, ids in read])
    log.info("resuming: %d complete shards hold %d examples", len(read), len(done))
    return [info for info, _ in read], done
