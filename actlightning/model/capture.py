"""Capture HF ``hidden_states`` with forward hooks, and stop the forward after the deepest one needed.

HF's ``hidden_states[0]`` is the input of the first decoder block, ``hidden_states[i]`` (0 < i < L)
the output of block ``i - 1``, and ``hidden_states[L]`` the model's ``last_hidden_state``, which for
most models (GPT-2, Llama, ...) has the final norm applied. Hooks give the same tensors without
``output_hidden_states`` keeping all L + 1 of them alive, and let the forward stop early.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from actlightning.errors import ActivationError, ConfigError
from actlightning.files.schema import HOOK_PREFIX, layer_column


class _StopForward(Exception):
    """Raised from a hook once every requested tensor has been captured."""


def find_blocks(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (``h`` for GPT-2, ``layers`` for Llama, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise ConfigError(
        f"could not find the list of {num_layers} decoder blocks in {type(model).__name__}; "
        "this model architecture is not supported"
    )


def resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """Normalize ``model.layers`` (HF hidden_states indices, negatives from the end) to sorted indices."""
    count = num_layers + 1
    if layers is None:
        return list(range(count))
    if len(layers) == 0:
        return []
    resolved = []
    for index in layers:
        if not -count <= index < count:
            raise ConfigError(
                f"model.layers contains {index}, out of range for a model with {num_layers} layers "
                f"(hidden_states has {count} entries: valid indices are {-count}..{count - 1})"
            )
        resolved.append(index % count)
    duplicates = sorted({i for i in resolved if resolved.count(i) > 1})
    if duplicates:
        raise ConfigError(f"model.layers names hidden_states index {duplicates} more than once: {list(layers)}")
    return sorted(resolved)


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class HookPoint:
    """A named submodule whose output (or, with ``:input``, input) is exported.

    ``path`` is relative to the base model (``h.5.mlp`` for GPT-2, ``layers.3.self_attn.o_proj`` for
    Llama); ``block`` is the decoder block it lies in, or None when outside the blocks.
    """

    spec: str
    path: str
    is_input: bool
    block: int | None

    @property
    def column(self) -> str:
        return hook_column(self.path, self.is_input)


def hook_column(path: str, is_input: bool = False) -> str:
    """Column name of a hook point: ``hook_`` + the base-model path with dots as underscores."""
    return f"{HOOK_PREFIX}{path.replace('.', '_')}{'_input' if is_input else ''}"


def resolve_hook_points(
    specs: Sequence[str], module_names: Sequence[str], base_prefix: str, blocks_path: str
) -> list[HookPoint]:
    """Validate ``model.hook_points`` against the model's submodule names (base-model relative).

    A path may also be written from the LM-head model (``transformer.h.5.mlp``): the base model's
    prefix is then dropped. Unknown paths fail listing close matches.
    """
    names = set(module_names) - {""}
    points, columns = [], set()
    for spec in specs:
        path, is_input = (spec[: -len(INPUT_SUFFIX)], True) if spec.endswith(INPUT_SUFFIX) else (spec, False)
        if path not in names and base_prefix and path.startswith(base_prefix + "."):
            path = path[len(base_prefix) + 1 :]
        if path not in names:
            close = difflib.get_close_matches(path, sorted(names), n=5, cutoff=0.6)
            raise ConfigError(
                f"model.hook_points: no submodule {spec!r} in this model; close matches: {close or 'none'} "
                f"(paths are relative to the base model, e.g. {blocks_path}.0.mlp; "
                f"add {INPUT_SUFFIX} for a module's input)"
            )
        block = None
        prefix = blocks_path + "."
        if path.startswith(prefix):
            block = int(path[len(prefix) :].split(".")[0])
        point = HookPoint(spec, path, is_input, block)
        if point.column in columns:
            raise ConfigError(f"model.hook_points names {spec!r} more than once")
        columns.add(point.column)
        points.append(point)
    return points


def blocks_needed(
    layers: Sequence[int], hook_points: Sequence[HookPoint], num_layers: int, tie_last: bool = True
) -> int:
    """How many leading decoder blocks an export runs: ``num_layers`` when anything needs the full
    forward (``hidden_states[L]`` with the final norm, or a hook point outside the blocks), else the
    blocks up to the deepest one anything is captured from (at least one: ``hidden_states[0]`` is the
    first block's input)."""
    if (layers and max(layers) == num_layers and tie_last) or any(p.block is None for p in hook_points):
        return num_layers
    deepest = max([i - 1 for i in layers if i > 0] + [p.block for p in hook_points if p.block is not None], default=0)
    return deepest + 1


class HiddenStateCapture:
    """Runs ``model`` and returns ``{column: [batch, seq, width]}`` for ``layers`` and ``hook_points``.

    Layers are HF ``hidden_states`` indices (columns ``layer_{i}``) of a model with ``num_layers``
    blocks; ``blocks`` may be only its first ones (a model loaded truncated). ``tie_last``: whether
    ``hidden_states[L]`` is the model's ``last_hidden_state`` (after the final norm) rather than the raw
    output of the last block; HF ties them unless the config says otherwise. The forward stops after
    the deepest block anything is captured from; a hook point outside the blocks (``ln_f``) needs it all.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        layers: list[int],
        tie_last: bool = True,
        hook_points: Sequence[HookPoint] = (),
        num_layers: int | None = None,
    ) -> None:
        self.model = model
        self.layers = layers
        # The full model's depth: with truncated blocks, the last loaded block's output is
        # hidden_states[len(blocks)], not the model's (normed) last hidden state.
        self.num_layers = len(blocks) if num_layers is None else num_layers
        needed = blocks_needed(layers, hook_points, self.num_layers, tie_last)
        if needed > len(blocks):
            raise ValueError(f"{len(blocks)} blocks loaded; these layers and hook points need {needed}")
        self.columns = [layer_column(i) for i in layers] + [p.column for p in hook_points]
        self._captured: dict[str, torch.Tensor] = {}
        wanted = set(layers)
        full_for_layers = bool(layers) and max(layers) == self.num_layers and tie_last
        self.needs_full_forward = full_for_layers or any(p.block is None for p in hook_points)
        deepest_block = needed - 1
        self._handles = []
        modules = dict(model.named_modules())
        for point in hook_points:
            module = modules[point.path]
            if point.is_input:
                self._handles.append(
                    module.register_forward_pre_hook(self._make_pre_hook(point.column), with_kwargs=True)
                )
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(point.column)))
        if 0 in wanted:
            self._handles.append(
                blocks[0].register_forward_pre_hook(self._make_pre_hook(layer_column(0)), with_kwargs=True)
            )
        for block_index, block in enumerate(blocks):
            index = block_index + 1
            if index in wanted and not (index == self.num_layers and full_for_layers):
                self._handles.append(block.register_forward_hook(self._make_hook(layer_column(index))))
        if not self.needs_full_forward:
            # Registered last, so every capture hook of that block has run when it stops the forward.
            self._handles.append(blocks[deepest_block].register_forward_hook(self._stop))
        self._tie_last = full_for_layers

    def _make_pre_hook(self, column: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._captured[column] = (
                args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            )

        return hook

    def _make_hook(self, column: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._captured[column] = _first_tensor(output)

        return hook

    @staticmethod
    def _stop(module: nn.Module, args: tuple, output: object) -> None:
        raise _StopForward

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        try:
            outputs = self.model(**inputs, use_cache=False)
            if self._tie_last:
                self._captured[layer_column(self.num_layers)] = outputs.last_hidden_state
        except _StopForward:
            pass
        finally:
            # Never keep device tensors past the call (an out-of-memory error must free them).
            captured, self._captured = self._captured, {}
        missing = [c for c in self.columns if c not in captured]
        if missing:
            raise ActivationError(
                f"the forward pass did not reach {missing}; is the module used by this model's forward?"
            )
        return {c: captured[c] for c in self.columns}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
