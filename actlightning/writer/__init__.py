"""Writing an export: the prediction-writer callback, its plan's cost, resume, shard threads, the output
folder policy and the card. Never imports ``data`` or ``model``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actlightning.writer.callback import ParquetShardWriter


def __getattr__(name: str) -> object:
    # Loaded on first use: the stage's small modules import without Lightning.
    if name == "ParquetShardWriter":
        from actlightning.writer.callback import ParquetShardWriter

        return ParquetShardWriter
    raise AttributeError(f"module 'actlightning.writer' has no attribute {name!r}")


__all__ = ["ParquetShardWriter"]
