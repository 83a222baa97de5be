"""The LightningDataModule: its hooks, and the plan of what an export runs (see ``ExportPlan``).

The work is done by the steps beside it: ``source`` (where rows come from), ``selection`` (which
rows), ``tokens`` (the on-disk token cache), ``batching`` and ``collate`` (batches and shards of the
plan), ``stream`` (the same, as rows arrive).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from actlightning.contracts import Batch, ExportPlan, PaddingSide
from actlightning.data.batching import (
    assign_shards,
    group_shards,
    padding_counts,
    plan_batches,
    rank_batches,
    remaining_shards,
)
from actlightning.data.checks import callable_name, check_data_settings, resolve_max_length
from actlightning.data.collate import PlannedBatches, collate_rows, search_batch_size
from actlightning.data.selection import Selection, SelectionSettings, select_split
from actlightning.data.source import Source, load_split
from actlightning.data.stream import StreamBatching, StreamingBatches, StreamSource
from actlightning.data.tokens import (
    TOKENS,
    TokenTable,
    load_tokenizer,
    token_column_of_pretokenized,
    token_lengths,
    tokenize_dataset,
)

log = logging.getLogger(__name__)

# Settings that change how an export runs, not what it holds: they may differ on resume.
RUN_ONLY = frozenset(
    {"batch_size", "max_tokens", "auto_find_batch_size", "padding_side", "num_workers", "num_proc", "tokenizer",
     "tokenizer_revision"}
)  # fmt: skip


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
        # Every setting is kept in self.hparams (Lightning's record of the init arguments), read where used.
        self.save_hyperparameters()
        check_data_settings(self.hparams)
        self.store: TokenTable | None = None
        self.labels: pa.Table | None = None
        self.plan: ExportPlan | None = None
        self.pad_id = 0
        self._stream: Any = None
        self._tokenizer_loaded: Any = None
        self._pretokenized = False
        self._probe: Callable[[Batch], bool] | None = None

    @property
    def hparams(self) -> AttributeDict:
        """The settings (Lightning's record of the init arguments), attribute access typed."""
        return cast(AttributeDict, super().hparams)

    @property
    def source(self) -> Source:
        h = self.hparams
        return Source(h.path, h.name, h.split, h.data_files, h.revision, h.input_column, list(h.label_columns or []))

    def export_settings(self) -> dict:
        """Settings that decide which examples an export holds, their tokens and their grouping."""
        settings = {k: v for k, v in self.hparams.items() if k not in RUN_ONLY}
        return {**settings, "label_columns": self.source.label_columns, "filter": callable_name(self.hparams.filter)}

    def _tokenizer(self):
        """The model's tokenizer, loaded once (the cache, the selection and the stream all need it)."""
        if self._tokenizer_loaded is None:
            self._tokenizer_loaded = load_tokenizer(self.hparams.tokenizer, self.hparams.tokenizer_revision)
            if self._tokenizer_loaded.pad_token_id is not None:
                self.pad_id = self._tokenizer_loaded.pad_token_id
        return self._tokenizer_loaded

    def setup(self, stage: str) -> None:
        # The work is done before the Trainer runs: plan_export tokenizes into the on-disk cache (under a
        # file lock, so several processes tokenize once), selects and plans.
        if self.plan is None:
            raise RuntimeError("plan_export() must run before the Trainer (the CLI runs it)")

    def plan_export(
        self,
        plan: ExportPlan,
        model_context: int | None,
        probe: Callable[[Batch], bool],
        batches_per_shard: int,
        max_shards: int | None,
    ) -> None:
        """Select the examples and plan the whole export's batches and shards into ``plan``.

        ``model_context`` bounds ``max_length`` (and is its default); ``probe`` runs the model on a batch
        for the batch-size search; shards group ``batches_per_shard`` batches, at most ``max_shards``.
        """
        self.plan, self._probe = plan, probe
        self._grouping = (batches_per_shard, max_shards)
        settings = self._selection_settings(model_context)
        if self.hparams.streaming:
            self._stream = StreamSource(self.source, settings, plan, self._tokenizer)
            log.info("dataset %s: streaming (examples and tokens are counted as they arrive)", self.hparams.path)
            return
        dataset = load_split(self.source)
        self._pretokenized = self.source.check_columns(dataset.data.schema)
        self.store, self.labels = select_split(dataset, self.source, Selection(settings, plan.data, True), self._tokens)
        plan.label_features = {c: dataset.features[c] for c in self.source.label_columns}
        plan.lengths = self.store.lengths
        self._plan_shards(plan)

    def _tokens(self, dataset: Dataset) -> tuple[pa.ChunkedArray, np.ndarray]:
        """Every loaded row's tokens (a memory-mapped Arrow column) and token counts."""
        if self._pretokenized:
            return token_column_of_pretokenized(dataset, self.hparams.input_column)
        tokenized = tokenize_dataset(dataset, self.hparams.input_column, self._tokenizer(), self.hparams.num_proc)
        return tokenized.data.column(TOKENS), token_lengths(tokenized)

    def _selection_settings(self, model_context: int | None) -> SelectionSettings:
        h = self.hparams
        max_length = resolve_max_length(h.max_length, model_context)
        return SelectionSettings(
            h.filter, h.dedupe, h.drop_prefixes, h.min_tokens, h.max_tokens_per_sequence, h.shuffle_seed, h.limit,
            max_length,
        )  # fmt: skip

    def _batching(self) -> tuple[int, int | None]:
        """``batch_size`` and ``max_tokens``, as the batch-size search left them."""
        found = cast(ExportPlan, self.plan).data.found
        return found.get("batch_size", self.hparams.batch_size), found.get("max_tokens", self.hparams.max_tokens)

    def _plan_shards(self, plan: ExportPlan) -> None:
        """Every batch of the whole selection, grouped into shards; identical on every rank."""
        lengths = cast(np.ndarray, plan.lengths)
        h = self.hparams
        batch_size, max_tokens = self._batching()
        batches = plan_batches(
            lengths, batch_size, max_tokens, h.sort_by_length, h.sort_reversed, h.bucket_size, h.batch_order_seed
        )
        plan.shards = group_shards(batches, *self._grouping)
        plan.data.real_tokens, plan.data.padded_tokens = padding_counts((b for s in plan.shards for b in s), lengths)

    def _search_batch_size(self, trainer: Trainer) -> None:
        """Probe the longest batch of the run on the device, halving the size until it fits; replan."""
        device = trainer.strategy.root_device
        if not batch_size_search_applies(device):
            log.info("data.auto_find_batch_size does not apply on %s; using the configured size", device)
            return
        store, plan = cast(TokenTable, self.store), cast(ExportPlan, self.plan)
        batch_size, max_tokens = self._batching()
        probe = cast(Callable[[Batch], bool], self._probe)
        found = search_batch_size(store, batch_size, max_tokens, probe, self.pad_id, self.hparams.padding_side)
        # Every rank must plan the same batches: take the smallest size any rank found.
        found = int(trainer.strategy.all_gather(torch.tensor(found, device=device)).min())
        name = "max_tokens" if max_tokens is not None else "batch_size"
        plan.data.found[name] = found
        log.info("data.auto_find_batch_size: using %s=%d", name, found)
        self._plan_shards(plan)

    def predict_dataloader(self) -> DataLoader:
        trainer, plan = self.trainer, cast(ExportPlan, self.plan)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.hparams.streaming:
            plan.data.planned_tokens_this_rank = 0  # unknown: the progress bar shows no total
            h, (batch_size, max_tokens) = self.hparams, self._batching()
            batching = StreamBatching(batch_size, max_tokens, h.bucket_size, h.sort_reversed, *self._grouping)
            batches = StreamingBatches(
                partial(self._stream.shards, batching), plan.taken_shard_indices, rank, world_size, self.pad_id,
                h.padding_side,
            )  # fmt: skip
            return DataLoader(batches, batch_size=None, num_workers=0)
        if self.hparams.auto_find_batch_size and trainer is not None:
            self._search_batch_size(trainer)
        store = cast(TokenTable, self.store)
        shards, shard_ids = remaining_shards(
            cast(list, plan.shards), store.example_ids, plan.done_example_ids, plan.taken_shard_indices
        )
        lengths = store.lengths
        shard_tokens = [int(sum(lengths[b].sum() for b in shard)) for shard in shards]
        owned = assign_shards(shard_tokens, world_size)[rank]
        planned = rank_batches(shards, shard_ids, owned)
        plan.data.planned_shards = len(shards)
        plan.data.planned_tokens_this_rank = int(sum(lengths[b.positions].sum() for b in planned))
        log.info("plan: %d shards to write (%d on this rank)", len(shards), len(owned))
        return DataLoader(
            PlannedBatches(planned),
            batch_size=None,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(
                collate_rows, store, self.labels, pad_id=self.pad_id, padding_side=self.hparams.padding_side
            ),
        )
