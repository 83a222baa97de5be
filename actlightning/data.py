"""The LightningDataModule: load, tokenize, filter, order and batch the dataset; plan the shards."""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from transformers import AutoTokenizer

from actlightning.batching import (
    PaddingSide,
    PlannedBatch,
    TokenStore,
    assign_shards,
    chunk_batches,
    collate,
    group_shards,
    length_order,
    rank_batches,
)
from actlightning.schema import is_reserved_column

log = logging.getLogger(__name__)

# Tokenizing in chunks keeps memory flat and lets the fast tokenizer batch in Rust.
_TOKENIZE_CHUNK = 4096


def _is_saved_dataset(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and (
        (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
    )


class _PlanDataset(TorchDataset):
    def __init__(self, planned: list[PlannedBatch]) -> None:
        self.planned = planned

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, index: int) -> PlannedBatch:
        return self.planned[index]


class ActivationDataModule(LightningDataModule):
    """Loads a HF dataset, tokenizes it with the model's tokenizer and serves padded batches.

    Args:
        path: ``datasets.load_dataset`` path: a Hub id, a builder name (``parquet``, ``json``, ``csv``) with
            ``data_files``, a local folder of data files, or a folder written by ``Dataset.save_to_disk``.
        input_column: Column holding the text to run through the model (or pre-tokenized ``input_ids``).
        name: Dataset configuration name (``load_dataset(name=...)``).
        split: Split to export.
        data_files: Data files for builder names like ``parquet`` (a path, glob, list or mapping).
        revision: Hub revision of the dataset.
        label_columns: Columns copied verbatim into every output row (any Arrow type).
        batch_size: Sequences per forward pass.
        max_length: Truncate sequences to their first ``max_length`` tokens. Unset: the model's context size.
        sort_by_length: Order sequences by token count, so batches hold similar lengths and pad little.
        sort_reversed: With ``sort_by_length``, longest first: a batch that does not fit fails at once.
        padding_side: Where padding goes in a batch. Both give identical activations (explicit position
            ids and attention mask); ``right`` needs no masking for causal attention.
        num_workers: DataLoader worker processes for collation.
        tokenizer: Tokenizer to load; linked to ``model.checkpoint`` by the CLI.
        tokenizer_revision: Revision of the tokenizer; linked to ``model.revision`` by the CLI.
    """

    def __init__(
        self,
        path: str,
        input_column: str = "text",
        name: str | None = None,
        split: str = "train",
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        label_columns: list[str] | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        sort_by_length: bool = False,
        sort_reversed: bool = False,
        padding_side: PaddingSide = "right",
        num_workers: int = 0,
        tokenizer: str | None = None,
        tokenizer_revision: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"data.max_length must be a positive number of tokens or unset, got {max_length}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.path = path
        self.input_column = input_column
        self.name = name
        self.split = split
        self.data_files = data_files
        self.revision = revision
        self.label_columns = list(label_columns or [])
        self.batch_size = batch_size
        self.max_length = max_length
        self.sort_by_length = sort_by_length
        self.sort_reversed = sort_reversed
        self.padding_side = padding_side
        self.num_workers = num_workers
        self.tokenizer_name = tokenizer
        self.tokenizer_revision = tokenizer_revision
        for label in self.label_columns:
            if is_reserved_column(label):
                raise ValueError(
                    f"data.label_columns contains {label!r}, which is the name of a column the export writes; "
                    "rename it in the dataset first"
                )
        self.store: TokenStore | None = None
        self.labels: pa.Table | None = None
        self.label_features: dict = {}
        self.stats: Counter = Counter()
        self.batches_per_shard = 1
        self.max_shards: int | None = None
        self.skip_example_ids: np.ndarray | None = None
        self.first_shard_index = 0
        self.pad_id = 0

    def load(self) -> Dataset:
        """The split to export, as a ``datasets.Dataset``."""
        if _is_saved_dataset(self.path):
            loaded = load_from_disk(self.path)
            if isinstance(loaded, DatasetDict):
                loaded = loaded[self.split]
            return loaded
        return load_dataset(
            self.path, self.name, split=self.split, data_files=self.data_files, revision=self.revision
        )

    def _tokenize(self, dataset: Dataset, max_length: int | None) -> TokenStore:
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name, revision=self.tokenizer_revision)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        sequences: list[list[int]] = []
        column = dataset.data.column(self.input_column)
        for start in range(0, len(column), _TOKENIZE_CHUNK):
            texts = column.slice(start, _TOKENIZE_CHUNK).to_pylist()
            # None and "" become empty sequences and are skipped below, never a crash in a batch.
            texts = [t if t else "" for t in texts]
            sequences.extend(tokenizer(texts, add_special_tokens=True)["input_ids"])
        store = TokenStore.from_sequences(sequences)
        lengths = store.lengths
        keep = np.flatnonzero(lengths > 0)
        self.stats["skipped_empty"] = int(len(store) - len(keep))
        if max_length is not None:
            self.stats["truncated"] = int((lengths[keep] > max_length).sum())
        return store.select(keep, max_length=max_length)

    def setup(self, stage: str) -> None:
        if self.store is not None:
            return
        if self.tokenizer_name is None:
            raise ValueError("data.tokenizer is unset; the CLI links it to model.checkpoint")
        dataset = self.load()
        missing = [c for c in [self.input_column, *self.label_columns] if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"column(s) {missing} not in the dataset; its columns are {dataset.column_names} "
                "(check data.input_column and data.label_columns)"
            )
        if dataset._indices is not None:
            dataset = dataset.flatten_indices()
        max_length = self.max_length if self.max_length is not None else self._model_context()
        store = self._tokenize(dataset, max_length)
        self.stats["loaded"] = len(dataset)
        if self.sort_by_length:
            store = store.select(length_order(store.lengths, descending=self.sort_reversed))
        self.store = store
        self.labels = dataset.data.table.select(self.label_columns)
        self.label_features = {c: dataset.features[c] for c in self.label_columns}
        self.stats["selected"] = len(store)
        log.info(
            "dataset %s: %d rows loaded, %d selected (%s)", self.path, len(dataset), len(store), dict(self.stats)
        )

    def _model_context(self) -> int | None:
        trainer = getattr(self, "_trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        config = getattr(module, "config", None)
        if config is None:
            return None
        from actlightning.module import context_size

        return context_size(config)

    def export_settings(self) -> dict:
        """Settings that decide which examples an export holds and what their tokens are."""
        return {
            "path": self.path,
            "name": self.name,
            "split": self.split,
            "data_files": self.data_files,
            "revision": self.revision,
            "input_column": self.input_column,
            "label_columns": self.label_columns,
            "max_length": self.max_length,
            "sort_by_length": self.sort_by_length,
            "sort_reversed": self.sort_reversed,
        }

    def configure_sharding(
        self,
        batches_per_shard: int,
        max_shards: int | None = None,
        skip_example_ids: np.ndarray | None = None,
        first_shard_index: int = 0,
    ) -> None:
        """Called by the writer before the dataloader is built: how batches group into shards, and
        which examples a resumed export already holds."""
        self.batches_per_shard = batches_per_shard
        self.max_shards = max_shards
        self.skip_example_ids = skip_example_ids
        self.first_shard_index = first_shard_index

    def plan(self) -> list[list[np.ndarray]]:
        """Shards still to export (positions into ``self.store``), identical on every rank.

        Resuming drops the examples already exported and plans the rest the same way; shards that
        were complete are whole runs of full batches, so the remaining batches come out unchanged.
        """
        assert self.store is not None, "setup() must run before plan()"
        positions = np.arange(len(self.store))
        if self.skip_example_ids is not None and len(self.skip_example_ids):
            positions = positions[~np.isin(self.store.example_ids, self.skip_example_ids)]
        if self.max_shards == 0:
            return []
        batches = [positions[b] for b in chunk_batches(len(positions), self.batch_size)]
        return group_shards(batches, self.batches_per_shard, self.max_shards)

    def label_rows(self, example_ids: np.ndarray) -> pa.Table:
        """Label columns of the given rows of the loaded split, in that order."""
        return self.labels.take(pa.array(example_ids, type=pa.int64()))

    def predict_dataloader(self) -> DataLoader:
        shards = self.plan()
        trainer = getattr(self, "_trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        lengths = self.store.lengths
        shard_tokens = [int(sum(lengths[b].sum() for b in shard)) for shard in shards]
        owned = assign_shards(shard_tokens, world_size)[rank]
        shard_ids = [self.first_shard_index + i for i in range(len(shards))]
        planned = rank_batches(shards, shard_ids, owned)
        self.planned_tokens = int(sum(lengths[b.positions].sum() for b in planned))
        return DataLoader(
            _PlanDataset(planned),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=partial(collate, self.store, pad_id=self.pad_id, padding_side=self.padding_side),
        )
