"""Loading only the blocks an export reads: fidelity, the plan line, and when the full model is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from actlightning.model.capture import HookPoint, blocks_needed
from actlightning.model.loading import truncated_config
from actlightning.model.module import ActivationModule
from tests.helpers import Reference, read_rows, read_token_rows, run_export

# Per architecture: a hook point inside block 1, and the final norm (outside the blocks).
INSIDE = {"gpt2": "h.1.mlp", "llama": "layers.1.mlp", "qwen2": "layers.1.self_attn.o_proj"}
FINAL_NORM = {"gpt2": "ln_f", "llama": "norm", "qwen2": "norm"}


def _point(block: int | None) -> HookPoint:
    return HookPoint("x", "x", False, block)


@pytest.mark.parametrize(
    ("layers", "points", "expected"),
    [
        ([0], [], 1),  # hidden_states[0] is block 0's input
        ([1], [], 1),
        ([0, 2], [], 2),
        ([2], [_point(3)], 4),  # a hook in the last block
        ([5], [], 5),  # hidden_states[L] after the final norm needs every block and the norm
        ([], [_point(None)], 5),  # a hook outside the blocks (ln_f)
        ([4], [], 4),  # block 3's output: the last block is not needed
    ],
)
def test_blocks_needed(layers, points, expected):
    assert blocks_needed(layers, points, num_layers=5) == expected


def test_blocks_needed_without_a_normed_last_state_stops_at_the_last_block():
    # tie_last False: hidden_states[L] is the last block's raw output, which needs every block
    assert blocks_needed([5], [], num_layers=5, tie_last=False) == 5
    assert blocks_needed([3], [], num_layers=5, tie_last=False) == 3


def test_truncated_config_cuts_per_layer_settings_and_leaves_the_original(checkpoints):
    config = AutoConfig.from_pretrained(checkpoints["qwen2"])
    before = list(config.layer_types)
    short = truncated_config(config, 3)
    assert short.num_hidden_layers == 3 and short.layer_types == before[:3]
    assert config.num_hidden_layers == 4 and config.layer_types == before
    assert truncated_config(config, 4) is config


@pytest.mark.parametrize("layout", ["sequence", "token"])
@pytest.mark.parametrize("architecture", ["gpt2", "llama", "qwen2"])
def test_truncated_export_equals_the_full_models_forward(tmp_path, checkpoints, games_file, architecture, layout):
    out = tmp_path / "out"
    hook = INSIDE[architecture]
    run_export(
        checkpoints[architecture],
        games_file,
        out,
        **{
            "model.layers": "[0, 2]",
            "model.hook_points": json.dumps([hook]),
            "writer.layout": layout,
            "data.padding_side": "left",
            "model.output_dtype": "float32",
        },
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["model"]["blocks_loaded"] == 2, "layer 2 and a hook in block 1 need blocks 0-1"
    assert manifest["plan"]["model"]["parameters_loaded"] < manifest["plan"]["model"]["parameters"]
    # The reference is the whole model: layer 2 must be block 1's raw output, not a final-normed state.
    reference = Reference(checkpoints[architecture])
    captured = {}
    module = dict(reference.model.named_modules())[hook]
    module.register_forward_hook(lambda m, a, o: captured.__setitem__("hook", o[0] if isinstance(o, tuple) else o))
    column = "hook_" + hook.replace(".", "_")
    texts = [json.loads(line)["Transcript"] for line in games_file.read_text().splitlines()]
    if layout == "sequence":
        rows = read_rows(out)
        assert len(rows) == 40
        for row in rows:
            tokens = reference.tokens(texts[row["example_id"]])
            expected = reference.hidden_states(tokens)
            for index in (0, 2):
                np.testing.assert_allclose(row[f"layer_{index}"], expected[index], rtol=0, atol=1e-5)
            _assert_hook(row, column, captured)
    else:
        rows = read_token_rows(out)
        cache = {}
        for row in rows:
            example = row["example_id"]
            if example not in cache:
                tokens = reference.tokens(texts[example])
                cache[example] = (reference.hidden_states(tokens), captured["hook"][0].numpy().copy())
            expected, hooked = cache[example]
            for index in (0, 2):
                np.testing.assert_allclose(row[f"layer_{index}"], expected[index][row["position"]], rtol=0, atol=1e-5)
            np.testing.assert_allclose(row[column], hooked[row["position"]], rtol=0, atol=1e-5)


def _assert_hook(row: dict, column: str, captured: dict) -> None:
    np.testing.assert_allclose(row[column], captured["hook"][0].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_full_model_when_the_export_needs_the_full_forward(checkpoints, architecture):
    for settings in ({"layers": None}, {"layers": [-1]}, {"layers": [0], "hook_points": [FINAL_NORM[architecture]]}):
        module = ActivationModule(str(checkpoints[architecture]), **settings)
        module.configure_model()
        assert module.blocks_to_load == module.num_layers
        plan = module.load_plan()
        assert plan["parameters_loaded"] == plan["parameters"] and plan["blocks_loaded"] == plan["blocks"]
    module = ActivationModule(str(checkpoints[architecture]), layers=[1])
    module.configure_model()
    blocks = [m for m in module.model.modules() if isinstance(m, torch.nn.ModuleList)][0]
    assert len(blocks) == 1, "only the first block was built"


def test_truncated_model_loads_no_random_weights(checkpoints):
    module = ActivationModule(str(checkpoints["qwen2"]), layers=[1])
    module.configure_model()
    full = AutoModel.from_pretrained(checkpoints["qwen2"])
    loaded = module.model.state_dict()
    for name, tensor in loaded.items():
        torch.testing.assert_close(tensor, full.state_dict()[name], rtol=0, atol=0)
