"""actlightning: export hidden states of HuggingFace causal LMs to sharded Parquet with PyTorch Lightning."""

__version__ = "0.1.0"

from actlightning.data import ActivationDataModule  # noqa: E402
from actlightning.module import ActivationModule  # noqa: E402
from actlightning.writer import ParquetShardWriter  # noqa: E402

__all__ = ["ActivationDataModule", "ActivationModule", "ParquetShardWriter", "__version__"]
