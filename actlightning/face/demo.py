"""Tiny, deterministic models, tokenizers and chess datasets, built offline.

``python -m actlightning.face.demo FOLDER`` writes the demo checkpoint and dataset that ``configs/demo.yaml``
uses; the tests build their fixtures with the same functions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# Characters of UCI move transcripts ("e2e4 e7e5 g1f3 ..."), plus room for other text in tests.
ALPHABET = " abcdefghijklmnopqrstuvwxyz0123456789;.,:-+#=/!?ABCDEFGHIJKLMNOPQRSTUVWXYZé€"
Architecture = Literal["gpt2", "llama", "qwen2"]


def char_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer; with ``add_bos`` it prepends ``<s>`` like Llama's. No pad token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in ALPHABET:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model(
    architecture: Architecture = "gpt2",
    vocab_size: int = 96,
    num_layers: int = 4,
    hidden_size: int = 32,
    context: int = 256,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM of the given architecture."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config: PretrainedConfig
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=context,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        # Llama's settings; Qwen2 shares them.
        common: dict[str, Any] = {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": context,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if architecture == "llama":
            config = LlamaConfig(**common)
        else:
            # Per-layer attention types and tied embeddings: what truncated loading must keep right.
            config = Qwen2Config(
                **common,
                tie_word_embeddings=True,
                use_sliding_window=True,
                sliding_window=8,
                max_window_layers=num_layers // 2,
            )
    return AutoModelForCausalLM.from_config(config).eval()


def save_checkpoint(folder: Path, architecture: Architecture = "gpt2", **model_kwargs) -> Path:
    """Save a tiny model and its tokenizer to ``folder`` (loadable with ``from_pretrained``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(architecture, **model_kwargs).save_pretrained(folder)
    char_tokenizer(add_bos=architecture == "llama").save_pretrained(folder)
    return folder


_FILES = "abcdefgh"
_PIECES = "nbrq"


def _random_move(rng: random.Random) -> str:
    move = f"{rng.choice(_FILES)}{rng.randint(1, 8)}{rng.choice(_FILES)}{rng.randint(1, 8)}"
    return move + rng.choice(_PIECES) if rng.random() < 0.01 else move


def chess_games(count: int, seed: int = 0, min_moves: int = 2, max_moves: int = 60) -> list[dict]:
    """Synthetic games shaped like lichess-uci rows: a transcript of UCI moves and label columns."""
    rng = random.Random(seed)
    games = []
    for index in range(count):
        moves = " ".join(_random_move(rng) for _ in range(rng.randint(min_moves, max_moves)))
        games.append(
            {
                "Site": f"https://lichess.org/{index:08x}",
                "Transcript": moves,
                "WhiteElo": rng.randint(800, 2800),
                "BlackElo": rng.randint(800, 2800),
                "Scores": [round(rng.uniform(-3, 3), 2) for _ in range(3)],
            }
        )
    return games


def build_demo(folder: Path, games: int = 256) -> Path:
    """Write ``folder/model`` (tiny GPT-2 + tokenizer) and ``folder/games.jsonl``."""
    folder = Path(folder)
    save_checkpoint(folder / "model", "gpt2", num_layers=4, hidden_size=64, context=512)
    with open(folder / "games.jsonl", "w") as handle:
        for game in chess_games(games, seed=0, max_moves=100):
            handle.write(json.dumps(game) + "\n")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, help="where to write the demo checkpoint and dataset")
    parser.add_argument("--games", type=int, default=256)
    arguments = parser.parse_args()
    print(build_demo(arguments.folder, arguments.games))
