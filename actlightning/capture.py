"""Capture HF ``hidden_states`` with forward hooks, and stop the forward after the deepest one needed.

HF's ``hidden_states[0]`` is the input of the first decoder block, ``hidden_states[i]`` (0 < i < L)
the output of block ``i - 1``, and ``hidden_states[L]`` the model's ``last_hidden_state``, which for
most models (GPT-2, Llama, ...) has the final norm applied. Hooks give the same tensors without
``output_hidden_states`` keeping all L + 1 of them alive, and let the forward stop early.
"""

from __future__ import annotations

from actlightning.errors import ConfigError

from collections.abc import Sequence

import torch
from torch import nn


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
        raise ConfigError("model.layers is empty; leave it unset to export all layers")
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


def _first_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class HiddenStateCapture:
    """Runs ``model`` and returns ``{hidden_states index: [batch, seq, hidden]}`` for ``layers``.

    ``tie_last``: whether ``hidden_states[L]`` is the model's ``last_hidden_state`` (after the final
    norm) rather than the raw output of the last block; HF ties them unless the config says otherwise.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, layers: list[int], tie_last: bool = True) -> None:
        self.model = model
        self.layers = layers
        self.num_layers = len(blocks)
        self._captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)
        # Whether the whole model must run: only for hidden_states[L] when it is last_hidden_state.
        self.needs_full_forward = deepest == self.num_layers and tie_last
        wanted = set(layers)
        self._handles = []
        if 0 in wanted:
            self._handles.append(blocks[0].register_forward_pre_hook(self._pre_hook_first, with_kwargs=True))
        stop_after = deepest - 1 if not self.needs_full_forward else None
        for block_index, block in enumerate(blocks):
            index = block_index + 1
            keep = index in wanted and not (index == self.num_layers and self.needs_full_forward)
            stop = block_index == stop_after
            if keep or stop:
                self._handles.append(block.register_forward_hook(self._make_hook(index, keep, stop)))

    def _pre_hook_first(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._captured[0] = args[0] if args else kwargs["hidden_states"]

    def _make_hook(self, index: int, keep: bool, stop: bool):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if keep:
                self._captured[index] = _first_tensor(output)
            if stop:
                raise _StopForward

        return hook

    def __call__(self, **inputs: torch.Tensor) -> dict[int, torch.Tensor]:
        self._captured = {}
        try:
            outputs = self.model(**inputs, use_cache=False)
            if self.needs_full_forward:
                self._captured[self.num_layers] = outputs.last_hidden_state
        except _StopForward:
            pass
        finally:
            # Never keep device tensors past the call (an out-of-memory error must free them).
            captured, self._captured = self._captured, {}
        missing = [i for i in self.layers if i not in captured]
        assert not missing, f"hooks did not capture hidden_states {missing}"
        return {i: captured[i] for i in self.layers}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
