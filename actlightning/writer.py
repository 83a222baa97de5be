"""The prediction-writer callback: turns predicted batches into Parquet shards and keeps the manifest."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from actlightning.card import render_card
from actlightning.cost import bytes_per_token, exported_tokens
from actlightning.errors import ConfigError, require_positive
from actlightning.humanize import human_bytes, plural
from actlightning.manifest import CARD, CONFIG, MANIFEST, build_manifest, manifest_bytes, read_manifest, shard_names
from actlightning.outputdir import ExportState, clean_output_dir, inspect_output_dir
from actlightning.schema import EXAMPLE_ID, Layout, batch_to_table, build_features, build_schema, check_finite
from actlightning.shards import Compression, ShardInfo, ShardWriterPool, VectorEncoder, parquet_options
from actlightning.storage import Location, nearest_existing, open_location

if TYPE_CHECKING:
    from actlightning.batching import Batch
    from actlightning.data import ActivationDataModule
    from actlightning.module import ActivationModule, Prediction

log = logging.getLogger(__name__)
REMOTE_MANIFEST_SECONDS = 30.0


def datamodule_of(trainer: Trainer) -> ActivationDataModule:
    """The trainer's data module (an attribute Lightning sets at run time)."""
    return trainer.datamodule  # type: ignore[attr-defined]


def summary_text(manifest: dict, shards_this_run: int) -> str:
    """The end-of-run summary: the same numbers as ``manifest.json``.

    Examples are sequences; rows are examples in the sequence layout and tokens in the token layout.
    The forward pass runs every token of a sequence, the export keeps ``n_pos`` of them: both rates
    are given, each named.
    """
    totals, run, data = manifest["totals"], manifest.get("run", {}), manifest.get("data", {})
    layout = manifest.get("settings", {}).get("layout", "sequence")
    efficiency = data.get("padding_efficiency")
    return (
        f"export complete: {plural(totals.get('examples', totals['rows']), 'example')}, "
        f"{plural(totals['tokens'], 'token')} exported in {plural(totals['rows'], 'row')} ({layout} layout), "
        f"{plural(totals['shards'], 'shard')}, {human_bytes(totals['bytes'])}. "
        f"This run: {plural(shards_this_run, 'shard')} in {run.get('seconds', 0):.1f} s; "
        f"forward pass {run.get('forward_tokens', 0):,} tokens at "
        f"{run.get('forward_tokens_per_second', 0):,.0f} tokens/s, "
        f"exported {run.get('exported_tokens', 0):,} tokens at "
        f"{run.get('exported_tokens_per_second', 0):,.0f} tokens/s; "
        f"padding efficiency {'n/a' if efficiency is None else f'{efficiency:.3f}'}; "
        f"rows removed by each step: {data.get('removed', {})}"
    )


def _log_loading(loading: dict) -> None:
    log.info(
        "plan: loading %d of %s (%s of %s parameters, %s of %s as %s)%s",
        loading["blocks_loaded"],
        plural(loading["blocks"], "block"),
        f"{loading['parameters_loaded']:,}",
        f"{loading['parameters']:,}",
        human_bytes(loading["weight_bytes_loaded"]),
        human_bytes(loading["weight_bytes"]),
        loading["dtype"],
        "" if loading["blocks_loaded"] < loading["blocks"] else ": the export needs the full forward",
    )


