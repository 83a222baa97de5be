"""The LightningModule: load the model, run the forward, return each sequence's real-token activations."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, cast

import torch
from lightning.pytorch import LightningModule
from transformers import AutoConfig, AutoModel, PretrainedConfig

from actlightning.batching import Batch
from actlightning.capture import (
    HiddenStateCapture,
    HookPoint,
    blocks_needed,
    find_blocks,
    resolve_hook_points,
    resolve_layers,
)
from actlightning.errors import ActivationError, ConfigError
from actlightning.loading import context_size, load_pretrained
from actlightning.schema import TORCH_DTYPES, StorageDtype, layer_column

log = logging.getLogger(__name__)

ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]


def truncated_config(config: PretrainedConfig, blocks: int) -> PretrainedConfig:
    """A copy of ``config`` for a model of only its first ``blocks`` decoder blocks.

    Per-layer settings (lists as long as the model is deep, such as ``layer_types`` for sliding-window
    attention) are cut to the same length, so that every kept block is built as in the full model.
    """
    if blocks >= config.num_hidden_layers:
        return config
    depth = config.num_hidden_layers
    short = copy.deepcopy(config)
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == depth:
            setattr(short, key, type(value)(value[:blocks]))
    short.num_hidden_layers = blocks
    return short


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters (and persistent buffers) a checkpoint stores for ``model``, each shared tensor once."""
    seen = {id(t): t.numel() for t in model.state_dict(keep_vars=True).values()}
    return sum(seen.values())


class _DropLoadReport(logging.Filter):
    """Keeps transformers' load report (a table of unused and missing weights) off the console: an
    export loads the base model from an LM checkpoint (the head's weights are unused by design) and
    perhaps only its first blocks; missing weights are checked by the caller instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    from transformers.utils import logging as transformers_logging

    logger = transformers_logging.get_logger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def select_tokens(
    lengths: torch.Tensor, first_token: torch.Tensor, seq_len: int, n_pos: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which padded positions to export, as a flat index into ``[batch * seq_len]``.

    ``lengths``: real tokens per row; ``first_token``: column of each row's first real token (0 with
    right padding). Keeps the last ``n_pos`` real tokens of each row (all when ``n_pos`` is None).
    Returns ``(flat_index [T], n_tokens [B], start_position [B])``; ``start_position`` is the position
    of the first exported token within the unpadded sequence.
    """
    n_tokens = lengths if n_pos is None else lengths.clamp(max=n_pos)
    start_position = lengths - n_tokens
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), n_tokens)
    row_starts = torch.cumsum(n_tokens, 0) - n_tokens
    within = torch.arange(rows.numel(), device=lengths.device) - row_starts[rows]
    columns = first_token[rows] + start_position[rows] + within
    return rows * seq_len + columns, n_tokens, start_position


