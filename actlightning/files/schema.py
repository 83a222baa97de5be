"""Column names, storage dtypes and the torch -> numpy -> Arrow conversion of one predicted batch.

Every exported row is one sequence. Layer columns hold ``[tokens, hidden_size]`` arrays stored as
``list<list<dtype>>`` wrapped in HF ``datasets``' ``Array2D`` extension type, so that
``load_dataset("parquet", ...)`` reports ``Array2D(shape=(None, hidden_size))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from datasets import Features

from actlightning.contracts import Layout, StorageDtype

EXAMPLE_ID = "example_id"
INPUT_IDS = "input_ids"
START_POSITION = "start_position"
POSITION = "position"
TOKEN_ID = "token_id"
LAYER_PREFIX = "layer_"
HOOK_PREFIX = "hook_"
VECTOR_PREFIXES = (LAYER_PREFIX, HOOK_PREFIX)
BASE_COLUMNS = (EXAMPLE_ID, INPUT_IDS, START_POSITION, POSITION, TOKEN_ID)

# Arrow and Parquet have no bfloat16: its raw 16-bit patterns are stored as 2-byte fixed-size
# binary values (Parquet FIXED_LEN_BYTE_ARRAY(2), 2 bytes on disk, which no reader mistakes for a
# number), and every vector field carries this metadata key so readers know how to decode them.
# (Exports before format 2 stored them as uint16, which Parquet widens to 4 bytes; still readable.)
ARROW_VALUE_TYPES: dict[str, str] = {"float32": "float32", "float16": "float16", "bfloat16": "fixed_size_binary[2]"}
DTYPE_METADATA_KEY = b"actlightning.dtype"
FLOAT16_MAX = 65504.0


def layer_column(index: int) -> str:
    """Column name of HF ``hidden_states[index]`` (``index`` already made non-negative)."""
    return f"{LAYER_PREFIX}{index}"


def is_reserved_column(name: str) -> bool:
    """Whether ``name`` collides with a column this tool writes."""
    return name in BASE_COLUMNS or name.startswith(VECTOR_PREFIXES)


def build_features(
    widths: Mapping[str, int],
    storage_dtype: StorageDtype,
    label_features: Mapping[str, object] | None = None,
    layout: Layout = "sequence",
) -> Features:
    """HF features of an export: base columns, label columns verbatim, then one vector column each.

    ``widths``: vector column -> vector length. Sequence layout: one row per sequence, vectors as
    ``Array2D(shape=(None, width))``. Token layout: one row per token, vectors as fixed-length lists.
    """
    # Imported here: the reader imports this module and must stay cheap to import.
    from datasets import Array2D, Features, List, Value

    value_type = ARROW_VALUE_TYPES[storage_dtype]
    if layout == "sequence":
        features = {EXAMPLE_ID: Value("int64"), INPUT_IDS: List(Value("int32")), START_POSITION: Value("int32")}
    else:
        features = {EXAMPLE_ID: Value("int64"), POSITION: Value("int32"), TOKEN_ID: Value("int32")}
    features.update(label_features or {})
    for name, width in widths.items():
        if layout == "sequence" and storage_dtype == "bfloat16":
            # Array2D holds numbers only; 2-byte binaries nest as plain lists.
            features[name] = List(List(Value(value_type)))
        elif layout == "sequence":
            features[name] = Array2D(shape=(None, width), dtype=value_type)
        else:
            features[name] = List(Value(value_type), length=width)
    return Features(features)


def build_schema(features: Features, storage_dtype: StorageDtype) -> pa.Schema:
    """The Arrow schema written to every shard (HF feature metadata included)."""
    schema = features.arrow_schema
    fields = []
    for field in schema:
        if field.name.startswith(VECTOR_PREFIXES):
            field = field.with_metadata({DTYPE_METADATA_KEY: storage_dtype.encode()})
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)


def storage_type(arrow_type: pa.DataType) -> pa.DataType:
    """The Arrow type under an extension type (HF's ``Array2D``), or the type itself."""
    return arrow_type.storage_type if isinstance(arrow_type, pa.ExtensionType) else arrow_type


def storage_array(array: pa.Array) -> pa.Array:
    """The array under an extension array (HF's ``Array2D``), or the array itself."""
    return array.storage if isinstance(array, pa.ExtensionArray) else array


def flat_values(values: pa.Array) -> np.ndarray:
    """A flat array of numbers (or of bfloat16 bit patterns, 2-byte binaries) as numpy, without copying
    when it has no nulls; 2-byte binaries come back as uint16."""
    if pa.types.is_fixed_size_binary(values.type):
        size = values.type.byte_width
        data = np.frombuffer(values.buffers()[1], dtype=np.uint8)[
            values.offset * size : (values.offset + len(values)) * size
        ]
        return data.view(np.uint16) if size == 2 else data.reshape(-1, size)
    return values.to_numpy(zero_copy_only=False)


def primitive_array(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(arrow_type, values.size, [None, pa.py_buffer(values)])


def offsets_array(lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return primitive_array(offsets, pa.int32())


def vector_array(vectors: np.ndarray, lengths: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """``[total_tokens, hidden]`` packed vectors -> ``list<list<value>>`` (one outer list per sequence).

    Built from buffers, so no Python object is created per value or per token.
    """
    total, hidden = vectors.shape
    values = primitive_array(vectors.reshape(-1), arrow_type.value_type.value_type)
    inner_offsets = primitive_array(np.arange(0, (total + 1) * hidden, hidden, dtype=np.int32), pa.int32())
    inner = pa.ListArray.from_arrays(inner_offsets, values)
    return pa.ListArray.from_arrays(offsets_array(lengths), inner)


def stored_dtype(field: pa.Field) -> str:
    """The storage dtype of a vector column (``float32``, ``float16`` or ``bfloat16``)."""
    metadata = field.metadata or {}
    if DTYPE_METADATA_KEY in metadata:
        return metadata[DTYPE_METADATA_KEY].decode()
    value = storage_type(field.type)
    while pa.types.is_list(value) or pa.types.is_fixed_size_list(value):
        value = value.value_type
    if pa.types.is_fixed_size_binary(value) and value.byte_width == 2:
        return "bfloat16"  # the only 2-byte binaries this tool writes
    return str(value.to_pandas_dtype().__name__)


def is_vector_column(name: str) -> bool:
    return name.startswith(VECTOR_PREFIXES)


def token_columns(table: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A sequence-layout table's ``example_id``, ``position`` and ``token_id`` per exported token (in row
    order), and the tokens of each row."""
    lengths = pc.list_value_length(table.column(INPUT_IDS)).to_numpy()
    starts = np.repeat(table.column(START_POSITION).to_numpy(), lengths)
    within = np.arange(len(starts)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    columns = {
        EXAMPLE_ID: np.repeat(table.column(EXAMPLE_ID).to_numpy(), lengths),
        POSITION: (starts + within).astype(np.int32),
        TOKEN_ID: pc.list_flatten(table.column(INPUT_IDS)).to_numpy(),
    }
    return columns, lengths
