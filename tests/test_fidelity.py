"""Exported activations equal the model's own forward pass on each sequence alone, unpadded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import Reference, read_rows, run_export


def _games(games_file):
    return [json.loads(line) for line in games_file.read_text().splitlines()]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"model.layers": "[1, -1]", "model.n_pos": 5},
        {"model.output_dtype": "float16"},
        {"model.layers": "[0, 2]", "model.output_dtype": "float16", "data.sort_by_length": "true"},
        {"model.layers": "[0, 1, -1]", "model.output_dtype": "bfloat16"},
    ],
    ids=["all-float32", "subset-npos", "all-float16", "early-exit-float16-sorted", "bfloat16-storage"],
)
def test_export_matches_unpadded_forward(tmp_path, checkpoints, games_file, architecture, padding_side, settings):
    checkpoint = checkpoints[architecture]
    run_export(checkpoint, games_file, tmp_path / "out", **{"data.padding_side": padding_side, **settings})
    reference = Reference(checkpoint)
    games = _games(games_file)
    rows = read_rows(tmp_path / "out")
    assert [r["example_id"] for r in rows] == list(range(len(games)))
    n_pos = settings.get("model.n_pos")
    float16 = settings.get("model.output_dtype") == "float16"
    bfloat16 = settings.get("model.output_dtype") == "bfloat16"
    num_states = reference.model.config.num_hidden_layers + 1
    layer_setting = settings.get("model.layers")
    layers = (
        list(range(num_states)) if layer_setting is None else sorted(i % num_states for i in json.loads(layer_setting))
    )
    for row, game in zip(rows, games, strict=True):
        tokens = reference.tokens(game["Transcript"])
        start = 0 if n_pos is None else max(0, len(tokens) - n_pos)
        assert row["input_ids"] == tokens[start:]
        assert row["start_position"] == start
        expected = reference.hidden_states(tokens)
        assert sorted(k for k in row if k.startswith("layer_")) == sorted(f"layer_{i}" for i in layers)
        for index in layers:
            got = row[f"layer_{index}"]
            want = expected[index][start:]
            assert got.shape == want.shape
            if float16:
                assert got.dtype == np.float16
                # Rounding the float32 reference can differ by one float16 step when the batched
                # float32 result sits within ~1e-7 of a rounding boundary.
                np.testing.assert_allclose(
                    got.astype(np.float32), want.astype(np.float16).astype(np.float32), rtol=2**-10, atol=1e-6
                )
                assert (got == want.astype(np.float16)).mean() > 0.99
            elif bfloat16:
                # Stored as 2-byte bit patterns, decoded by the reader: the float32 forward rounded to
                # bfloat16 (one bfloat16 step of slack, as for float16 above).
                rounded = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
                np.testing.assert_allclose(got, rounded, rtol=2**-7, atol=1e-6)
                assert (got == rounded).mean() > 0.99
            else:
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
