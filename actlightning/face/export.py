"""The one place the stages meet: the export's plan is built here from the model and the data module,
and handed to the writer, before the Trainer runs."""

from __future__ import annotations

import logging

from actlightning.contracts import ExportPlan
from actlightning.data.module import ActivationDataModule
from actlightning.face import clock
from actlightning.model.module import ActivationModule
from actlightning.pretrained import context_size
from actlightning.writer.callback import ParquetShardWriter

log = logging.getLogger("actlightning")


def export_settings(model: ActivationModule, data: ActivationDataModule, writer: ParquetShardWriter) -> dict:
    """What defines an export: resuming under different settings would mix two exports."""
    return {"model": model.export_settings(), "data": data.export_settings(), **writer.export_settings()}


def plan_export(
    model: ActivationModule,
    data: ActivationDataModule,
    writer: ParquetShardWriter,
    config_yaml: str | None = None,
    load_early: bool = False,
) -> ExportPlan | None:
    """The export's plan, held by the data module and the writer; None when ``writer.output_dir``
    already holds this export complete (checked before any data loads or weights: a finished export
    is not recomputed).

    Nothing here runs the model: its settings, widths and loading cost come from its config and a
    skeleton on the meta device. The data is tokenized once into the on-disk cache, selected and
    planned; then the writer estimates the size and checks the free space. ``load_early``: the weights
    start loading on a thread now, while the data side plans (the first batch comes sooner).
    """
    model.check_settings()
    settings = export_settings(model, data, writer)
    if writer.inspect_output_dir(settings) == "complete":
        log.info("the export in %s is already complete; nothing to do", writer.output_dir)
        return None
    if load_early and not writer.hparams.dry_run:
        model.start_loading()
    plan = ExportPlan(
        settings=settings,
        vector_columns=model.vector_columns,
        widths=model.estimated_widths(),
        storage_dtype=model.storage_dtype,
        n_pos=model.hparams.n_pos,
        label_features={},
        model_loading=model.load_plan(),
        config_yaml=config_yaml,
        process_started=clock.STARTED,
    )
    data.plan_export(
        plan, context_size(model.config), model.probe, writer.hparams.batches_per_shard, writer.hparams.max_shards
    )
    writer.take_plan(plan)
    return plan
