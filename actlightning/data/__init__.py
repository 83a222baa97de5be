"""Loading, selecting, tokenizing and batching the dataset (the LightningDataModule and its steps)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actlightning.data.module import ActivationDataModule


def __getattr__(name: str) -> object:
    # Loaded on first use: the stage's small modules import without Lightning.
    if name == "ActivationDataModule":
        from actlightning.data.module import ActivationDataModule

        return ActivationDataModule
    raise AttributeError(f"module 'actlightning.data' has no attribute {name!r}")


__all__ = ["ActivationDataModule"]
