"""Where rows come from: a loaded split (``load_dataset`` or ``load_from_disk``) or a stream, and the
checks both share (the columns exist, the input holds text or token ids)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_dataset_builder, load_from_disk
from datasets.exceptions import DatasetGenerationError

from actlightning.errors import ConfigError, first_line


@dataclass(frozen=True)
class Source:
    """The data module's source settings (see ``ActivationDataModule``)."""

    path: str
    name: str | None
    split: str
    data_files: Any
    revision: str | None
    input_column: str
    label_columns: list[str]

    def describe(self) -> str:
        """``data.path 'x' (data.name 'y', ...)`` naming only the settings that are set."""
        given = [(k, getattr(self, k)) for k in ("name", "data_files", "revision") if getattr(self, k) is not None]
        given.append(("split", self.split))
        return f"data.path {self.path!r} ({', '.join(f'data.{k} {v!r}' for k, v in given)})"

    def check_columns(self, schema: pa.Schema) -> bool:
        """Refuse missing columns or an input column of another type; True when the input holds
        token-id lists (used as they are), False for text."""
        columns = list(schema.names)
        missing = [c for c in [self.input_column, *self.label_columns] if c not in columns]
        if missing:
            raise ConfigError(
                f"column(s) {missing} not in the dataset; its columns are {columns} "
                "(check data.input_column and data.label_columns)"
            )
        input_type = schema.field(self.input_column).type
        pretokenized = (pa.types.is_list(input_type) or pa.types.is_large_list(input_type)) and pa.types.is_integer(
            input_type.value_type
        )
        if not (pretokenized or pa.types.is_string(input_type) or pa.types.is_large_string(input_type)):
            raise ConfigError(
                f"data.input_column {self.input_column!r} holds {input_type}; it must hold text, "
                "or lists of token ids (a pre-tokenized input_ids column)"
            )
        return pretokenized


def _is_saved_dataset(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and any(
        (folder / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def load_split(source: Source) -> Dataset:
    """The split to export, as a ``datasets.Dataset``; a wrong path, name or split is a ConfigError."""
    if _is_saved_dataset(source.path):
        loaded = load_from_disk(source.path)
        if isinstance(loaded, DatasetDict):
            if source.split not in loaded:
                raise ConfigError(
                    f"data.split {source.split!r} is not in {source.path}; its splits are {sorted(loaded)}"
                )
            loaded = loaded[source.split]
        return flat(loaded)
    try:
        builder = load_dataset_builder(source.path, source.name, data_files=source.data_files, revision=source.revision)
    except (FileNotFoundError, OSError, ValueError) as error:
        raise ConfigError(f"{source.describe()} could not be loaded: {first_line(error)}") from None
    splits = builder.info.splits
    if splits and source.split not in splits and "[" not in source.split:
        raise ConfigError(f"data.split {source.split!r} does not exist; the splits are {sorted(splits)}")
    try:
        loaded = load_dataset(
            source.path, source.name, split=source.split, data_files=source.data_files, revision=source.revision
        )
    except Exception as error:  # any failure to read the data is reported as one line
        raise _read_error(source, error) from None
    return flat(loaded)


def _read_error(source: Source, error: Exception) -> ConfigError:
    cause = error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error
    text = first_line(cause) if str(cause).strip() else ""
    if text.startswith("Unknown split"):
        # The builder knows its splits only once it has read the data: the same error, later.
        splits = text.split("Should be one of", 1)[-1].strip(" .")
        return ConfigError(f"data.split {source.split!r} does not exist; the splits are {splits}")
    if "corresponds to no data" in text or isinstance(cause, StopIteration):
        return ConfigError(
            f"data.split {source.split!r} of data.path {source.path!r} is empty: there is nothing to export"
        )
    return ConfigError(f"{source.describe()} could not be read: {type(cause).__name__}: {text}")


def flat(dataset: Dataset) -> Dataset:
    """``dataset`` with any indices mapping (a ``select`` or ``shuffle`` view) written out, so that its
    Arrow table holds exactly its rows in order (the selection reads the table's columns directly)."""
    # upstream: datasets offers no public way to ask whether a Dataset has an indices mapping, and
    # flatten_indices() rewrites the whole table even when it has none.
    has_indices = getattr(dataset, "_indices", None) is not None
    return dataset.flatten_indices() if has_indices else dataset


def open_stream(source: Source) -> IterableDataset:
    """The split as a stream (``load_dataset(..., streaming=True)``), with its features known."""
    try:
        stream = load_dataset(
            source.path,
            source.name,
            split=source.split,
            data_files=source.data_files,
            revision=source.revision,
            streaming=True,
        )
    except (FileNotFoundError, OSError, ValueError) as error:
        raise ConfigError(f"{source.describe()} could not be streamed: {first_line(error)}") from None
    if stream.features is None:
        # upstream: JSON/CSV streams know their columns only from their first rows, and datasets has
        # no public IterableDataset method that reads them (_resolve_features is private).
        stream = getattr(stream, "_resolve_features")()  # noqa: B009
    return stream
