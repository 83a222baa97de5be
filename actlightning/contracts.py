"""The typed objects passed between the stages: a batch (data -> model), a prediction (model -> writer)
and the export plan (data and model -> face -> writer). Data only: the stages own the logic.

Everything here is importable without Lightning, transformers or datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # the contracts name torch's types; importing them must not import torch
    import torch

PaddingSide = Literal["right", "left"]
Layout = Literal["sequence", "token"]
StorageDtype = Literal["float32", "float16", "bfloat16"]


@dataclass
class PlannedBatch:
    """One batch of the plan: positions into the token store, and where it sits in its shard."""

    positions: np.ndarray
    shard_index: int
    last_in_shard: bool


@dataclass
class Batch:
    """One padded batch, as collation makes it: the model's inputs and what the writer needs.

    Tensors move to the device with the batch; numpy arrays, numbers and the label table stay on the
    host (Lightning moves tensors only), so the writer reads them without waiting for the device.
    """

    input_ids: torch.Tensor  # [B, S] int64, padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # [B, S] 1 on real tokens
    position_ids: torch.Tensor  # [B, S] real tokens counted from 0 (0 on padding)
    lengths: torch.Tensor  # [B] real tokens per row
    first_token: torch.Tensor  # [B] column of each row's first real token (0 with right padding)
    example_id: torch.Tensor  # [B] row index in the loaded split
    host_example_id: np.ndarray  # the same, on the host
    host_tokens: int  # real tokens in the batch
    shard_index: int  # the shard this batch belongs to
    last_in_shard: bool  # the shard is complete after this batch
    # The label columns of the batch's rows, in row order (None when the export carries no labels).
    labels: pa.Table | None = None


@dataclass
class Prediction:
    """One batch's exported activations, on the host (or on their way there: see ``ready``).

    Tokens are packed: the ``n_tokens[i]`` exported tokens of row ``i`` follow those of row ``i - 1``.
    """

    example_id: torch.Tensor  # [B] row index in the loaded split
    n_tokens: torch.Tensor  # [B] exported tokens per row (all, or the last n_pos)
    start_position: torch.Tensor  # [B] position of each row's first exported token in its sequence
    input_ids: torch.Tensor  # [T] int32, the exported tokens
    vectors: dict[str, torch.Tensor]  # vector column -> [T, width] in the storage dtype
    # Each vector column's largest magnitude in the model's output, checked by the writer before
    # anything of the batch is written (see ``files.schema.check_finite``).
    max_abs: torch.Tensor
    # On CUDA: recorded after the asynchronous device-to-host copies; wait on it before reading.
    ready: torch.cuda.Event | None = None
    shard_index: int = -1
    last_in_shard: bool = False
    # Each vector column's sums over its stored values, float64 [2 * width + 2]: the sum and the sum
    # of squares of each component, the sum of the tokens' norms and of their squared norms.
    moments: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DataCounts:
    """What the data side loaded, removed and planned: the log and the manifest's ``data``. A stream
    fills it as its rows arrive."""

    loaded: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # rows removed by each selection step, in order
    selected: int = 0
    tokens: int = 0  # tokens of the selected examples, after truncation
    truncated: int = 0
    real_tokens: int = 0  # over the planned batches: padding efficiency is real / padded
    padded_tokens: int = 0
    planned_shards: int | None = None
    planned_tokens_this_rank: int = 0  # unknown (0) when streaming
    found: dict[str, int] = field(default_factory=dict)  # what the batch-size search chose


@dataclass
class ExportPlan:
    """What one export will do, decided before any weights load; built once by the face from the data
    module and the model, then handed to the writer.

    The data module fills ``data`` (selection and batching counts) as it runs; the writer fills the
    resume fields (what complete shards already hold) before the data module makes its batches.
    """

    # What defines the export ({"model": ..., "data": ..., and the writer's own}): compared on resume.
    settings: dict[str, Any]
    vector_columns: list[str]
    widths: dict[str, int]  # each vector column's width before any forward (exact from the first batch)
    storage_dtype: StorageDtype
    n_pos: int | None  # exported tokens per sequence: the last n_pos, or all
    label_features: dict[str, Any]  # label column -> ``datasets`` feature
    model_loading: dict[str, Any]  # blocks and parameters loaded, next to the full model's
    # Token count of each selected example, and the whole export's batches (positions into it)
    # grouped by shard; None when streaming (the stream decides as it goes).
    lengths: np.ndarray | None = None
    shards: list[Sequence[np.ndarray]] | None = None
    data: DataCounts = field(default_factory=DataCounts)
    # Resume: example ids held by complete shards, and the shard indices those use.
    done_example_ids: np.ndarray | None = None
    taken_shard_indices: set[int] = field(default_factory=set)
    # The resolved configuration, saved as config.yaml beside the shards (credentials redacted).
    config_yaml: str | None = None
    # When the process started (epoch seconds): the summary reports the seconds to the first batch.
    process_started: float | None = None
