"""Token layout, hook points and the reader."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import List, Value, load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModel

from actlightning.model.capture import HiddenStateCapture, find_blocks
from actlightning.read.reader import open_export
from actlightning.read.training import TokenVectors, iter_token_batches
from tests.helpers import Reference, read_rows, read_token_rows, run_export


def _texts(games_file):
    return [json.loads(line)["Transcript"] for line in games_file.read_text().splitlines()]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_token_layout_rows_match_unpadded_forward(tmp_path, checkpoints, games_file, architecture):
    out = tmp_path / "out"
    run_export(
        checkpoints[architecture],
        games_file,
        out,
        **{"writer.layout": "token", "model.layers": "[0, 2]", "model.n_pos": 6, "data.label_columns": "[WhiteElo]"},
    )
    features = load_dataset("parquet", data_files=str(out / "*.parquet"), split="train").features
    assert features["layer_2"] == List(Value("float32"), length=32)
    reference, texts = Reference(checkpoints[architecture]), _texts(games_file)
    games = [json.loads(line) for line in games_file.read_text().splitlines()]
    rows = read_token_rows(out)
    expected_count = sum(min(6, len(reference.tokens(t))) for t in texts)
    assert len(rows) == expected_count
    for row in rows:
        example = row["example_id"]
        tokens, hidden = reference.of(texts[example])
        assert len(tokens) - 6 <= row["position"] < len(tokens)
        assert row["token_id"] == tokens[row["position"]]
        assert row["WhiteElo"] == games[example]["WhiteElo"]
        for index in (0, 2):
            np.testing.assert_allclose(row[f"layer_{index}"], hidden[index][row["position"]], rtol=0, atol=1e-5)


def test_token_shuffle_buffer_permutes_rows_deterministically(tmp_path, checkpoints, games_file):
    base = {"writer.layout": "token", "model.layers": "[1]", "writer.batches_per_shard": 4}
    run_export(checkpoints["gpt2"], games_file, tmp_path / "plain", **base)
    run_export(
        checkpoints["gpt2"],
        games_file,
        tmp_path / "a",
        **base,
        **{"writer.shuffle_buffer": 2, "writer.shuffle_seed": 3},
    )
    run_export(
        checkpoints["gpt2"],
        games_file,
        tmp_path / "b",
        **base,
        **{"writer.shuffle_buffer": 2, "writer.shuffle_seed": 3, "writer.writer_threads": 2},
    )
    key = lambda r: (r["example_id"], r["position"])  # noqa: E731
    plain, a, b = read_token_rows(tmp_path / "plain"), read_token_rows(tmp_path / "a"), read_token_rows(tmp_path / "b")
    assert [key(r) for r in a] != [key(r) for r in plain], "rows were shuffled"
    assert [key(r) for r in a] == [key(r) for r in b], "deterministic whatever the threads"
    assert sorted(map(key, a)) == sorted(map(key, plain)), "same rows"
    by_key = {key(r): r for r in plain}
    for row in a:
        np.testing.assert_array_equal(row["layer_1"], by_key[key(row)]["layer_1"])


HOOKS = {
    "gpt2": ["transformer.h.1.mlp", "h.2.attn:input", "h.3", "h.0.mlp.c_fc"],
    "llama": ["model.layers.1.self_attn.o_proj", "layers.0.mlp", "layers.2", "layers.1.mlp.down_proj:input"],
}


def _reference_hooks(model, specs):
    """Plain forward hooks on the unpadded model: the ground truth for hook points."""
    captured, handles = {}, []
    modules = dict(model.named_modules())
    prefix = model.base_model_prefix + "."
    for spec in specs:
        path, is_input = (spec[:-6], True) if spec.endswith(":input") else (spec, False)
        path = path[len(prefix) :] if path.startswith(prefix) else path
        column = "hook_" + path.replace(".", "_") + ("_input" if is_input else "")
        if is_input:
            handles.append(
                modules[path].register_forward_pre_hook(
                    lambda m, a, k, c=column: captured.__setitem__(c, a[0] if a else next(iter(k.values()))),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(
                modules[path].register_forward_hook(
                    lambda m, a, o, c=column: captured.__setitem__(c, o[0] if isinstance(o, tuple) else o)
                )
            )
    return captured


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_hook_points_match_forward_hooks_on_the_plain_model(tmp_path, checkpoints, games_file, architecture):
    out = tmp_path / "out"
    specs = HOOKS[architecture]
    run_export(
        checkpoints[architecture],
        games_file,
        out,
        **{"model.layers": "[]", "model.hook_points": json.dumps(specs), "data.padding_side": "left"},
    )
    model = AutoModel.from_pretrained(checkpoints[architecture], dtype=torch.float32).eval()
    captured = _reference_hooks(model, specs)
    tokenizer = Reference(checkpoints[architecture]).tokenizer
    texts = _texts(games_file)
    rows = read_rows(out)
    expected_columns = {
        "gpt2": ["hook_h_0_mlp_c_fc", "hook_h_1_mlp", "hook_h_2_attn_input", "hook_h_3"],
        "llama": [
            "hook_layers_0_mlp",
            "hook_layers_1_mlp_down_proj_input",
            "hook_layers_1_self_attn_o_proj",
            "hook_layers_2",
        ],
    }[architecture]
    assert sorted(k for k in rows[0] if k.startswith("hook_")) == expected_columns
    for row in rows:
        with torch.no_grad():
            model(torch.tensor([tokenizer(texts[row["example_id"]])["input_ids"]]))
        columns = [k for k in row if k.startswith("hook_")]
        assert len(columns) == 4
        for column in columns:
            np.testing.assert_allclose(row[column], captured[column][0].numpy(), rtol=0, atol=1e-5)


def test_forward_stops_after_the_deepest_hooked_block(checkpoints):
    model = AutoModel.from_pretrained(checkpoints["gpt2"]).eval()
    _, blocks = find_blocks(model, 4)
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    from actlightning.model.capture import resolve_hook_points

    names = [n for n, _ in model.named_modules()]
    capture = HiddenStateCapture(
        model, blocks, [], hook_points=resolve_hook_points(["h.1.mlp"], names, "transformer", "h")
    )
    out = capture(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls == [0, 1] and out["hook_h_1_mlp"].shape == (1, 3, 32)
    calls.clear()
    capture.remove()
    capture = HiddenStateCapture(
        model, blocks, [1], hook_points=resolve_hook_points(["ln_f"], names, "transformer", "h")
    )
    capture(input_ids=torch.tensor([[5, 6, 7]]))
    assert calls == [0, 1, 2, 3], "a hook point outside the blocks needs the whole forward"


@pytest.mark.parametrize("layout", ["sequence", "token"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reader_round_trips_every_layout_and_dtype(tmp_path, checkpoints, games_file, layout, dtype):
    out = tmp_path / "out"
    run_export(
        checkpoints["gpt2"],
        games_file,
        out,
        **{"writer.layout": layout, "model.output_dtype": dtype, "model.layers": "[1, 4]"},
    )
    export = open_export(out)
    assert export.layout == layout and export.dtypes == {"layer_1": dtype, "layer_4": dtype}
    reference = {r["example_id"]: r for r in read_rows(out)} if layout == "sequence" else None
    dataset = export.dataset(cache_dir=str(tmp_path / "cache"))
    torch_dtype = getattr(torch, dtype)
    rows = export.rows
    assert len(dataset) == rows
    first = dataset[0]
    assert first["layer_1"].dtype == torch_dtype
    if layout == "sequence":
        assert first["layer_1"].shape == (len(first["input_ids"]), 32)
        np.testing.assert_array_equal(first["layer_1"].float().numpy(), reference[first["example_id"]]["layer_1"])
        assert rows == 40
    else:
        assert first["layer_1"].shape == (32,)
        assert rows == export.tokens
    batches = list(iter_token_batches(out, "layer_4", batch_size=64))
    assert all(b.dtype == torch_dtype and b.shape[1] == 32 for b in batches)
    assert sum(len(b) for b in batches) == export.tokens


def test_token_vectors_workers_cover_every_token_once(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(
        checkpoints["gpt2"],
        games_file,
        out,
        **{
            "writer.layout": "token",
            "model.layers": "[2]",
            "writer.batches_per_shard": 1,
            "model.output_dtype": "float32",
        },
    )
    everything = torch.cat(list(iter_token_batches(out, "layer_2", batch_size=1000)))
    loader = DataLoader(
        TokenVectors(out, "layer_2", batch_size=16, shuffle_buffer=100, seed=1), batch_size=None, num_workers=2
    )
    seen = torch.cat(list(loader))
    assert seen.shape == everything.shape
    key = lambda t: sorted(map(tuple, t[:, :4].tolist()))  # noqa: E731
    assert key(seen) == key(everything)
    assert not torch.equal(seen, everything), "shuffled"
    again = torch.cat(
        list(
            DataLoader(
                TokenVectors(out, "layer_2", batch_size=16, shuffle_buffer=100, seed=1), batch_size=None, num_workers=2
            )
        )
    )
    assert torch.equal(seen, again), "deterministic for a seed"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_read_shard_vectors_gives_each_rows_vectors_in_the_stored_dtype(tmp_path, checkpoints, games_file, dtype):
    from actlightning.read.reader import read_shard_vectors

    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], games_file, out, **{"model.output_dtype": dtype, "model.layers": "[2]"})
    rows = {r["example_id"]: r for r in read_rows(out)}
    for shard in sorted(out.glob("*.parquet")):
        vectors = read_shard_vectors(shard)
        ids = pq.read_table(shard, columns=["example_id"]).column(0).to_pylist()
        assert list(vectors) == ["layer_2"] and len(vectors["layer_2"]) == len(ids)
        for example, tensor in zip(ids, vectors["layer_2"], strict=True):
            assert tensor.dtype == getattr(torch, dtype)
            np.testing.assert_array_equal(tensor.float().numpy(), rows[example]["layer_2"])
