"""The writer's settings: which of them define an export, and the checks made before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actlightning.errors import ConfigError, require_positive

# The writer's settings that define what an export holds (the rest change how it is written).
DEFINING = ("max_shards", "layout", "shuffle_buffer", "shuffle_seed")


def check_writer_settings(h: Mapping[str, Any]) -> None:
    """Refuse settings that cannot work, naming each (``h``: the writer's hparams)."""
    require_positive("writer.batches_per_shard", h["batches_per_shard"])
    require_positive("writer.max_shards", h["max_shards"], allow_unset=True)
    level, compression = h["compression_level"], h["compression"]
    if level is not None and compression != "zstd":
        raise ConfigError(
            f"writer.compression_level is set ({level}) but writer.compression is {compression!r}; "
            "a level applies to zstd only"
        )
    if level is not None and not 1 <= level <= 22:
        raise ConfigError(f"writer.compression_level must be 1..22 for zstd, got {level}")
    require_positive("writer.max_pending_batches", h["max_pending_batches"])
    require_positive("writer.writer_threads", h["writer_threads"])
    require_positive("writer.shuffle_buffer", h["shuffle_buffer"], allow_unset=True)
    if h["shuffle_buffer"] is not None and h["layout"] != "token":
        raise ConfigError("writer.shuffle_buffer shuffles token rows: it needs writer.layout: token")
