"""The prediction-writer callback: turns predicted batches into Parquet shards and keeps the manifest.

It is handed the export's plan (``ExportPlan``) before the Trainer runs; everything it knows of the
data and the model comes from there and from the batches it is given.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from actlightning.contracts import Batch, ExportPlan, Layout, Prediction
from actlightning.files.manifest import CONFIG, shard_names
from actlightning.files.schema import build_features, build_schema
from actlightning.files.shard_file import Compression, ShardInfo, VectorEncoder, parquet_options
from actlightning.files.storage import Location, open_location
from actlightning.files.tables import batch_to_table, check_finite
from actlightning.writer.ledger import Ledger
from actlightning.writer.outputdir import ExportState, clean_output_dir, inspect_output_dir
from actlightning.writer.planning import check_room, estimate
from actlightning.writer.resume import complete_shards
from actlightning.writer.settings import DEFINING, check_writer_settings
from actlightning.writer.summary import interrupted_text, run_numbers, summary_text
from actlightning.writer.threads import Encoded, ShardWriterPool

log = logging.getLogger(__name__)


class ParquetShardWriter(BasePredictionWriter):
    """Buffers predicted batches into Parquet shards in ``output_dir``.

    Args:
        output_dir: Folder for the shards, ``manifest.json``, ``config.yaml`` and the card: a local path,
            or a URL of any fsspec filesystem (``s3://bucket/prefix``, ``gs://...``; the ``s3`` extra
            installs s3fs). A URL's shards are written locally (``staging_dir``) and uploaded whole.
        storage_options: Options of the URL's filesystem, as ``datasets`` takes them (s3fs: ``endpoint_url``,
            ``key``, ``secret``, ``profile``, ``client_kwargs: {region_name: ...}``). Unset: the standard
            environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...). Their values are
            never saved (``config.yaml`` shows ``<redacted>``) nor logged.
        staging_dir: URL exports only: the local folder where each writer thread writes its shard before
            uploading it (at most ``writer_threads`` shards at a time; each is deleted once uploaded).
            Unset: the system's temporary folder.
        batches_per_shard: Batches written into each shard file.
        max_shards: Stop after exactly this many shards. Unset: export the whole dataset.
        overwrite: Start afresh in an ``output_dir`` holding another export (only files this tool wrote
            are deleted). Without it, a different export there is refused, and an unfinished export of
            the same settings is resumed.
        compression: Parquet compression codec: ``none``, ``zstd``, ``lz4`` (Parquet's LZ4_RAW) or
            ``snappy``. Vector pages are compressed one by one in the direct encoder (float32 values
            byte-stream-split first); what each saves and costs is in the README.
        compression_level: Codec level (zstd: 1-22, higher is smaller and slower). Unset: the codec's
            default (zstd 1).
        max_pending_batches: Batches queued for each writer thread before the forward pass waits for
            it; bounds host memory (at most ``writer_threads x max_pending_batches`` batches in flight).
        writer_threads: Threads encoding and writing shards in parallel (each shard is written whole
            by one thread). Raise it when writing, not the forward pass, is the bottleneck (fast GPUs).
        layout: ``sequence``: one row per sequence, vectors as ``[tokens, width]`` arrays (probing).
            ``token``: one row per token with ``example_id``, ``position``, ``token_id``, the labels and
            one fixed-length vector per column (SAE training).
        shuffle_buffer: Token layout only: shuffle token rows across this many batches (within a
            shard) before writing, so shards are ready for SAE training. Costs about this many batches
            of host memory, twice, while a buffer is permuted. Unset: rows in plan order.
        shuffle_seed: Seed of that shuffle (with the shard index: deterministic whatever the threads).
        vector_encoder: ``direct``: the vector columns' Parquet pages are written straight from their
            buffers (about 10x faster than Arrow, which encodes list values one by one); every other
            column, the schema and the metadata still come from pyarrow, and readers see the same data.
            ``arrow``: pyarrow's ``ParquetWriter`` writes everything (the reference, for comparison).
        dry_run: Print the plan (examples, tokens, bytes per token, estimated size and shards, free
            space) after loading and filtering the data, then stop: no forward pass, nothing written.
        ignore_free_space: Export even when the estimated size exceeds the free space of output_dir.
    """

    def __init__(
        self,
        output_dir: str | Path,
        storage_options: dict[str, Any] | None = None,
        staging_dir: str | None = None,
        batches_per_shard: int = 100,
        max_shards: int | None = None,
        overwrite: bool = False,
        compression: Compression = "none",
        compression_level: int | None = None,
        max_pending_batches: int = 4,
        writer_threads: int = 1,
        layout: Layout = "sequence",
        shuffle_buffer: int | None = None,
        shuffle_seed: int = 0,
        vector_encoder: VectorEncoder = "direct",
        dry_run: bool = False,
        ignore_free_space: bool = False,
    ) -> None:
        # Every setting is kept once, as given (read where used): the init arguments.
        self._settings = AttributeDict({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__(write_interval="batch")
        check_writer_settings(self.hparams)
        self.location: Location = open_location(output_dir, storage_options, staging_dir)
        self.tokens_submitted = self.tokens_exported = self.bytes_done = self.shards_done = 0
        self.plan: ExportPlan | None = None
        self.cost: dict | None = None
        self._writer: ShardWriterPool | None = None

    @property
    def hparams(self) -> AttributeDict:
        """The settings (the init arguments)."""
        return self._settings

    @property
    def output_dir(self) -> str:
        """The output folder or URL as it is printed and saved (a URL without its password)."""
        return self.location.url

    def export_settings(self) -> dict:
        """The writer's settings that define an export (the shuffle seed only when there is a shuffle)."""
        settings = {key: self.hparams[key] for key in DEFINING}
        return {**settings, "shuffle_seed": self.hparams.shuffle_seed if self.hparams.shuffle_buffer else None}

    def inspect_output_dir(self, settings: dict) -> ExportState:
        """What ``output_dir`` holds (see ``outputdir.inspect_output_dir``)."""
        return inspect_output_dir(self.location, settings, self.hparams.overwrite)

    def take_plan(self, plan: ExportPlan) -> dict:
        """Adopt the export's plan: estimate its cost (logged, kept in the manifest) and refuse it when
        the disk cannot hold it (unless ``ignore_free_space``)."""
        self.plan = plan
        self.cost = estimate(plan, self.location, self.hparams.layout, self.hparams.overwrite)
        if not self.hparams.ignore_free_space:
            check_room(self.cost, self.location, self.hparams.writer_threads)
        return self.cost

    def _plan(self) -> ExportPlan:
        if self.plan is None:
            raise RuntimeError("take_plan() must run before the Trainer (the CLI runs it)")
        return self.plan

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        plan = self._plan()
        state = self.inspect_output_dir(plan.settings)
        trainer.strategy.barrier("actlightning-inspected")
        if trainer.is_global_zero:
            clean_output_dir(self.location, state)
        trainer.strategy.barrier("actlightning-cleaned")
        # This rank's local folder for shards being written (the output folder itself, for a path).
        self._staging = self.location.staging_dir(trainer.global_rank)
        if self.location.remote:
            shutil.rmtree(self._staging, ignore_errors=True)  # what a killed run left
            self._staging.mkdir(parents=True, exist_ok=True)
        names = shard_names(self.location) if state in ("resume", "complete") else []
        existing, plan.done_example_ids = complete_shards(self.location, names)
        self._ledger = Ledger(self.location, plan, self.cost, existing)
        plan.taken_shard_indices = {info.shard_index for info in existing}
        # Built from the first batch: a hook point's vector width is only known from its output.
        self.schema: pa.Schema | None = None
        if trainer.is_global_zero:
            if plan.config_yaml is not None:
                self.location.write_text(CONFIG, plan.config_yaml)
            self._ledger.write_manifest(complete=False)

    def _on_shard_done(self, info: ShardInfo) -> None:
        """On a writer thread: a shard is complete (and published)."""
        self.shards_done += 1
        self.bytes_done += info.bytes
        self._ledger.shard_done(info)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()
        self._first_batch: float | None = None
        self.tokens_submitted = self.tokens_exported = self.bytes_done = self.shards_done = 0
        self._writer = None
        self._finished: list[ShardInfo] = []

    def _start_writers(self, trainer: Trainer, prediction: Prediction) -> ShardWriterPool:
        plan, h = self._plan(), self.hparams
        widths = {column: prediction.vectors[column].shape[1] for column in plan.vector_columns}
        features = build_features(widths, plan.storage_dtype, plan.label_features, h.layout)
        self.schema = build_schema(features, plan.storage_dtype)
        options = parquet_options(self.schema, h.compression, plan.vector_columns, h.compression_level)
        return ShardWriterPool(
            h.writer_threads,
            folder=self._staging,
            location=self.location,
            rank=trainer.global_rank,
            schema=self.schema,
            options=options,
            encode=self._encode,
            max_pending=h.max_pending_batches,
            on_shard_done=self._on_shard_done,
            shuffle_buffer=h.shuffle_buffer,
            shuffle_seed=h.shuffle_seed,
            vector_encoder=h.vector_encoder,
        )

    def _encode(self, item: tuple[Prediction, pa.Table | None]) -> Encoded:
        """On a writer thread: wait for the device copy, refuse NaN/overflow, build the Arrow table."""
        prediction, labels = item
        if prediction.ready is not None:
            prediction.ready.synchronize()
        check_finite(prediction, self._plan().storage_dtype)
        table = batch_to_table(prediction, self.schema, labels, self.hparams.layout)
        moments = {name: values.numpy() for name, values in prediction.moments.items()}
        return table, int(prediction.n_tokens.sum()), len(prediction.n_tokens), moments

    @override
    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._first_batch is None:
            self._first_batch = time.time()  # the first forward pass starts now

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Prediction,
        batch_indices: object,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._writer is None:
            self._writer = self._start_writers(trainer, prediction)
        self.tokens_submitted += batch.host_tokens
        self._writer.submit(prediction.shard_index, (prediction, batch.labels), prediction.last_in_shard)

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        # Every batch is in: finish the shards here, before on_predict_end, so that the progress bar
        # (closed in its on_predict_end) shows the final shard count.
        writer, self._writer = self._writer, None
        self._finished = writer.close() if writer is not None else []
        self._remove_staging()
        for info in self._finished:
            self.tokens_exported += info.tokens

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = time.perf_counter() - self._started
        # This run's numbers summed over ranks (also a barrier: every rank has finished its shards).
        mine = torch.tensor(
            [float(self.tokens_submitted), float(self.tokens_exported), float(len(self._finished))],
            device=trainer.strategy.root_device,
        )
        forward, exported, shards = (int(x) for x in trainer.strategy.reduce(mine, reduce_op="sum").tolist())
        if trainer.is_global_zero:
            run = run_numbers(elapsed, forward, exported, shards)
            started = self._plan().process_started
            if started is not None and self._first_batch is not None:
                run["seconds_to_first_batch"] = round(self._first_batch - started, 2)
            manifest = self._ledger.write_manifest(complete=True, extra={"run": run})
            self._ledger.write_card(manifest)
            log.info(summary_text(manifest, shards))

    def _remove_staging(self) -> None:
        if self.location.remote and getattr(self, "_staging", None) is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            with contextlib.suppress(OSError):  # other ranks' folders may still be there
                self._staging.parent.rmdir()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._remove_staging()
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            log.warning(interrupted_text(self.location, self.shards_done))