def interrupted_text(location: Location, shards_this_run: int) -> str:
    """What Ctrl-C leaves behind, and how to go on."""
    complete = len(shard_names(location))
    return (
        f"interrupted: {plural(complete, 'complete shard')} in {location.url} ({shards_this_run} from this run); "
        "the shard being written was discarded. Rerun the same command to resume where it stopped."
    )


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
        super().__init__(write_interval="batch")
        require_positive("writer.batches_per_shard", batches_per_shard)
        require_positive("writer.max_shards", max_shards, allow_unset=True)
        if compression_level is not None and compression != "zstd":
            raise ConfigError(
                f"writer.compression_level is set ({compression_level}) but writer.compression is {compression!r}; "
                "a level applies to zstd only"
            )
        if compression_level is not None and not 1 <= compression_level <= 22:
            raise ConfigError(f"writer.compression_level must be 1..22 for zstd, got {compression_level}")
        require_positive("writer.max_pending_batches", max_pending_batches)
        require_positive("writer.writer_threads", writer_threads)
        require_positive("writer.shuffle_buffer", shuffle_buffer, allow_unset=True)
        if shuffle_buffer is not None and layout != "token":
            raise ConfigError("writer.shuffle_buffer shuffles token rows: it needs writer.layout: token")
        self.location = open_location(output_dir, storage_options, staging_dir)
        self.output_dir = self.location.url
        self.batches_per_shard = batches_per_shard
        self.max_shards = max_shards
        self.overwrite = overwrite
        self.compression = compression
        self.compression_level = compression_level
        self.max_pending_batches = max_pending_batches
        self.writer_threads = writer_threads
        self.layout = layout
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_seed = shuffle_seed
        self.vector_encoder = vector_encoder
        self.dry_run = dry_run
        self.ignore_free_space = ignore_free_space
        self.tokens_submitted = 0
        self.tokens_exported = 0
        self.bytes_done = 0
        self.shards_done = 0
        # Set by the CLI: the resolved config, saved as config.yaml next to the shards.
        self.config_yaml: str | None = None
        # Set by plan_export: the cost estimate, also kept in manifest.json.
        self.plan: dict | None = None
        self._writer: ShardWriterPool | None = None
        self._known: dict[str, ShardInfo] = {}

    def export_settings(
        self, trainer: Trainer, pl_module: ActivationModule, datamodule: ActivationDataModule | None = None
    ) -> dict:
        """Settings that define an export: resuming under different ones would mix two exports."""
        datamodule = datamodule if datamodule is not None else datamodule_of(trainer)
        return {
            "model": pl_module.export_settings(),
            "data": datamodule.export_settings(),
            "max_shards": self.max_shards,
            "layout": self.layout,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_seed": self.shuffle_seed if self.shuffle_buffer else None,
        }

    def plan_export(self, pl_module: ActivationModule, datamodule: ActivationDataModule) -> dict:
        """What the export will cost, from the loaded and filtered data (no forward pass); a streaming
        export knows only its cost per token.

        Raises ``ConfigError`` when the estimate exceeds the free space (unless ``ignore_free_space``).
        """
        datamodule.setup("predict")
        datamodule.configure_sharding(self.batches_per_shard, self.max_shards)
        widths = pl_module.estimated_widths()
        per_token = bytes_per_token(widths, pl_module.storage_dtype, self.layout)
        measured = self.location.free_space()
        if measured is None:  # a URL: what lands locally is the staged shards
            staging = self.location.staging_dir(0)
            free, probe = (
                shutil.disk_usage(nearest_existing(staging)).free,
                f"{staging} (staging for {self.output_dir})",
            )
        else:
            free, probe = measured
        plan: dict[str, Any] = {
            "examples": None,
            "tokens": None,
            "columns": widths,
            "bytes_per_token": per_token,
            "estimated_bytes": None,
            "estimated_shards": None,
            "already_written_bytes": 0,
            "free_bytes": free,
            "model": pl_module.load_plan(),
        }
        self.plan = plan
        columns = f"{plural(len(widths), 'vector column')} ({', '.join(widths)})"
        if datamodule.hparams.streaming:
            log.info(
                "plan: streaming, so examples, tokens and size are counted as they come; %s, %s per token as %s "
                "(%s per million tokens); %s free at %s",
                columns, plural(per_token, "byte"), pl_module.storage_dtype, human_bytes(per_token * 1_000_000),
                human_bytes(free), probe,
            )  # fmt: skip
            _log_loading(plan["model"])
            return plan
        shards, _ = datamodule.plan()
        store = datamodule.store
        assert store is not None, "setup() has run"
        # Batch by batch: a list of every batch's positions would cost ~15 bytes a row more at the peak.
        examples = tokens = 0
        for shard in shards:
            for batch in shard:
                examples += len(batch)
                tokens += int(exported_tokens(store.lengths[batch], pl_module.n_pos).sum())
        existing = read_manifest(self.location)
        plan.update(
            examples=examples,
            tokens=tokens,
            estimated_bytes=tokens * per_token,
            estimated_shards=len(shards),
            already_written_bytes=existing["totals"]["bytes"] if existing and not self.overwrite else 0,
        )
        estimate, already = plan["estimated_bytes"], plan["already_written_bytes"]
        log.info(
            "plan: %s, %s to export, %s, %s per token as %s -> about %s in %s; %s already written; %s free at %s",
            plural(plan["examples"], "example"), plural(plan["tokens"], "token"), columns, plural(per_token, "byte"),
            pl_module.storage_dtype, human_bytes(estimate), plural(len(shards), "shard"), human_bytes(already),
            human_bytes(free), probe,
        )  # fmt: skip
        _log_loading(plan["model"])
        if measured is not None and estimate - already > free and not self.ignore_free_space:
            raise ConfigError(
                f"the export needs about {human_bytes(estimate - already)} but {probe} has {human_bytes(free)} free; "
                "free space, export less (model.layers, model.n_pos, data.limit, writer.max_shards), "
                "or set writer.ignore_free_space: true"
            )
        # A URL: the bucket's space is not known; the staging folder holds one shard per writer thread.
        staged = self.writer_threads * max(estimate // max(len(shards), 1), per_token) if shards else 0
        if measured is None and staged > free and not self.ignore_free_space:
            raise ConfigError(
                f"writer.staging_dir: {plural(self.writer_threads, 'shard')} of about "
                f"{human_bytes(staged // self.writer_threads)} are staged at once before upload, but {probe} has "
                f"{human_bytes(free)} free; set writer.staging_dir to a larger local disk, lower "
                "writer.batches_per_shard or writer.writer_threads, or set writer.ignore_free_space: true"
            )
        return plan

    def inspect_output_dir(self, settings: dict) -> ExportState:
        """What ``output_dir`` holds (see ``outputdir.inspect_output_dir``)."""
        return inspect_output_dir(self.location, settings, self.overwrite)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._lock = threading.Lock()
        self._manifest_written = 0.0
        datamodule = self._datamodule = datamodule_of(trainer)
        module = cast("ActivationModule", pl_module)
        self.settings = self.export_settings(trainer, module)
        state = self.inspect_output_dir(self.settings)
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
        # Footers and example ids of the complete shards, several at a time: from a bucket each is a
        # round trip, and a resume of thousands of shards would otherwise wait on them one by one.
        with ThreadPoolExecutor(max_workers=16) as pool:
            read = list(pool.map(self._read_shard, names))
        existing = [info for info, _ in read]
        self._known = {info.file: info for info in existing}
        done_ids = None
        if existing:
            done_ids = np.concatenate([ids for _, ids in read])
            log.info("resuming: %d complete shards hold %d examples", len(existing), len(done_ids))
        datamodule.configure_sharding(
            self.batches_per_shard, self.max_shards, done_ids, {i.shard_index for i in existing}
        )
        self.storage_dtype = module.storage_dtype
        self.vector_columns = module.vector_columns
        # Built from the first batch: a hook point's vector width is only known from its output.
        self.schema: pa.Schema | None = None
        if trainer.is_global_zero:
            if self.config_yaml is not None:
                self.location.write_text(CONFIG, self.config_yaml)
            self._write_manifest(complete=False)

    def _read_shard(self, name: str) -> tuple[ShardInfo, np.ndarray]:
        """A complete shard's footer and its example ids (one column: a URL fetches only its chunks)."""
        with self.location.open(name) as handle:  # one open: the footer is read once
            parquet = pq.ParquetFile(handle)
            ids = parquet.read(columns=[EXAMPLE_ID]).column(0).to_numpy()
            size = handle.seek(0, os.SEEK_END)
        return ShardInfo.from_footer(name, parquet.metadata, size), ids

    def _write_manifest(self, complete: bool, extra: dict | None = None) -> dict:
        with self._lock:
            # Shards finished by other ranks are picked up from the listing; footers are read once.
            for name in shard_names(self.location):
                if name not in self._known:
                    self._known[name] = ShardInfo.read(self.location, name)
            planned = {"plan": self.plan} if self.plan is not None else {}
            extra = {"data": self._datamodule.summary(), **planned, **(extra or {})}
            manifest = build_manifest(self.settings, self._known.values(), complete, extra)
            self.location.write_bytes(MANIFEST, manifest_bytes(manifest))
            self._manifest_written = time.monotonic()
            return manifest

    def _on_shard_done(self, info: ShardInfo) -> None:
        self._known[info.file] = info
        self.shards_done += 1
        self.bytes_done += info.bytes
        # In a bucket the manifest is one PUT of the whole shard list (and a listing): at most every
        # REMOTE_MANIFEST_SECONDS while running, always at the end. A resume reads the listing, not it.
        if self.location.remote and time.monotonic() - self._manifest_written < REMOTE_MANIFEST_SECONDS:
            return
        self._write_manifest(complete=False)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()
        self.tokens_submitted = self.tokens_exported = self.bytes_done = self.shards_done = 0
        self._writer = None
        self._finished: list[ShardInfo] = []

    def _start_writers(self, trainer: Trainer, prediction: Prediction) -> ShardWriterPool:
        widths = {column: prediction.vectors[column].shape[1] for column in self.vector_columns}
        features = build_features(widths, self.storage_dtype, self._datamodule.label_features, self.layout)
        self.schema = build_schema(features, self.storage_dtype)
        self.options = parquet_options(self.schema, self.compression, self.vector_columns, self.compression_level)
        return ShardWriterPool(
            self.writer_threads,
            folder=self._staging,
            location=self.location,
            rank=trainer.global_rank,
            schema=self.schema,
            options=self.options,
            encode=self._encode,
            max_pending=self.max_pending_batches,
            on_shard_done=self._on_shard_done,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_seed=self.shuffle_seed,
            vector_encoder=self.vector_encoder,
        )

    def _encode(self, item: tuple[Prediction, pa.Table | None]) -> tuple[pa.Table, int, int]:
        """On a writer thread: wait for the device copy, refuse NaN/overflow, build the Arrow table."""
        prediction, labels = item
        if prediction.ready is not None:
            prediction.ready.synchronize()
        check_finite(prediction, self.storage_dtype)
        table = batch_to_table(prediction, self.schema, labels, self.layout)
        return table, int(prediction.n_tokens.sum()), len(prediction.n_tokens)

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
        labels = batch.labels
        if labels is None and self._datamodule.label_columns:
            labels = self._datamodule.label_rows(batch.host_example_id)
        self.tokens_submitted += batch.host_tokens
        self._writer.submit(prediction.shard_index, (prediction, labels), prediction.last_in_shard)

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
            seconds = max(elapsed, 1e-9)
            run = {
                "seconds": round(elapsed, 3),
                "forward_tokens": forward,
                "forward_tokens_per_second": round(forward / seconds, 1),
                "exported_tokens": exported,
                "exported_tokens_per_second": round(exported / seconds, 1),
                "shards": shards,
            }
            manifest = self._write_manifest(complete=True, extra={"run": run})
            self._write_card(manifest)
            log.info(summary_text(manifest, shards))

    def _write_card(self, manifest: dict) -> None:
        names = sorted(self._known)
        if names:
            with self.location.open(names[0]) as handle:
                schema = pq.read_schema(handle)
            self.location.write_text(CARD, render_card(manifest, schema, self.location.url, self.location.remote))

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
