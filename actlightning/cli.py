"""The command line: ``python -m actlightning predict --config configs/X.yaml [--section.key value ...]``."""

from __future__ import annotations

import difflib
import logging
import re
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from actlightning.data import ActivationDataModule
from actlightning.errors import ConfigError, ExportError
from actlightning.loading import context_size
from actlightning.module import ActivationModule
from actlightning.progress import TokenProgressBar
from actlightning.storage import redact
from actlightning.writer import ParquetShardWriter

log = logging.getLogger("actlightning")

DESCRIPTION = (
    "Export the hidden states of a HuggingFace causal language model, run over a HuggingFace dataset, "
    "to sharded Parquet. Every setting can come from a YAML config (--config) and be overridden here."
)
PREDICT_DESCRIPTION = "Run the export: load the data and the model, and write activations to writer.output_dir."

# The Trainer flags that mean something to an export; the rest (epochs, optimisation, validation,
# gradient clipping, ...) are training-only and would only clutter --help.
TRAINER_FLAGS = (
    "accelerator",
    "strategy",
    "devices",
    "num_nodes",
    "precision",
    "callbacks",
    "plugins",
    "enable_progress_bar",
    "inference_mode",
    "deterministic",
    "benchmark",
    "profiler",
    "default_root_dir",
)
# Fixed for every export: it trains nothing (no loggers, no checkpoints), and the data module gives
# each rank its own shards (a distributed sampler would split them again).
TRAINER_FIXED = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "use_distributed_sampler": False,
}

# Lines that other libraries print on every run and that say nothing about an export.
_NOISY_INFO = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(_NOISY_INFO)


def quiet_third_party() -> None:
    """Silence what other libraries print on every run and is not about the export.

    Only named messages are dropped (no blanket category filters), so real warnings still show.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    # The data module's batches carry their own bookkeeping; Lightning's batch-index tracking is not needed.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    # Lightning 2.6 uses torch's deprecated LeafSpec internally; nothing a user can change.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # transformers' "Loading weights" bar: the plan and the export's own bar say what is happening.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def inspect_trainer_parameters() -> list[str]:
    import inspect

    return [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]


class _RankFilter(logging.Filter):
    """Adds ``rank`` to log records, so lines from several processes can be told apart."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        record.rank = getattr(rank_zero_only, "rank", 0)
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time, so that in-process runs (tests, notebooks)
    that redirect it see the logs."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LogFileHandler(logging.FileHandler):
    """The ``--log_file`` handler; one run's file is closed and dropped when the next run starts."""


def configure_logging(log_file: str | Path | None) -> None:
    """INFO logs of this package to stderr, and with ``log_file`` also Lightning's, to that file."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        stream = _StderrHandler()
        stream.setFormatter(formatter)
        stream.addFilter(_RankFilter())
        log.addHandler(stream)
    names = ("actlightning", "lightning.pytorch", "lightning.fabric")
    for name in names:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _LogFileHandler)]:
            logger.removeHandler(handler)
            handler.close()
    if log_file is not None:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = _LogFileHandler(log_file)
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter())
        for name in names:
            logging.getLogger(name).addHandler(handler)


class ActLightningCLI(LightningCLI):
    """LightningCLI with four sections: ``model``, ``data``, ``writer`` (forced callback) and ``trainer``."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        quiet_third_party()
        parser = {"prog": "actlightning", "exit_on_error": False}
        super().__init__(
            ActivationModule,
            ActivationDataModule,
            save_config_callback=None,
            seed_everything_default=False,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            parser_kwargs={
                **parser,
                "description": DESCRIPTION,
                "predict": {**parser, "description": PREDICT_DESCRIPTION},
            },
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
            keys = sorted({o[2:] for p in parsers for o in p._option_string_actions if o.startswith("--")})
            raise ConfigError(_argument_error_line(str(error), keys)) from None

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # No --seed_everything: an export draws no random numbers but its own seeded ones.
        pass

    def _set_seed(self) -> None:
        pass

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        skip = set(inspect_trainer_parameters()) - set(TRAINER_FLAGS)
        parser.add_class_arguments(
            Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=skip
        )
        parser.add_lightning_class_args(ActivationModule, "model")
        parser.add_lightning_class_args(ActivationDataModule, "data")

    def instantiate_trainer(self, **kwargs):
        kwargs.update(TRAINER_FIXED)
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
        # weights_only and ckpt_path load Lightning checkpoints, which an export never uses.
        return {"predict": {"model", "dataloaders", "datamodule", "return_predictions", "ckpt_path", "weights_only"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ParquetShardWriter, "writer", required=True)
        parser.link_arguments("model.checkpoint", "data.tokenizer")
        parser.link_arguments("model.revision", "data.tokenizer_revision")
        parser.add_argument("--log_file", type=str | None, default=None, help="Also write logs to this file.")

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
        datamodule.probe = model.probe
        # Tokenize once into the on-disk cache (a lock lets one of several processes do it), then plan.
        datamodule.prepare_data()
        writer.plan_export(model, datamodule)
        if writer.dry_run:
            log.info("writer.dry_run: stopping before the export; nothing was written")
            return
        parser = self._parser(self.subcommand)
        config = self.config.get(str(self.subcommand), self.config).clone()
        # Credentials stay out of config.yaml: storage_options keep their keys, never their values.
        config["writer.storage_options"] = redact(config.get("writer.storage_options"))
        if writer.location.remote:  # without a password the URL may have held
            config["writer.output_dir"] = writer.output_dir
        writer.config_yaml = parser.dump(config, skip_unset=False)
        self.trainer.predict(model, datamodule=datamodule, return_predictions=False)


def _argument_error_line(message: str, keys: list[str]) -> str:
    """jsonargparse's error as one line; a mistyped key names the closest of ``keys``."""
    unknown = re.findall(r"--([\w.]+)", message) if "nrecognized arguments" in message else []
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hints.append(f"--{key} (did you mean --{close[0]}?)" if close else f"--{key}")
        return f"unrecognized setting {', '.join(hints)}; `actlightning predict --help` lists every setting"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else "invalid arguments"


def main(args: ArgsType = None) -> None:
    """Entry point of ``python -m actlightning`` and the ``actlightning`` script.

    A mistake in the settings or the inputs ends with one line naming the setting and exit code 2,
    like jsonargparse's own errors; NaN/overflow and write errors with exit code 1; Ctrl-C with one
    line and exit code 130. Anything else keeps its traceback.
    """
    quiet_third_party()
    try:
        ActLightningCLI(args=args)
    except (ConfigError, ExportError) as error:
        print(f"actlightning: error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    except KeyboardInterrupt:
        print("actlightning: interrupted before the export started; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