@dataclass
class Prediction:
    """One batch's exported activations, on the host (or on their way there: see ``ready``).

    Tokens are packed: the ``n_tokens[i]`` exported tokens of row ``i`` follow those of row ``i - 1``.
    """

    example_id: torch.Tensor  # [B] row index in the loaded split
    n_tokens: torch.Tensor  # [B] exported tokens per row (all, or the last n_pos)
    start_position: torch.Tensor  # [B] position of each row's first exported token in its sequence
    input_ids: torch.Tensor  # [T] int32, the exported tokens
    vectors: dict[str, torch.Tensor]  # vector column -> [T, width] in the storage dtype
    # Each vector column's largest magnitude in the model's output, checked by the writer before
    # anything of the batch is written (see ``schema.check_finite``).
    max_abs: torch.Tensor
    # On CUDA: recorded after the asynchronous device-to-host copies; wait on it before reading.
    ready: torch.cuda.Event | None = None
    shard_index: int = -1
    last_in_shard: bool = False

    @staticmethod
    def join(first: Prediction, second: Prediction) -> Prediction:
        """The rows of ``first`` then ``second`` (the halves of a batch split after running out of memory)."""
        for part in (first, second):
            if part.ready is not None:
                part.ready.synchronize()
        return Prediction(
            example_id=torch.cat([first.example_id, second.example_id]),
            n_tokens=torch.cat([first.n_tokens, second.n_tokens]),
            start_position=torch.cat([first.start_position, second.start_position]),
            input_ids=torch.cat([first.input_ids, second.input_ids]),
            vectors={name: torch.cat([first.vectors[name], second.vectors[name]]) for name in first.vectors},
            max_abs=torch.maximum(first.max_abs, second.max_abs),
        )


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
        self.checkpoint = checkpoint
        self.revision = revision
        self.dtype_name = dtype
        self.requested_layers = layers
        self.hook_point_specs = list(hook_points or [])
        self._hook_points: list[HookPoint] | None = None
        self._meta: dict[str, torch.nn.Module] = {}
        self.n_pos = n_pos
        self.output_dtype_name = output_dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.model: torch.nn.Module | None = None
        self._config: PretrainedConfig | None = None

    @property
    def config(self) -> PretrainedConfig:
        """The checkpoint's config (loaded once, without the weights)."""
        if self._config is None:
            self._config = load_pretrained(
                AutoConfig.from_pretrained,
                "model.checkpoint",
                self.checkpoint,
                revision=self.revision,
                trust_remote_code=self.trust_remote_code,
            )
        return self._config

    def check_settings(self) -> None:
        """Validate the settings against the checkpoint's config, before any weights load."""
        if not self.vector_columns:
            raise ConfigError("model.layers is empty and model.hook_points unset: there is nothing to export")
        context = context_size(self.config)
        if self.n_pos is not None and context is not None and self.n_pos > context:
            raise ConfigError(
                f"model.n_pos is {self.n_pos}, above the model's context size {context}; "
                f"use at most {context}, or leave it unset to keep every token"
            )
        if not hasattr(self.config, "num_hidden_layers") or not hasattr(self.config, "hidden_size"):
            raise ConfigError(
                f"model.checkpoint {self.checkpoint!r} has a {type(self.config).__name__} without "
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
        return resolve_layers(self.requested_layers, self.num_layers)

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
        """What loading the model costs, from meta-device skeletons (no weights): blocks and parameters
        loaded, and their bytes at the compute dtype, next to the full model's."""
        full = count_parameters(self._skeleton())
        if self.blocks_to_load < self.num_layers:
            with torch.device("meta"):
                short = AutoModel.from_config(
                    truncated_config(self.config, self.blocks_to_load), trust_remote_code=self.trust_remote_code
                )
            loaded = count_parameters(short)
        else:
            loaded = full
        bytes_per = TORCH_DTYPES[self.compute_dtype_name].itemsize
        return {
            "dtype": self.compute_dtype_name,
            "blocks_loaded": self.blocks_to_load,
            "blocks": self.num_layers,
            "parameters_loaded": loaded,
            "parameters": full,
            "weight_bytes_loaded": loaded * bytes_per,
            "weight_bytes": full * bytes_per,
        }

    def _skeleton(self) -> torch.nn.Module:
        """The architecture on the meta device (module names and shapes, no weights), built once."""
        # Kept in a dict so that it is not registered as a submodule (Lightning would move it to the device).
        if "model" not in self._meta:
            with torch.device("meta"):
                self._meta["model"] = AutoModel.from_config(self.config, trust_remote_code=self.trust_remote_code)
        return self._meta["model"]

    @property
    def hook_points(self) -> list[HookPoint]:
        """``hook_points`` checked against the model's submodules (built on the meta device: no weights)."""
        if self._hook_points is None:
            if not self.hook_point_specs:
                self._hook_points = []
            else:
                skeleton = self._skeleton()
                blocks_path, _ = find_blocks(skeleton, self.num_layers)
                names = [name for name, _ in skeleton.named_modules()]
                self._hook_points = resolve_hook_points(
                    self.hook_point_specs, names, getattr(skeleton, "base_model_prefix", ""), blocks_path
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
        if self.dtype_name != "auto":
            return self.dtype_name
        configured = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        name = str(configured).removeprefix("torch.") if configured is not None else "float32"
        return name if name in TORCH_DTYPES else "float32"

    @property
    def storage_dtype(self) -> StorageDtype:
        """Storage dtype name; before the weights load, ``auto`` compute is read from the config."""
        if self.output_dtype_name is not None:
            return self.output_dtype_name
        if self.dtype_name != "auto":
            return cast(StorageDtype, self.dtype_name)
        if self.model is not None:
            return cast(StorageDtype, str(next(self.model.parameters()).dtype).removeprefix("torch."))
        return cast(StorageDtype, self.compute_dtype_name)

    def export_settings(self) -> dict:
        """Settings that decide the exported values; resuming under different ones is refused."""
        return {
            "checkpoint": self.checkpoint,
            "revision": self.revision,
            "dtype": self.dtype_name,
            "layers": self.layers,
            "hook_points": [p.spec for p in self.hook_points],
            "n_pos": self.n_pos,
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
        kwargs = {}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        dtype = self.dtype_name if self.dtype_name == "auto" else TORCH_DTYPES[self.dtype_name]
        # AutoModel is the base model: an LM head over a large vocabulary costs a large share of the
        # forward and nobody exports logits.
        # Only the blocks the export reads are built and loaded (safetensors are memory-mapped, so
        # the weights of later blocks are never read from disk).
        config = truncated_config(self.config, self.blocks_to_load)
        with _quiet_load_report():
            model, info = load_pretrained(
                AutoModel.from_pretrained,
                "model.checkpoint",
                self.checkpoint,
                config=config,
                revision=self.revision,
                dtype=dtype,
                trust_remote_code=self.trust_remote_code,
                output_loading_info=True,
                **kwargs,
            )
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ConfigError(
                f"model.checkpoint {self.checkpoint!r} lacks {len(missing)} weights of {type(model).__name__} "
                f"(e.g. {missing[:3]}); they would be random and so would the activations"
            )
        model.eval().requires_grad_(False)
        self.model = model
        _, blocks = find_blocks(model, self.blocks_to_load)
        self.capture = HiddenStateCapture(
            model, blocks, self.layers, tie_last=self.tie_last, hook_points=self.hook_points, num_layers=self.num_layers
        )
        self._output_dtype = TORCH_DTYPES[self.storage_dtype]
        log.info(
            "loaded %s (%d of %d blocks, hidden size %d); exporting hidden_states %s as %s",
            self.checkpoint,
            self.blocks_to_load,
            self.num_layers,
            self.hidden_size,
            self.layers,
            self.storage_dtype,
        )

    def _forward(self, batch: Batch) -> Prediction:
        input_ids = batch.input_ids
        hidden = self.capture(input_ids=input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        batch_size, seq_len = input_ids.shape
        flat, n_tokens, start_position = select_tokens(batch.lengths, batch.first_token, seq_len, self.n_pos)
        vectors, max_abs = {}, []
        for column, states in hidden.items():
            if states.dim() != 3 or tuple(states.shape[:2]) != (batch_size, seq_len):
                raise ActivationError(
                    f"{column} has shape {tuple(states.shape)}, not [batch, sequence, width] = "
                    f"[{batch_size}, {seq_len}, ...]; "
                    "choose a hook point whose output holds one vector per token"
                )
            selected = states.reshape(batch_size * seq_len, -1).index_select(0, flat)
            stored = selected.to(self._output_dtype)  # cast on the device: less to copy
            # One pass: the largest magnitude is NaN/inf if any value is, and shows float16 overflow.
            max_abs.append(torch.linalg.vector_norm(selected, ord=float("inf"), dtype=torch.float32))
            vectors[column] = _to_host(stored)
        prediction = Prediction(
            example_id=_to_host(batch.example_id),
            n_tokens=_to_host(n_tokens),
            start_position=_to_host(start_position),
            input_ids=_to_host(input_ids.reshape(-1).index_select(0, flat).to(torch.int32)),
            vectors=vectors,
            max_abs=_to_host(torch.stack(max_abs)),
        )
        if input_ids.device.type == "cuda":
            # The copies above are asynchronous; the writer thread waits on this event, so the next
            # forward pass is queued on the GPU while this batch travels to the host.
            prediction.ready = torch.cuda.Event()
            prediction.ready.record()
        return prediction

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
        first = self._forward_splitting(batch.rows(slice(0, half)))
        second = self._forward_splitting(batch.rows(slice(half, rows)))
        return Prediction.join(first, second)

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


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor: pinned and asynchronous on CUDA; CPU tensors pass through."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
