"""actlightning: export hidden states of HuggingFace causal LMs to sharded Parquet with PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Loaded on first use: `import actlightning.reader` (in every DataLoader worker of an SAE training
# script) must not pay for Lightning and transformers.
_LAZY = {
    "ActivationDataModule": "actlightning.data",
    "ActivationModule": "actlightning.module",
    "ParquetShardWriter": "actlightning.writer",
}

if TYPE_CHECKING:
    from actlightning.data import ActivationDataModule
    from actlightning.module import ActivationModule
    from actlightning.writer import ParquetShardWriter


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actlightning' has no attribute {name!r}")


__all__ = ["ActivationDataModule", "ActivationModule", "ParquetShardWriter", "__version__"]
