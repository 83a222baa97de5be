"""The model: loading only the blocks needed, capturing hidden states, the LightningModule."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actlightning.model.module import ActivationModule


def __getattr__(name: str) -> object:
    # Loaded on first use: the stage's small modules import without Lightning.
    if name == "ActivationModule":
        from actlightning.model.module import ActivationModule

        return ActivationModule
    raise AttributeError(f"module 'actlightning.model' has no attribute {name!r}")


__all__ = ["ActivationModule"]
