"""actlightning: export hidden states of HuggingFace causal LMs to sharded Parquet with PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Loaded on first use: `import actlightning.reader` (in every DataLoader worker of an SAE training
# script) must not pay for Lightning and transformers.
_LAZY = {
    "ActivationDataModule": "actlightning.data.module",
    "ActivationModule": "actlightning.model.module",
    "ParquetShardWriter": "actlightning.writer.callback",
}

if TYPE_CHECKING:
    from actlightning.data.module import ActivationDataModule
    from actlightning.model.module import ActivationModule
    from actlightning.writer.callback import ParquetShardWriter


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actlightning' has no attribute {name!r}")


__all__ = ["ActivationDataModule", "ActivationModule", "ParquetShardWriter", "__version__"]
