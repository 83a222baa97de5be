"""The LightningDataModule: load, tokenize, filter, order and batch the dataset; plan the shards."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_dataset_builder, load_from_disk
from datasets.exceptions import DatasetGenerationError
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from transformers import AutoTokenizer

from actlightning.batching import (
    Batch,
    PaddingSide,
    PlannedBatch,
    TokenStore,
    assign_shards,
    collate,
    group_shards,
    index_dtype,
    padding_efficiency,
    plan_batches,
    rank_batches,
    search_batch_size,
)
from actlightning.errors import ConfigError, first_line, require_positive
from actlightning.filters import length_range, shuffle_and_limit
from actlightning.schema import is_reserved_column
from actlightning.stream import StreamCounts
from actlightning.tokens import (
    TOKENS,
    TokenTable,
    dedupe_rows,
    drop_prefix_rows,
    token_column_of_pretokenized,
    token_lengths,
    tokenize_dataset,
)

log = logging.getLogger(__name__)


def _is_saved_dataset(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and (
        (folder / "dataset_info.json").exists()
        or (folder / "dataset_dict.json").exists()
        or (folder / "state.json").exists()
    )


class _PlanDataset(TorchDataset):
    def __init__(self, planned: list[PlannedBatch]) -> None:
        self.planned = planned

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, index: int) -> PlannedBatch:
        return self.planned[index]


def _callable_name(function: Callable | None) -> str | None:
    """``module.qualname`` of a filter callable (how the manifest records it)."""
    if function is None:
        return None
    return f"{function.__module__}.{getattr(function, '__qualname__', function)}"


def batch_size_search_applies(device: torch.device) -> bool:
    """Batch-size search probes device memory; on CPU it does not apply."""
    return device.type == "cuda"


class ActivationDataModule(LightningDataModule):
    """Loads a HF dataset, selects and tokenizes rows, and serves length-aware padded batches.

    Selection runs in this order: ``filter``, ``dedupe``, ``drop_prefixes`` (on the input text),
    tokenization (empty inputs skipped), ``min_tokens`` / ``max_tokens_per_sequence``, ``shuffle_seed``
    and ``limit``, then truncation to ``max_length``. Ordering and batching (``sort_by_length``,
    ``bucket_size``, ``max_tokens``, ``batch_order_seed``) then plan the batches of what was selected.

    Args:
        path: ``datasets.load_dataset`` path: a Hub id, a builder name (``parquet``, ``json``, ``csv``) with
            ``data_files``, a local folder of data files, or a folder written by ``Dataset.save_to_disk``.
        input_column: Column holding the text to run through the model, or a pre-tokenized column of
            token id lists (used as-is).
        name: Dataset configuration name (``load_dataset(name=...)``).
        split: Split to export.
        data_files: Data files for builder names like ``parquet`` (a path, glob, list or mapping).
        revision: Hub revision of the dataset.
        label_columns: Columns copied verbatim into every output row (any Arrow type).
        filter: Optional importable callable (``my_pkg.filters.high_elo``) given a row (a dict) and
            returning whether to keep it.
        dedupe: Drop exact duplicate inputs, keeping the first occurrence.
        drop_prefixes: Drop inputs that are a strict prefix of another input (a game cut short).
        min_tokens: Drop sequences with fewer tokens (counted before truncation).
        max_tokens_per_sequence: Drop sequences with more tokens (counted before truncation).
        shuffle_seed: Shuffle the rows with this seed before ``limit`` (0 is a seed). Unset: keep order.
        limit: Keep at most this many rows after filtering and shuffling.
        batch_size: Sequences per forward pass (an upper bound when ``max_tokens`` is set).
        max_tokens: Token budget per batch: padded length x sequences stays within it (a single longer
            sequence gets its own batch).
        max_length: Truncate sequences to their first ``max_length`` tokens. Unset: the model's context size.
        sort_by_length: Order sequences by token count, so batches hold similar lengths and pad little.
        sort_reversed: Longest first (with ``sort_by_length`` or ``bucket_size``): a batch that does not
            fit fails at once.
        bucket_size: Sort by length within each run of this many consecutive examples instead of
            globally, and batch each run on its own: padding stays small without a global sort.
        batch_order_seed: Shuffle the order of whole batches with this seed (e.g. after bucketing, so
            shards are not ordered by length).
        auto_find_batch_size: On CUDA, find the largest ``batch_size`` (or ``max_tokens``) that fits,
            probing with the longest batch of the run and halving on out-of-memory. Ignored on CPU.
        padding_side: Where padding goes in a batch. Both equal the unpadded forward within float tolerance
            (explicit position ids and attention mask); ``right`` needs no masking for causal attention.
        num_workers: DataLoader worker processes for collation.
        num_proc: Processes tokenizing the split (once: the result is cached on disk beside the
            dataset and reused by every rank, rerun and resume). Unset: one.
        streaming: Read the dataset as a stream (``load_dataset(..., streaming=True)``): nothing is
            downloaded or cached up front, and host memory stays flat whatever the dataset's size.
            Examples are sorted and batched within windows of ``bucket_size``; settings that need the
            whole dataset up front are refused (see the README).
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
        filter: Callable[[dict], bool] | None = None,
        dedupe: bool = False,
        drop_prefixes: bool = False,
        min_tokens: int | None = None,
        max_tokens_per_sequence: int | None = None,
        shuffle_seed: int | None = None,
        limit: int | None = None,
        batch_size: int = 8,
        max_tokens: int | None = None,
        max_length: int | None = None,
        sort_by_length: bool = False,
        sort_reversed: bool = False,
        bucket_size: int | None = None,
        batch_order_seed: int | None = None,
        auto_find_batch_size: bool = False,
        padding_side: PaddingSide = "right",
        num_workers: int = 0,
        num_proc: int | None = None,
        streaming: bool = False,
        tokenizer: str | None = None,
        tokenizer_revision: str | None = None,
    ) -> None:
        super().__init__()
        require_positive("data.batch_size", batch_size)
        for setting, value in [
            ("max_tokens", max_tokens),
            ("max_length", max_length),
            ("limit", limit),
            ("bucket_size", bucket_size),
            ("min_tokens", min_tokens),
            ("max_tokens_per_sequence", max_tokens_per_sequence),
        ]:
            require_positive(f"data.{setting}", value, allow_unset=True)
        if min_tokens is not None and max_tokens_per_sequence is not None and min_tokens > max_tokens_per_sequence:
            raise ConfigError(
                f"data.min_tokens ({min_tokens}) is above data.max_tokens_per_sequence ({max_tokens_per_sequence}): "
                "no sequence could pass"
            )
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers}")
        require_positive("data.num_proc", num_proc, allow_unset=True)
        if streaming:
            from actlightning.stream import check_streaming_settings

            check_streaming_settings(
                sort_by_length=sort_by_length,
                bucket_size=bucket_size,
                dedupe=dedupe,
                drop_prefixes=drop_prefixes,
                shuffle_seed=shuffle_seed,
                batch_order_seed=batch_order_seed,
                auto_find_batch_size=auto_find_batch_size,
                num_workers=num_workers,
            )
        # Every setting is kept in self.hparams (Lightning's record of the init arguments).
        self.save_hyperparameters()
        self.label_columns = list(label_columns or [])
        for label in self.label_columns:
            if is_reserved_column(label):
                raise ConfigError(
                    f"data.label_columns contains {label!r}, which is the name of a column the export writes; "
                    "rename it in the dataset first"
                )
        self.store: TokenTable | TokenStore | None = None
        self.labels: pa.Table | None = None
        self.label_features: dict = {}
        # Rows removed by each selection step, in order; reported in the log and the manifest.
        self.removed: dict[str, int] = {}
        self.stats: dict[str, float] = {}
        self.batches_per_shard = 1
        self.max_shards: int | None = None
        self.skip_example_ids: np.ndarray | None = None
        self.taken_shard_indices: set[int] = set()
        self.pad_id = 0
        # Set by the CLI, which wires the model to the data: the model's context size (the default
        # truncation, and the bound of data.max_length) and its probe for the batch-size search.
        self.model_context: int | None = None
        self.probe: Callable[[Batch], bool] | None = None
        self.stream_counts: StreamCounts | None = None
        self._streaming_ready = False
        self._pretokenized = False
        self._loaded_tokenizer: Any = None

    @property
    def hparams(self) -> AttributeDict:
        """The settings (Lightning's record of the init arguments), attribute access typed."""
        return cast(AttributeDict, super().hparams)

    def load(self) -> Dataset:
        """The split to export, as a ``datasets.Dataset``; a wrong path, name or split is a ConfigError."""
        if _is_saved_dataset(self.hparams.path):
            loaded = load_from_disk(self.hparams.path)
            if isinstance(loaded, DatasetDict):
                if self.hparams.split not in loaded:
                    raise ConfigError(
                        f"data.split {self.hparams.split!r} is not in {self.hparams.path}; "
                        f"its splits are {sorted(loaded)}"
                    )
                loaded = loaded[self.hparams.split]
            return loaded
        try:
            builder = load_dataset_builder(
                self.hparams.path, self.hparams.name, data_files=self.hparams.data_files, revision=self.hparams.revision
            )
        except (FileNotFoundError, OSError, ValueError) as error:
            raise ConfigError(f"{self._source()} could not be loaded: {first_line(error)}") from None
        splits = builder.info.splits
        if splits and self.hparams.split not in splits and "[" not in self.hparams.split:
            raise ConfigError(f"data.split {self.hparams.split!r} does not exist; the splits are {sorted(splits)}")
        try:
            return load_dataset(
                self.hparams.path,
                self.hparams.name,
                split=self.hparams.split,
                data_files=self.hparams.data_files,
                revision=self.hparams.revision,
            )
        except Exception as error:  # any failure to read the data is reported as one line
            cause = error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error
            text = first_line(cause) if str(cause).strip() else ""
            if text.startswith("Unknown split"):
                # The builder knows its splits only once it has read the data: the same error, later.
                splits = text.split("Should be one of", 1)[-1].strip(" .")
                raise ConfigError(
                    f"data.split {self.hparams.split!r} does not exist; the splits are {splits}"
                ) from None
            if "corresponds to no data" in text or isinstance(cause, StopIteration):
                raise ConfigError(
                    f"data.split {self.hparams.split!r} of data.path {self.hparams.path!r} is empty: "
                    "there is nothing to export"
                ) from None
            raise ConfigError(f"{self._source()} could not be read: {type(cause).__name__}: {text}") from None

    def _source(self) -> str:
        """``data.path 'x' (data.name 'y', ...)`` naming only the settings that are set."""
        given = [(k, self.hparams[k]) for k in ("name", "data_files", "revision") if self.hparams[k] is not None]
        given.append(("split", self.hparams.split))
        return f"data.path {self.hparams.path!r} ({', '.join(f'data.{k} {v!r}' for k, v in given)})"

    def _tokenizer(self):
        """The model's tokenizer, loaded once (prepare_data, setup and the stream all need it)."""
        if self._loaded_tokenizer is not None:
            return self._loaded_tokenizer
        from actlightning.loading import load_pretrained

        tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained,
            "model.checkpoint (its tokenizer)",
            self.hparams.tokenizer,
            revision=self.hparams.tokenizer_revision,
        )
        if tokenizer.pad_token_id is not None:
            self.pad_id = tokenizer.pad_token_id
        self._loaded_tokenizer = tokenizer
        return tokenizer

    def _count_removed(self, step: str, kept: np.ndarray, before: int) -> None:
        """Record how many rows ``step`` removed."""
        self.removed[step] = int(before - len(kept))

    def prepare_data(self) -> None:
        """Tokenize the split once, into ``datasets``' on-disk cache (Lightning runs this once per node;
        every rank's ``setup``, every rerun and every resume then read the cache)."""
        if self.hparams.streaming or self.store is not None:
            return  # nothing to cache, or already set up from the cache (the CLI plans before Lightning runs)
        if self.hparams.tokenizer is None:
            raise ConfigError("data.tokenizer is unset; the CLI links it to model.checkpoint")
        dataset = self.load()
        self._check_columns(dataset)
        if not self._pretokenized:
            tokenize_dataset(dataset, self.hparams.input_column, self._tokenizer(), self.hparams.num_proc)

    def _tokens(self, dataset: Dataset) -> tuple[object, np.ndarray]:
        """Every loaded row's tokens (a memory-mapped Arrow column) and token counts."""
        if self._pretokenized:
            return token_column_of_pretokenized(dataset, self.hparams.input_column)
        tokenized = tokenize_dataset(dataset, self.hparams.input_column, self._tokenizer(), self.hparams.num_proc)
        return tokenized.data.column(TOKENS), token_lengths(tokenized)

    def setup(self, stage: str) -> None:
        if self.store is not None or self._streaming_ready:
            return
        if self.hparams.tokenizer is None:
            raise ConfigError("data.tokenizer is unset; the CLI links it to model.checkpoint")
        if self.hparams.streaming:
            self._setup_stream()
            return
        dataset = self.load()
        self._check_columns(dataset)
        if dataset._indices is not None:
            dataset = dataset.flatten_indices()
        self.stats["loaded"] = len(dataset)
        if len(dataset) == 0:
            raise ConfigError(
                f"data.split {self.hparams.split!r} of {self.hparams.path!r} is empty: there is nothing to export"
            )
        ids = np.arange(len(dataset), dtype=index_dtype(len(dataset)))  # example ids: rows of the loaded split
        if self.hparams.filter is not None:
            keep = np.fromiter((bool(self.hparams.filter(row)) for row in dataset), dtype=bool, count=len(dataset))
            self._count_removed("filter", ids[keep], len(ids))
            ids = ids[keep]
        text = dataset.data.column(self.hparams.input_column)
        for step, enabled, select in [
            ("dedupe", self.hparams.dedupe, dedupe_rows),
            ("drop_prefixes", self.hparams.drop_prefixes, drop_prefix_rows),
        ]:
            if enabled:
                kept = select(text, ids)
                self._count_removed(step, kept, len(ids))
                ids = kept
        tokens, lengths = self._tokens(dataset)
        store = TokenTable(tokens, ids, lengths[ids])
        # Positions are built only when a row is empty (8 bytes a row, at the peak, otherwise).
        empty = store.lengths == 0
        self.removed["empty"] = int(empty.sum())
        store = store.select(np.flatnonzero(~empty)) if self.removed["empty"] else store
        del empty
        if self.hparams.min_tokens is not None or self.hparams.max_tokens_per_sequence is not None:
            kept = length_range(store.lengths, self.hparams.min_tokens, self.hparams.max_tokens_per_sequence)
            self._count_removed("token_range", kept, len(store))
            store = store.select(kept) if len(kept) < len(store) else store
        if self.hparams.shuffle_seed is not None or self.hparams.limit is not None:
            kept = shuffle_and_limit(len(store), self.hparams.shuffle_seed, self.hparams.limit)
            self._count_removed("limit", kept, len(store))
            store = store.select(kept)
        max_length = self._max_length()
        self.stats["truncated"] = int((store.lengths > max_length).sum()) if max_length else 0
        if max_length is not None:
            # In place: the store owns its lengths (a selection made them), and a copy would double them.
            np.minimum(store.lengths, max_length, out=store.lengths)
        if len(store) == 0:
            raise ConfigError(
                f"no examples left to export: {len(dataset)} rows loaded, removed by each step: {self.removed}; "
                "loosen the data filters"
            )
        self.store = store
        self.labels = dataset.data.table.select(self.label_columns)
        self.label_features = {c: dataset.features[c] for c in self.label_columns}
        self.stats["selected"] = len(store)
        self.stats["tokens"] = int(store.lengths.sum())
        log.info(
            "dataset %s: %d rows loaded, %d selected (%d tokens); removed by each step: %s; %d truncated to %s tokens",
            self.hparams.path,
            len(dataset),
            len(store),
            self.stats["tokens"],
            self.removed,
            self.stats["truncated"],
            max_length,
        )

    def _max_length(self) -> int | None:
        """``data.max_length``, checked against the model's context; unset: the context size."""
        context = self._model_context()
        if self.hparams.max_length is not None and context is not None and self.hparams.max_length > context:
            raise ConfigError(
                f"data.max_length is {self.hparams.max_length}, above the model's context size {context}; "
                f"use at most {context}, or leave it unset to truncate at the context size"
            )
        return self.hparams.max_length if self.hparams.max_length is not None else context

    def _check_columns(self, dataset: Dataset) -> None:
        missing = [c for c in [self.hparams.input_column, *self.label_columns] if c not in dataset.column_names]
        if missing:
            raise ConfigError(
                f"column(s) {missing} not in the dataset; its columns are {dataset.column_names} "
                "(check data.input_column and data.label_columns)"
            )
        self._set_input_kind(dataset.data.schema.field(self.hparams.input_column).type)

    def _set_input_kind(self, arrow_type: pa.DataType) -> None:
        self._pretokenized = (
            pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
        ) and pa.types.is_integer(arrow_type.value_type)
        if not (self._pretokenized or pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
            raise ConfigError(
                f"data.input_column {self.hparams.input_column!r} holds {arrow_type}; it must hold text, "
                "or lists of token ids (a pre-tokenized input_ids column)"
            )

    def _model_context(self) -> int | None:
        """The model's context size: set by the CLI (``model_context``) before any data loads."""
        return self.model_context

    def export_settings(self) -> dict:
        """Settings that decide which examples an export holds, their tokens and their grouping."""
        return {
            "path": self.hparams.path,
            "name": self.hparams.name,
            "split": self.hparams.split,
            "data_files": self.hparams.data_files,
            "revision": self.hparams.revision,
            "input_column": self.hparams.input_column,
            "label_columns": self.label_columns,
            "filter": _callable_name(self.hparams.filter),
            "dedupe": self.hparams.dedupe,
            "drop_prefixes": self.hparams.drop_prefixes,
            "min_tokens": self.hparams.min_tokens,
            "max_tokens_per_sequence": self.hparams.max_tokens_per_sequence,
            "shuffle_seed": self.hparams.shuffle_seed,
            "limit": self.hparams.limit,
            "max_length": self.hparams.max_length,
            "sort_by_length": self.hparams.sort_by_length,
            "sort_reversed": self.hparams.sort_reversed,
            "bucket_size": self.hparams.bucket_size,
            "batch_order_seed": self.hparams.batch_order_seed,
            "streaming": self.hparams.streaming,
        }

    def configure_sharding(
        self,
        batches_per_shard: int,
        max_shards: int | None = None,
        skip_example_ids: np.ndarray | None = None,
        taken_shard_indices: set[int] | None = None,
    ) -> None:
        """Called by the writer before the dataloader is built: how batches group into shards, and
        what a resumed export already holds (examples, and shard indices in use)."""
        self.batches_per_shard = batches_per_shard
        self.max_shards = max_shards
        self.skip_example_ids = skip_example_ids
        self.taken_shard_indices = set(taken_shard_indices or ())

    def plan(self) -> tuple[list[Sequence[np.ndarray]], list[int]]:
        """Shards still to export (positions into ``self.store``) and their indices; identical on every rank.

        The plan covers the whole selection, so ``max_shards`` always means the same examples. Resuming
        removes the examples already in complete shards; what remains keeps its place in the plan.
        """
        store = self._store()
        lengths = store.lengths
        batches = plan_batches(
            lengths,
            self.hparams.batch_size,
            self.hparams.max_tokens,
            self.hparams.sort_by_length,
            self.hparams.sort_reversed,
            self.hparams.bucket_size,
            self.hparams.batch_order_seed,
        )
        shards = group_shards(batches, self.batches_per_shard, self.max_shards)
        self.stats["padding_efficiency"] = round(padding_efficiency((b for s in shards for b in s), lengths), 4)
        indices = list(range(len(shards)))
        if self.skip_example_ids is not None and len(self.skip_example_ids):
            done = np.isin(store.example_ids, self.skip_example_ids)
            remaining: list[Sequence[np.ndarray]] = []
            kept_indices = []
            for index, shard in zip(indices, shards, strict=True):
                left = [b[~done[b]] for b in shard]
                left = [b for b in left if len(b)]
                if left:
                    remaining.append(left)
                    kept_indices.append(index)
            shards, indices = remaining, kept_indices
        # A partly exported shard (possible when batching settings changed) gets a fresh index.
        next_free = max([*self.taken_shard_indices, *indices], default=-1) + 1
        renamed = []
        for index in indices:
            if index in self.taken_shard_indices:
                index, next_free = next_free, next_free + 1
            renamed.append(index)
        return shards, renamed

    def label_rows(self, example_ids: np.ndarray) -> pa.Table:
        """Label columns of the given rows of the loaded split, in that order."""
        assert self.labels is not None, "setup() has run"
        return self.labels.take(pa.array(example_ids, type=pa.int64()))

    def _search_batch_size(self, trainer: Trainer) -> None:
        """Probe the longest batch of the run on the device, halving the size until it fits."""
        device = trainer.strategy.root_device
        if not batch_size_search_applies(device):
            log.info("data.auto_find_batch_size does not apply on %s; using the configured size", device)
            return
        if self.probe is None:
            raise ConfigError("data.auto_find_batch_size needs the model's probe (the CLI sets data.probe)")
        store = self._store()
        budget_mode = self.hparams.max_tokens is not None
        found = search_batch_size(
            store, self.hparams.batch_size, self.hparams.max_tokens, self.probe, self.pad_id, self.hparams.padding_side
        )
        # Every rank must plan the same batches: take the smallest size any rank found.
        found = int(trainer.strategy.all_gather(torch.tensor(found, device=device)).min())
        if budget_mode:
            self.hparams.max_tokens = found
        else:
            self.hparams.batch_size = found
        log.info("data.auto_find_batch_size: using %s=%d", "max_tokens" if budget_mode else "batch_size", found)
        self.stats["batch_size" if not budget_mode else "max_tokens"] = found

    def _store(self) -> TokenTable | TokenStore:
        if self.store is None:
            raise RuntimeError("setup() must run first")
        return self.store

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.hparams.streaming:
            return self._stream_dataloader()
        if self.hparams.auto_find_batch_size and trainer is not None:
            self._search_batch_size(trainer)
        shards, shard_ids = self.plan()
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        store = self._store()
        lengths = store.lengths
        shard_tokens = [int(sum(lengths[b].sum() for b in shard)) for shard in shards]
        owned = assign_shards(shard_tokens, world_size)[rank]
        planned = rank_batches(shards, shard_ids, owned)
        self.stats["planned_shards"] = len(shards)
        self.stats["planned_tokens_this_rank"] = int(sum(lengths[b.positions].sum() for b in planned))
        log.info(
            "plan: %d shards to write (%d on this rank), padding efficiency %.3f",
            len(shards),
            len(owned),
            self.stats["padding_efficiency"],
        )
        return DataLoader(
            _PlanDataset(planned),
            batch_size=None,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate, store, pad_id=self.pad_id, padding_side=self.hparams.padding_side),
        )

    def summary(self) -> dict:
        """Selection and batching numbers for the manifest."""
        if self.hparams.streaming and self.stream_counts is not None:
            counts = self.stream_counts
            self.removed = dict(counts.removed)
            self.stats.update(
                loaded=counts.loaded, selected=counts.selected, tokens=counts.tokens, truncated=counts.truncated
            )
            if counts.padded_tokens:
                self.stats["padding_efficiency"] = round(counts.real_tokens / counts.padded_tokens, 4)
        return {"removed": dict(self.removed), **self.stats}

    # --- streaming -------------------------------------------------------------------------------

    def _setup_stream(self) -> None:
        try:
            stream = load_dataset(
                self.hparams.path,
                self.hparams.name,
                split=self.hparams.split,
                data_files=self.hparams.data_files,
                revision=self.hparams.revision,
                streaming=True,
            )
        except (FileNotFoundError, OSError, ValueError) as error:
            raise ConfigError(f"{self._source()} could not be streamed: {first_line(error)}") from None
        if stream.features is None:
            # JSON/CSV streams know their columns only from their first rows (private, but the only way).
            stream = stream._resolve_features()
        features = stream.features
        missing = [c for c in [self.hparams.input_column, *self.label_columns] if c not in features]
        if missing:
            raise ConfigError(
                f"column(s) {missing} not in the dataset; its columns are {list(features)} "
                "(check data.input_column and data.label_columns)"
            )
        arrow_type = features.arrow_schema.field(self.hparams.input_column).type
        self._set_input_kind(arrow_type)
        self._stream = stream
        self.label_features = {c: features[c] for c in self.label_columns}
        self._label_schema = None
        if self.label_columns:
            from datasets import Features

            self._label_schema = Features(self.label_features).arrow_schema
        self._stream_tokenizer = None if self._pretokenized else self._tokenizer()
        self.stream_counts = StreamCounts()
        self._streaming_ready = True
        log.info("dataset %s: streaming (examples and tokens are counted as they arrive)", self.hparams.path)

    def stream_shards(self):
        """Every shard of the stream, in order (see ``actlightning.stream``); counts go to ``stream_counts``."""
        from actlightning.stream import StreamCounts, selected_examples, stream_shards

        self.stream_counts = StreamCounts()
        tokenizer = self._stream_tokenizer
        tokenize = (
            None if tokenizer is None else (lambda inputs: tokenizer(inputs, add_special_tokens=True)["input_ids"])
        )
        examples = selected_examples(
            iter(self._stream),
            self.hparams.input_column,
            self.label_columns,
            tokenize,
            self.hparams.filter,
            self.hparams.min_tokens,
            self.hparams.max_tokens_per_sequence,
            self.hparams.limit,
            self._max_length(),
            self.stream_counts,
        )
        return stream_shards(
            examples,
            self.hparams.batch_size,
            self.hparams.max_tokens,
            self.hparams.bucket_size,
            self.hparams.sort_reversed,
            self.batches_per_shard,
            self.max_shards,
            self._label_schema,
            self.stream_counts,
        )

    def _stream_dataloader(self) -> DataLoader:
        from actlightning.stream import StreamingBatches

        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.stats["planned_tokens_this_rank"] = 0  # unknown: the progress bar shows no total
        batches = StreamingBatches(
            self.stream_shards, self.taken_shard_indices, rank, world_size, self.pad_id, self.hparams.padding_side
        )
        return DataLoader(batches, batch_size=None, num_workers=0)
