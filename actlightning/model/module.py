"""The LightningModule: load the model, run the forward, return each sequence's real-token activations."""

from __future__ import annotations

import logging
from typing import Literal, cast

import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule
from transformers import AutoConfig, PretrainedConfig

from actlightning.contracts import Batch, Prediction, StorageDtype
from actlightning.errors import ConfigError
from actlightning.files.schema import layer_column
from actlightning.files.tables import TORCH_DTYPES
from actlightning.model.capture import (
    HiddenStateCapture,
    HookPoint,
    blocks_needed,
    find_blocks,
    resolve_hook_points,
    resolve_layers,
)
from actlightning.model.forward import batch_rows, join_predictions, predict
from actlightning.model.loading import BackgroundLoad, load_blocks, load_plan, skeleton
from actlightning.pretrained import context_size, load_pretrained

log = logging.getLogger(__name__)

ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
# Settings that change how the model runs, not what it exports: they may differ on resume.
RUN_ONLY = frozenset({"attn_implementation", "trust_remote_code"})


class ActivationModule(LightningModule):
    """Runs a HuggingFace base model (no LM head) and returns the requested hidden states.

    Args:
        checkpoint: Hub id or local directory of the model (``AutoModel.from_pretrained``).
        revision: Hub revision (branch, tag or commit) of the checkpoint.
        dtype: Compute dtype. ``auto`` takes the checkpoint's own dtype. float32 gives activations equal
            to a float32 reference; bfloat16/float16 are faster on GPUs.
        layers: Indices into HF ``hidden_states``: 0 is the embedding output, L (= number of layers) the
            last hidden state (after the final norm), negatives count from the end. Unset: all L + 1;
            ``[]``: none (export only ``hook_points``).
        hook_points: Submodules whose output is exported (``h.5.mlp``, ``model.layers.3.self_attn.o_proj``,
            a whole block ``h.11``); ``:input`` exports a module's input instead. Tuple outputs take their
            first element. Column ``hook_<path with _ for .>[_input]``.
        n_pos: Keep only the last ``n_pos`` tokens of each sequence. Unset: all tokens.
        output_dtype: Storage dtype of the exported vectors. Unset: the compute dtype. bfloat16 is stored
            as raw uint16 bit patterns (see the README).
        attn_implementation: Passed to ``from_pretrained`` (``eager``, ``sdpa``, ...). Unset: HF's default.
        trust_remote_code: Allow checkpoints that ship their own modelling code.
    """

    def __init__(
        self,
        checkpoint: str,
        revision: str | None = None,
        dtype: ComputeDtype = "float32",
        layers: list[int] | None = None,
        hook_points: list[str] | None = None,
        n_pos: int | None = None,
        output_dtype: StorageDtype | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if n_pos is not None and n_pos <= 0:
            raise ConfigError(f"model.n_pos must be a positive number of tokens or unset, got {n_pos}")
        # Every setting is kept in self.hparams (Lightning's record of the init arguments), read where used.
        self.save_hyperparameters()
        self._hook_points: list[HookPoint] | None = None
        # Kept in a dict so that it is not registered as a submodule (Lightning would move it to the device).
        self._meta: dict[str, torch.nn.Module] = {}
        self.model: torch.nn.Module | None = None
        self._loading: BackgroundLoad | None = None
        self._config: PretrainedConfig | None = None

    @property
    def hparams(self) -> AttributeDict:
        """The settings (Lightning's record of the init arguments), attribute access typed."""
        return cast(AttributeDict, super().hparams)

    @property
    def config(self) -> PretrainedConfig:
        """The checkpoint's config (loaded once, without the weights)."""
        if self._config is None:
            self._config = load_pretrained(
                AutoConfig.from_pretrained,
                "model.checkpoint",
                self.hparams.checkpoint,
                revision=self.hparams.revision,
                trust_remote_code=self.hparams.trust_remote_code,
            )
        return self._config

    def check_settings(self) -> None:
        """Validate the settings against the checkpoint's config, before any weights load."""
        if not self.vector_columns:
            raise ConfigError("model.layers is empty and model.hook_points unset: there is nothing to export")
        context = context_size(self.config)
        if self.hparams.n_pos is not None and context is not None and self.hparams.n_pos > context:
            raise ConfigError(
                f"model.n_pos is {self.hparams.n_pos}, above the model's context size {context}; "
                f"use at most {context}, or leave it unset to keep every token"
            )
        if not hasattr(self.config, "num_hidden_layers") or not hasattr(self.config, "hidden_size"):
            raise ConfigError(
                f"model.checkpoint {self.hparams.checkpoint!r} has a {type(self.config).__name__} without "
                "num_hidden_layers/hidden_size; only decoder language models are supported"
            )

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def layers(self) -> list[int]:
        """The exported hidden_states indices, non-negative and sorted."""
        return resolve_layers(self.hparams.layers, self.num_layers)

    @property
    def tie_last(self) -> bool:
        """Whether ``hidden_states[L]`` is the model's last hidden state (after the final norm)."""
        tie = getattr(self.config, "tie_last_hidden_states", None)
        return True if tie is None else bool(tie)

    @property
    def blocks_to_load(self) -> int:
        """Decoder blocks built and loaded: only those up to the deepest one the export reads."""
        return blocks_needed(self.layers, self.hook_points, self.num_layers, self.tie_last)

    def load_plan(self) -> dict:
        """What loading the model costs (blocks and parameters loaded, and their bytes at the compute
        dtype, next to the full model's), from meta-device skeletons: no weights."""
        return load_plan(
            self.config, self._skeleton(), self.blocks_to_load, self.compute_dtype_name, self.hparams.trust_remote_code
        )

    def _skeleton(self) -> torch.nn.Module:
        """The architecture on the meta device, built once."""
        if "model" not in self._meta:
            self._meta["model"] = skeleton(self.config, self.hparams.trust_remote_code)
        return self._meta["model"]

    @property
    def hook_points(self) -> list[HookPoint]:
        """``hook_points`` checked against the model's submodules (built on the meta device: no weights)."""
        if self._hook_points is None:
            if not self.hparams.hook_points:
                self._hook_points = []
            else:
                built = self._skeleton()
                blocks_path, _ = find_blocks(built, self.num_layers)
                names = [name for name, _ in built.named_modules()]
                self._hook_points = resolve_hook_points(
                    list(self.hparams.hook_points or []), names, getattr(built, "base_model_prefix", ""), blocks_path
                )
        return self._hook_points

    def estimated_widths(self) -> dict[str, int]:
        """Vector length of each exported column, before any forward pass.

        Layers are ``hidden_size`` wide; a hook point on a linear layer is as wide as its output (or
        input), any other hook point is taken as ``hidden_size`` (exact widths come from the first batch).
        """
        widths = {layer_column(i): self.hidden_size for i in self.layers}
        if self.hook_points:
            modules = dict(self._skeleton().named_modules())
            for point in self.hook_points:
                module = modules[point.path]
                if isinstance(module, torch.nn.Linear):
                    widths[point.column] = module.in_features if point.is_input else module.out_features
                else:
                    widths[point.column] = self.hidden_size
        return widths

    @property
    def vector_columns(self) -> list[str]:
        """Every exported vector column: ``layer_{i}`` then ``hook_...``, in capture order."""
        return [layer_column(i) for i in self.layers] + [p.column for p in self.hook_points]

    @property
    def compute_dtype_name(self) -> str:
        """The compute dtype's name; ``auto`` is read from the checkpoint's config (float32 if unstated)."""
        if self.hparams.dtype != "auto":
            return self.hparams.dtype
        configured = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        name = str(configured).removeprefix("torch.") if configured is not None else "float32"
        return name if name in TORCH_DTYPES else "float32"

    @property
    def storage_dtype(self) -> StorageDtype:
        """Storage dtype name; before the weights load, ``auto`` compute is read from the config."""
        if self.hparams.output_dtype is not None:
            return self.hparams.output_dtype
        if self.hparams.dtype != "auto":
            return cast(StorageDtype, self.hparams.dtype)
        if self.model is not None:
            return cast(StorageDtype, str(next(self.model.parameters()).dtype).removeprefix("torch."))
        return cast(StorageDtype, self.compute_dtype_name)

    def export_settings(self) -> dict:
        """Settings that decide the exported values; resuming under different ones is refused.

        Layers and the storage dtype are recorded resolved, with the checkpoint's depth and width."""
        settings = {k: v for k, v in self.hparams.items() if k not in RUN_ONLY}
        return {
            **settings,
            "layers": self.layers,
            "hook_points": [p.spec for p in self.hook_points],
            "output_dtype": self.storage_dtype,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
        }

    def setup(self, stage: str) -> None:
        self.check_settings()

    def configure_model(self) -> None:
        # Loaded here, not in __init__: with transformers 5 a model built in __init__ and sent to a
        # spawned process silently returns hidden_states=None.
        if self.model is not None:
            return
        loading, self._loading = self._loading, None
        self.model = model = loading.result() if loading is not None else load_blocks(*self._load_arguments())
        _, blocks = find_blocks(model, self.blocks_to_load)
        self.capture = HiddenStateCapture(
            model, blocks, self.layers, tie_last=self.tie_last, hook_points=self.hook_points, num_layers=self.num_layers
        )
        self._output_dtype = TORCH_DTYPES[self.storage_dtype]
        log.info(
            "loaded %s (%d of %d blocks, hidden size %d); exporting hidden_states %s as %s",
            *(self.hparams.checkpoint, self.blocks_to_load, self.num_layers, self.hidden_size),
            *(self.layers, self.storage_dtype),
        )

    def _load_arguments(self) -> tuple:
        h = self.hparams
        dtype = h.dtype if h.dtype == "auto" else TORCH_DTYPES[h.dtype]
        blocks, config = self.blocks_to_load, self.config
        return h.checkpoint, config, blocks, dtype, h.revision, h.trust_remote_code, h.attn_implementation

    def start_loading(self) -> None:
        """Start loading the weights on a thread (``configure_model`` takes them), so that they load
        while the data side plans. Only where the model is not sent to other processes afterwards."""
        if self.model is None and self._loading is None:
            self._loading = BackgroundLoad(load_blocks, *self._load_arguments())

    def _forward(self, batch: Batch) -> Prediction:
        return predict(self.capture, batch, self.hparams.n_pos, self._output_dtype)

    def _forward_splitting(self, batch: Batch) -> Prediction:
        """Forward ``batch``; if it runs out of device memory, forward each half and join the results.

        Rows never interact, so the halves' activations equal the unpadded forward as the whole batch's
        do (within float tolerance: another batch shape may round differently); a batch is never dropped.
        """
        try:
            return self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            rows = batch.input_ids.shape[0]
            if rows == 1:
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = rows // 2
        log.warning("a batch of %d sequences ran out of memory; retrying as %d + %d", rows, half, rows - half)
        first = self._forward_splitting(batch_rows(batch, slice(0, half)))
        second = self._forward_splitting(batch_rows(batch, slice(half, rows)))
        return join_predictions(first, second)

    def probe(self, batch: Batch) -> bool:
        """Whether ``batch`` fits in device memory (used by the batch-size search)."""
        batch = self.transfer_batch_to_device(batch, self.device, 0)
        try:
            with torch.inference_mode():
                self._forward(batch)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        prediction = self._forward_splitting(batch)
        prediction.shard_index, prediction.last_in_shard = batch.shard_index, batch.last_in_shard
        return prediction
