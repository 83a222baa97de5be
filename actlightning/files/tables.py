"""Predicted batches as Arrow tables: torch -> numpy -> Arrow, and the check that every stored value
is finite. (The rest of the schema, which needs no torch, is in ``schema``.)"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from actlightning.contracts import Layout, Prediction
from actlightning.errors import ActivationError
from actlightning.files.schema import (
    EXAMPLE_ID,
    FLOAT16_MAX,
    INPUT_IDS,
    LAYER_PREFIX,
    POSITION,
    START_POSITION,
    TOKEN_ID,
    offsets_array,
    primitive_array,
    vector_array,
)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy view of a CPU tensor as numpy; bfloat16 becomes its raw uint16 bit patterns."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def batch_to_table(
    prediction: Prediction,
    schema: pa.Schema,
    labels: pa.Table | None = None,
    layout: Layout = "sequence",
) -> pa.Table:
    """One predicted batch -> an Arrow table with ``schema``.

    ``prediction`` holds CPU tensors: ``example_id`` [B], ``n_tokens`` [B], ``start_position`` [B],
    ``input_ids`` [T] (packed) and ``vectors``: {column: [T, width]} (packed, storage dtype).
    ``labels`` holds the label columns for the same B rows, in order (repeated per token in the
    token layout).
    """
    lengths = tensor_to_numpy(prediction.n_tokens).astype(np.int32, copy=False)
    example_ids = tensor_to_numpy(prediction.example_id).astype(np.int64, copy=False)
    starts = tensor_to_numpy(prediction.start_position).astype(np.int32, copy=False)
    token_ids = tensor_to_numpy(prediction.input_ids).astype(np.int32, copy=False)
    if layout == "sequence":
        columns: dict[str, pa.Array] = {
            EXAMPLE_ID: primitive_array(example_ids, pa.int64()),
            INPUT_IDS: pa.ListArray.from_arrays(offsets_array(lengths), primitive_array(token_ids, pa.int32())),
            START_POSITION: primitive_array(starts, pa.int32()),
        }
    else:
        rows = np.repeat(np.arange(len(lengths)), lengths)
        row_starts = np.cumsum(lengths) - lengths
        positions = (starts[rows] + np.arange(len(rows)) - row_starts[rows]).astype(np.int32)
        columns = {
            EXAMPLE_ID: primitive_array(example_ids[rows], pa.int64()),
            POSITION: primitive_array(positions, pa.int32()),
            TOKEN_ID: primitive_array(token_ids, pa.int32()),
        }
        if labels is not None and labels.num_columns:
            labels = labels.take(pa.array(rows, type=pa.int64()))
    if labels is not None:
        for name in labels.column_names:
            columns[name] = labels.column(name)
    for name, tensor in prediction.vectors.items():
        arrow_type = schema.field(name).type
        vectors = tensor_to_numpy(tensor)
        if layout == "sequence" and isinstance(arrow_type, pa.ExtensionType):
            storage = vector_array(vectors, lengths, arrow_type.storage_type)
            columns[name] = pa.ExtensionArray.from_storage(arrow_type, storage)
        elif layout == "sequence":
            columns[name] = vector_array(vectors, lengths, arrow_type)
        else:
            columns[name] = pa.FixedSizeListArray.from_arrays(
                primitive_array(vectors.reshape(-1), arrow_type.value_type), type=arrow_type
            )
    return pa.Table.from_arrays([columns[field.name] for field in schema], schema=schema)


def check_finite(prediction: Prediction, storage_dtype: str) -> None:
    """Raise ``ActivationError`` if the model's activations, or their stored form, hold NaN or inf.

    ``prediction.max_abs`` holds each column's largest magnitude in the model's output: not finite
    when the model produced NaN/inf, above float16's range when storing as float16 overflows. The
    stored values are only counted on those (rare) paths.
    """
    for column, largest in zip(prediction.vectors, prediction.max_abs.tolist(), strict=True):
        stored = prediction.vectors[column]
        if not math.isfinite(largest):
            count = int((~torch.isfinite(stored)).sum())
            where = (
                f"hidden_states[{column[len(LAYER_PREFIX) :]}] ({column})"
                if column.startswith(LAYER_PREFIX)
                else column
            )
            raise ActivationError(
                f"the model produced {count} NaN/inf values in {where}; "
                "nothing of this batch was written. Try model.dtype float32 (half-precision compute can overflow)"
            )
        if stored.dtype == torch.float16 and largest > FLOAT16_MAX:
            count = int(torch.isinf(stored).sum())
            if count:
                raise ActivationError(
                    f"model.output_dtype {storage_dtype} cannot hold {column}: {count} values "
                    "overflow to inf (beyond +-65504 for float16); use output_dtype float32 or bfloat16"
                )
