"""Loading the model: only the decoder blocks an export reads, and what that costs, from skeletons on
the meta device (module names and shapes, no weights)."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Callable, Iterator

import torch
from transformers import PretrainedConfig


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


def skeleton(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The architecture of ``config`` on the meta device: module names and shapes, no weights."""
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def load_plan(
    config: PretrainedConfig, full: torch.nn.Module, blocks: int, dtype: str, trust_remote_code: bool = False
) -> dict:
    """What loading the first ``blocks`` decoder blocks costs next to the full model (``full``, a
    skeleton): blocks, parameters and their bytes at the compute ``dtype``."""
    from actlightning.files.tables import TORCH_DTYPES

    parameters = count_parameters(full)
    loaded = parameters
    if blocks < config.num_hidden_layers:
        loaded = count_parameters(skeleton(truncated_config(config, blocks), trust_remote_code))
    bytes_per = TORCH_DTYPES[dtype].itemsize
    return {
        "dtype": dtype,
        "blocks_loaded": blocks,
        "blocks": config.num_hidden_layers,
        "parameters_loaded": loaded,
        "parameters": parameters,
        "weight_bytes_loaded": loaded * bytes_per,
        "weight_bytes": parameters * bytes_per,
    }


def load_blocks(
    checkpoint: str,
    config: PretrainedConfig,
    blocks: int,
    dtype: torch.dtype | str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """The base model of ``checkpoint`` (no LM head) with only its first ``blocks`` decoder blocks, in
    eval mode without gradients; missing weights are refused (they would be random)."""
    from transformers import AutoModel

    from actlightning.errors import ConfigError
    from actlightning.pretrained import load_pretrained

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # AutoModel is the base model: an LM head over a large vocabulary costs a large share of the
    # forward and nobody exports logits. Only the blocks the export reads are built and loaded
    # (safetensors are memory-mapped, so the weights of later blocks are never read from disk).
    with _quiet_load_report():
        model, info = load_pretrained(
            AutoModel.from_pretrained,
            "model.checkpoint",
            checkpoint,
            config=truncated_config(config, blocks),
            revision=revision,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **kwargs,
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ConfigError(
            f"model.checkpoint {checkpoint!r} lacks {len(missing)} weights of {type(model).__name__} "
            f"(e.g. {missing[:3]}); they would be random and so would the activations"
        )
    return model.eval().requires_grad_(False)


class BackgroundLoad:
    """``load(*arguments)`` on a thread; ``result()`` waits for it and raises what it raised. Loading is
    mostly reading files and copying tensors, which release the GIL, so it overlaps other work."""

    def __init__(self, load: Callable[..., torch.nn.Module], *arguments: object) -> None:
        self._result: torch.nn.Module | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(load, arguments), name="actlightning-load", daemon=True)
        self._thread.start()

    def _run(self, load: Callable[..., torch.nn.Module], arguments: tuple) -> None:
        try:
            self._result = load(*arguments)
        except BaseException as error:  # re-raised by result(), on the main thread
            self._error = error

    def result(self) -> torch.nn.Module:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None, "the load finished"
        return self._result
