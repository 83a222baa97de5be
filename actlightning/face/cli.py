"""The command line: ``python -m actlightning predict --config configs/X.yaml [--section.key value ...]``."""

from __future__ import annotations

import difflib
import logging
import re
import sys
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

from actlightning.data.module import ActivationDataModule
from actlightning.errors import ConfigError, ExportError
from actlightning.face.export import plan_export
from actlightning.face.logs import configure_logging, quiet_third_party
from actlightning.face.progress import TokenProgressBar
from actlightning.files.storage import redact
from actlightning.model.module import ActivationModule
from actlightning.writer.callback import ParquetShardWriter

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


def inspect_trainer_parameters() -> list[str]:
    import inspect

    return [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]


class ConfigText(SaveConfigCallback):
    """Lightning's seam for the resolved configuration (it is given the subcommand's parser and
    config): here it only renders them, credentials redacted, for config.yaml beside the shards."""

    def __init__(self, parser: LightningArgumentParser, config: Namespace, **kwargs: object) -> None:
        super().__init__(parser, config, save_to_log_dir=False)

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass  # the writer saves the text once its output folder is ready

    def text(self, output_dir: str, remote: bool) -> str:
        config = self.config.clone()
        # Credentials stay out of config.yaml: storage_options keep their keys, never their values.
        config["writer.storage_options"] = redact(config.get("writer.storage_options"))
        if remote:  # without a password the URL may have held
            config["writer.output_dir"] = output_dir
        return self.parser.dump(config, skip_unset=False)


class ActLightningCLI(LightningCLI):
    """LightningCLI with four sections: ``model``, ``data``, ``writer`` (forced callback) and ``trainer``."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        quiet_third_party()
        parser = {"prog": "actlightning", "exit_on_error": False}
        super().__init__(
            ActivationModule,
            ActivationDataModule,
            save_config_callback=ConfigText,
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

    def _section(self, config: Namespace, key: str, default: Any = None) -> Any:
        """``key`` of the subcommand's part of ``config``."""
        return config.get(str(self.subcommand), config).get(key, default)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise ConfigError(_argument_error_line(str(error), setting_keys())) from None

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # No --seed_everything: an export draws no random numbers but its own seeded ones.
        pass

    def _set_seed(self) -> None:
        # upstream: Lightning reads --seed_everything in this private hook and offers no public switch
        # to leave the option out; without the option there is nothing to seed.
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
        trainer_config = self._section(self.config_init, "trainer", default={})
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
        configure_logging(self._section(self.config, "log_file"))

    def predict(self, model: ActivationModule, datamodule: ActivationDataModule, **_: object) -> None:
        callbacks: list = self.trainer.callbacks  # type: ignore[attr-defined]
        writer = next(c for c in callbacks if isinstance(c, ParquetShardWriter))
        recorder = next(c for c in callbacks if isinstance(c, ConfigText))
        # Its work is done: the Trainer (and a spawned process) need not carry the parser.
        callbacks.remove(recorder)
        config_yaml = recorder.text(writer.output_dir, writer.location.remote)
        # Weights load while the data side plans: in a single process (a launcher would start other
        # processes, and a spawned one would be sent the model, which a loading thread cannot be).
        load_early = self.trainer.strategy.launcher is None
        plan = plan_export(model, datamodule, writer, config_yaml, load_early)
        if plan is None:
            return
        if writer.hparams.dry_run:
            log.info("writer.dry_run: stopping before the export; nothing was written")
            return
        self.trainer.predict(model, datamodule=datamodule, return_predictions=False)


def setting_keys() -> list[str]:
    """Every ``--key`` the predict command takes (for "did you mean"), from the classes' signatures."""
    import inspect

    sections = {"model": ActivationModule, "data": ActivationDataModule, "writer": ParquetShardWriter}
    keys = ["config", "log_file", "print_config", "help", *(f"trainer.{flag}" for flag in TRAINER_FLAGS)]
    for section, cls in sections.items():
        parameters = inspect.signature(cls).parameters
        keys += [f"{section}.{name}" for name in parameters]
    return sorted(keys)


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
