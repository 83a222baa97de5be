"""The command line: ``python -m actlightning predict --config configs/X.yaml [--section.key value ...]``."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from actlightning.data import ActivationDataModule
from actlightning.errors import ActivationError, ConfigError
from actlightning.module import ActivationModule, context_size
from actlightning.progress import TokenProgressBar
from actlightning.writer import ParquetShardWriter

log = logging.getLogger("actlightning")

# The data module's batches carry their own bookkeeping; Lightning's batch-index tracking is not needed.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")

TRAINER_DEFAULTS = {
    # An export trains nothing: no loggers, no checkpoints.
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    # The data module gives each rank its own shards; a distributed sampler would split them again.
    "use_distributed_sampler": False,
}


class _RankFilter(logging.Filter):
    """Adds ``rank`` to log records, so lines from several processes can be told apart."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        record.rank = getattr(rank_zero_only, "rank", 0)
        return True


def configure_logging(log_file: Path | None) -> None:
    """INFO logs of this package to stderr, and with ``log_file`` also Lightning's, to that file."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in log.handlers):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        stream.addFilter(_RankFilter())
        log.addHandler(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter())
        for name in ("actlightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).addHandler(handler)


class ActLightningCLI(LightningCLI):
    """LightningCLI with four sections: ``model``, ``data``, ``writer`` (forced callback) and ``trainer``."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        super().__init__(
            ActivationModule,
            ActivationDataModule,
            save_config_callback=None,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=False,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            args=args,
            run=run,
        )

    def instantiate_trainer(self, **kwargs):
        # A progress bar counted in tokens, unless the progress bar is switched off.
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("enable_progress_bar", True) is not False:
            callbacks = list(trainer_config.get("callbacks") or [])
            if not any(isinstance(c, TokenProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, TokenProgressBar()]
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # return_predictions is not offered: Lightning would keep every batch in memory.
        return {"predict": {"model", "dataloaders", "datamodule", "return_predictions", "ckpt_path"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ParquetShardWriter, "writer", required=True)
        parser.link_arguments("model.checkpoint", "data.tokenizer")
        parser.link_arguments("model.revision", "data.tokenizer_revision")
        parser.add_argument("--log_file", type=Path | None, default=None, help="Also write logs to this file.")

    def before_instantiate_classes(self) -> None:
        configure_logging(self._get(self.config, "log_file"))

    def predict(self, model: ActivationModule, datamodule: ActivationDataModule, **_: object) -> None:
        writer: ParquetShardWriter = self._get(self.config_init, "writer")
        model.check_settings()
        settings = writer.export_settings(self.trainer, model, datamodule)
        # Checked before any data loads or weights: a finished export is not recomputed.
        if writer.inspect_output_dir(settings) == "complete":
            log.info("the export in %s is already complete; nothing to do", writer.output_dir)
            return
        datamodule.model_context = context_size(model.config)
        writer.plan_export(model, datamodule)
        if writer.dry_run:
            log.info("writer.dry_run: stopping before the export; nothing was written")
            return
        parser = self._parser(self.subcommand)
        writer.config_yaml = parser.dump(self.config.get(str(self.subcommand), self.config), skip_none=False)
        self.trainer.predict(model, datamodule=datamodule, return_predictions=False)


def main(args: ArgsType = None) -> None:
    """Entry point of ``python -m actlightning`` and the ``actlightning`` script.

    A mistake in the settings or the inputs ends with one line naming the setting and exit code 2,
    like jsonargparse's own errors; anything else keeps its traceback.
    """
    try:
        ActLightningCLI(args=args)
    except (ConfigError, ActivationError) as error:
        print(f"actlightning: error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)


if __name__ == "__main__":
    main()
