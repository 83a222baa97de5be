"""The public reader: ``from actlightning.reader import open_export, iter_token_batches, TokenVectors``.

Importing it loads neither Lightning, transformers nor ``datasets`` (it runs in every DataLoader
worker of a training script); the code lives in ``actlightning.read``.
"""

from actlightning.read.reader import Export, column_vectors, open_export, read_shard_vectors, stored_dtype, to_torch
from actlightning.read.training import TokenVectors, iter_token_batches

__all__ = [
    "Export",
    "TokenVectors",
    "column_vectors",
    "iter_token_batches",
    "open_export",
    "read_shard_vectors",
    "stored_dtype",
    "to_torch",
]
