"""A ``datasets`` format that decodes vector columns to torch tensors in their stored dtype."""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa

from actlightning.files.schema import storage_type
from actlightning.read.reader import column_vectors, is_vector_column, stored_dtype, to_torch


@functools.cache
def register_formatter() -> None:
    """A ``datasets`` format that decodes vector columns to torch in their stored dtype.

    Registered on first use, not at import: ``import actlightning.reader`` stays free of ``datasets``
    (it runs in every DataLoader worker of a training script that only streams token batches).
    """
    from datasets import formatting
    from datasets.formatting import Formatter

    # upstream: datasets registers its own formats through datasets.formatting._register_formatter and
    # offers no public function to register another (Dataset.with_format only takes registered names).
    register = getattr(formatting, "_register_formatter")  # noqa: B009

    class ActivationFormatter(Formatter):
        def __init__(self, dtypes: dict[str, str] | None = None, **kwargs) -> None:
            super().__init__(**kwargs)
            self.dtypes = dtypes or {}

        def _decode(self, table: pa.Table, row: bool) -> dict:
            out: dict[str, Any] = {}
            for name in table.column_names:
                column = table.column(name)
                if is_vector_column(name):
                    vectors, offsets = column_vectors(column)
                    tensor = to_torch(vectors, self.dtypes.get(name, stored_dtype(table.schema.field(name))))
                    if pa.types.is_fixed_size_list(storage_type(column.type)):
                        out[name] = tensor[0] if row else tensor
                    else:
                        per_row = [tensor[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
                        out[name] = per_row[0] if row else per_row
                else:
                    values = column.to_pylist()
                    out[name] = values[0] if row else values
            return out

        def format_row(self, pa_table: pa.Table) -> dict:
            return self._decode(pa_table, row=True)

        def format_column(self, pa_table: pa.Table):
            return self._decode(pa_table, row=False)[pa_table.column_names[0]]

        def format_batch(self, pa_table: pa.Table) -> dict:
            return self._decode(pa_table, row=False)

    register(ActivationFormatter, "actlightning")
