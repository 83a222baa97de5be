"""Shared hermetic fixtures: tiny checkpoints and datasets written to temp dirs, never downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from actlightning.face.demo import chess_games, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 (no pad token, no BOS), Llama (BOS added by the tokenizer) and Qwen2 (sliding-window
    layers, tied embeddings) checkpoints."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "gpt2": save_checkpoint(root / "gpt2", "gpt2", num_layers=4, hidden_size=32, context=128, seed=1),
        "llama": save_checkpoint(root / "llama", "llama", num_layers=3, hidden_size=32, context=128, seed=2),
        "qwen2": save_checkpoint(root / "qwen2", "qwen2", num_layers=4, hidden_size=32, context=128, seed=4),
    }


@pytest.fixture(scope="session")
def games_file(tmp_path_factory) -> Path:
    """40 chess games of 1 to 25 moves (mixed lengths) as JSON lines."""
    path = tmp_path_factory.mktemp("data") / "games.jsonl"
    with open(path, "w") as handle:
        for game in chess_games(40, seed=3, min_moves=1, max_moves=25):
            handle.write(json.dumps(game) + "\n")
    return path


@pytest.fixture(scope="session")
def saved_dataset(tmp_path_factory, games_file) -> Path:
    """The same games written with Dataset.save_to_disk."""
    from datasets import load_dataset

    folder = tmp_path_factory.mktemp("saved") / "games"
    load_dataset("json", data_files=str(games_file), split="train").save_to_disk(folder)
    return folder


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto) on 127.0.0.1 for this test session: ``http://127.0.0.1:PORT``."""
    from tests.s3 import start_server

    server, endpoint = start_server()
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, request):
    """A new, empty bucket on the session's S3 server."""
    from tests.s3 import Bucket

    return Bucket.create(s3_endpoint, request.node.name)
