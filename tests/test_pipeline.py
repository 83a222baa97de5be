"""The data pipeline end to end: every selection and batching option at once, and out-of-memory handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import actlightning.data.module
from actlightning.model.capture import HiddenStateCapture
from tests.helpers import assert_rows_match_reference, read_rows, run_export


@pytest.fixture
def messy_games(tmp_path, games_file):
    """The games plus exact duplicates, cut-short games (prefixes), prefixes of prefixes and empty inputs."""
    games = [json.loads(line) for line in games_file.read_text().splitlines()]
    extra = []
    for i in range(0, 30, 3):
        extra.append(dict(games[i]))  # duplicate
        cut = dict(games[i + 1], Transcript=games[i + 1]["Transcript"][:9])
        extra.append(cut)  # prefix
        extra.append(dict(cut, Transcript=cut["Transcript"][:4]))  # prefix of a prefix
    extra.append(dict(games[0], Transcript=""))
    rows = games + extra
    path = tmp_path / "messy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _expected_ids(rows, seed, limit):
    ids = [i for i, r in enumerate(rows) if r["WhiteElo"] >= 1400]
    first = {}
    for i in ids:
        first.setdefault(rows[i]["Transcript"], i)
    ids = sorted(first.values())
    texts = [rows[i]["Transcript"] for i in ids]
    ids = [i for i, t in zip(ids, texts, strict=True) if not any(len(u) > len(t) and u.startswith(t) for u in texts)]
    ids = [i for i in ids if rows[i]["Transcript"]]
    return sorted(np.asarray(ids)[np.random.default_rng(seed).permutation(len(ids))[:limit]].tolist())


def test_every_selection_option_at_once(tmp_path, checkpoints, messy_games):
    path, rows = messy_games
    out = tmp_path / "out"
    run_export(
        checkpoints["gpt2"],
        path,
        out,
        **{
            "data.filter": "tests.filter_fixtures.high_white_elo",
            "data.dedupe": "true",
            "data.drop_prefixes": "true",
            "data.shuffle_seed": 0,
            "data.limit": 15,
            "data.sort_by_length": "true",
            "data.sort_reversed": "true",
            "data.bucket_size": 8,
            "data.batch_order_seed": 1,
            "data.max_tokens": 200,
            "data.batch_size": 6,
            "model.layers": "[0, 2, 4]",
        },
    )
    exported = read_rows(out)
    ids = [r["example_id"] for r in exported]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == _expected_ids(rows, seed=0, limit=15)
    assert_rows_match_reference(exported, {i: r["Transcript"] for i, r in enumerate(rows)}, checkpoints["gpt2"])
    manifest = json.loads((out / "manifest.json").read_text())
    removed = manifest["data"]["removed"]
    assert removed["dedupe"] > 0 and removed["drop_prefixes"] > 0 and removed["filter"] > 0
    assert removed["limit"] > 0
    assert 0 < manifest["data"]["padding_efficiency"] <= 1


def test_min_and_max_tokens_per_sequence_filter_before_truncation(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    run_export(
        checkpoints["gpt2"],
        games_file,
        out,
        **{"data.min_tokens": 20, "data.max_tokens_per_sequence": 80, "data.max_length": 30, "model.layers": "[1]"},
    )
    games = [json.loads(line) for line in games_file.read_text().splitlines()]
    expected = [i for i, g in enumerate(games) if 20 <= len(g["Transcript"]) <= 80]  # char-level tokenizer
    exported = read_rows(out)
    assert [r["example_id"] for r in exported] == expected
    assert all(len(r["input_ids"]) == min(30, len(games[r["example_id"]]["Transcript"])) for r in exported)


def _oom_above(monkeypatch, max_rows: int) -> list[int]:
    """Make the forward raise CUDA's out-of-memory error for batches of more than ``max_rows`` rows."""
    original = HiddenStateCapture.__call__
    seen = []

    def flaky(self, **inputs):
        rows = inputs["input_ids"].shape[0]
        seen.append(rows)
        if rows > max_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, **inputs)

    monkeypatch.setattr(HiddenStateCapture, "__call__", flaky)
    return seen


def test_out_of_memory_batch_is_split_and_retried_never_dropped(tmp_path, checkpoints, games_file, monkeypatch):
    settings = {"data.batch_size": 8, "model.layers": "[2]", "data.sort_by_length": "true"}
    run_export(checkpoints["gpt2"], games_file, tmp_path / "plain", **settings)
    seen = _oom_above(monkeypatch, 3)
    run_export(checkpoints["gpt2"], games_file, tmp_path / "split", **settings)
    assert max(seen) == 8 and 2 in seen
    plain, split = read_rows(tmp_path / "plain"), read_rows(tmp_path / "split")
    assert [r["example_id"] for r in split] == [r["example_id"] for r in plain] == list(range(40))
    # Halves are other batch shapes: float32 matmuls may round differently, so compare with the
    # fidelity tests' tolerance (and both exports are checked against the unpadded forward).
    for a, b in zip(plain, split, strict=True):
        np.testing.assert_allclose(a["layer_2"], b["layer_2"], rtol=0, atol=1e-5)
    texts = {i: json.loads(line)["Transcript"] for i, line in enumerate(games_file.read_text().splitlines())}
    assert_rows_match_reference(split, texts, checkpoints["gpt2"])


@pytest.mark.parametrize("budget", [False, True])
def test_batch_size_search_finds_largest_fitting_size(tmp_path, checkpoints, games_file, monkeypatch, budget):
    monkeypatch.setattr(actlightning.data.module, "batch_size_search_applies", lambda device: True)
    seen = _oom_above(monkeypatch, 5)
    settings = {"data.batch_size": 32, "data.auto_find_batch_size": "true", "model.layers": "[1]"}
    if budget:
        settings["data.max_tokens"] = 100_000
    run_export(checkpoints["gpt2"], games_file, tmp_path / "out", **settings)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    if budget:
        longest = max(len(json.loads(line)["Transcript"]) for line in games_file.read_text().splitlines())
        assert manifest["data"]["max_tokens"] // longest <= 5
    else:
        assert manifest["data"]["batch_size"] == 4
    assert max(seen[-5:]) <= 5, "the run itself used the size found"
    assert [r["example_id"] for r in read_rows(tmp_path / "out")] == list(range(40))


def test_batch_size_search_is_skipped_on_cpu(tmp_path, checkpoints, games_file, caplog):
    run_export(
        checkpoints["gpt2"],
        games_file,
        tmp_path / "out",
        **{"data.auto_find_batch_size": "true", "model.layers": "[1]"},
    )
    assert "does not apply" in caplog.text


def test_rows_beyond_the_context_are_truncated_and_counted(tmp_path, checkpoints):
    path = tmp_path / "long.jsonl"
    texts = ["e2e4 " * 60, "d2d4 d7d5", "a" * 128]  # 300, 9 and exactly 128 tokens; context is 128
    path.write_text("".join(json.dumps({"Transcript": t, "WhiteElo": 1500}) + "\n" for t in texts))
    out = tmp_path / "out"
    run_export(checkpoints["gpt2"], path, out, **{"model.layers": "[-1]"})
    rows = read_rows(out)
    assert [len(r["input_ids"]) for r in rows] == [128, 9, 128]
    assert json.loads((out / "manifest.json").read_text())["data"]["truncated"] == 1
    assert_rows_match_reference(rows, {i: t[:128] for i, t in enumerate(texts)}, checkpoints["gpt2"])
