"""Helpers for tests: run exports in-process or as a subprocess, and compute reference activations."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModel, AutoTokenizer

from actlightning.face.cli import ActLightningCLI, main
from actlightning.read.reader import column_vectors, stored_dtype, to_torch

REPO = Path(__file__).resolve().parents[1]


def export_args(checkpoint: Path, data_files: Path, output_dir: Path, **overrides) -> list[str]:
    """CLI arguments of an export of ``data_files`` (JSON lines of chess games) on CPU."""
    settings = {
        "model.checkpoint": str(checkpoint),
        "model.dtype": "float32",
        "data.path": "json",
        "data.data_files": str(data_files),
        "data.input_column": "Transcript",
        "data.batch_size": "4",
        "writer.output_dir": str(output_dir),
        "writer.batches_per_shard": "2",
        "trainer.accelerator": "cpu",
        "trainer.devices": "1",
        "trainer.enable_progress_bar": "false",
    }
    settings.update({k: str(v) for k, v in overrides.items()})
    args = ["predict"]
    for key, value in settings.items():
        args += [f"--{key}", value]
    return args


def run_export(*args, **kwargs) -> None:
    """Run an export in this process through the real CLI."""
    ActLightningCLI(args=export_args(*args, **kwargs))


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    """Run ``actlightning ARGS`` in this process through ``actlightning.face.cli.main``, as the console
    script does: the exit code, stdout and stderr come back as from a subprocess (without the ~5 s
    of imports a new interpreter pays)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m actlightning ARGS`` in a subprocess (for what only a new process shows:
    imports, several processes, signals)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "actlightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_rows(output_dir: Path) -> list[dict]:
    """Every exported row, ordered by example_id, layer columns as numpy [tokens, hidden]."""
    rows = []
    for path in sorted(output_dir.glob("*.parquet")):
        table = pq.read_table(path)
        layers = [name for name in table.column_names if name.startswith("layer_")]
        plain = table.drop_columns(layers).to_pylist()
        for name in layers:
            vectors, offsets = column_vectors(table.column(name))
            tensor = to_torch(vectors, stored_dtype(table.schema.field(name)))
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            for row, (start, stop) in zip(plain, zip(offsets[:-1], offsets[1:], strict=True), strict=True):
                row[name] = tensor[start:stop].numpy()
        rows.extend(plain)
    return sorted(rows, key=lambda r: r["example_id"])


def read_token_rows(output_dir: Path) -> list[dict]:
    """Every row of a token-layout export, in file order, vectors as float numpy ``[width]``."""
    rows = []
    for path in sorted(output_dir.glob("*.parquet")):
        table = pq.read_table(path)
        names = [name for name in table.column_names if name.startswith(("layer_", "hook_"))]
        plain = table.drop_columns(names).to_pylist()
        for name in names:
            vectors, _ = column_vectors(table.column(name))
            tensor = to_torch(vectors, stored_dtype(table.schema.field(name)))
            values = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
            for row, vector in zip(plain, values, strict=True):
                row[name] = vector
        rows.extend(plain)
    return rows


class Reference:
    """The model's own forward pass on one unpadded sequence."""

    def __init__(self, checkpoint: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self._seen: dict[str, tuple[list[int], list[np.ndarray]]] = {}

    def of(self, text: str) -> tuple[list[int], list[np.ndarray]]:
        """``text``'s tokens and hidden states, computed once per text (token-layout rows repeat it)."""
        if text not in self._seen:
            tokens = self.tokens(text)
            self._seen[text] = (tokens, self.hidden_states(tokens))
        return self._seen[text]

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    @torch.no_grad()
    def hidden_states(self, tokens: list[int]) -> list[np.ndarray]:
        out = self.model(torch.tensor([tokens]), output_hidden_states=True)
        return [h[0].numpy() for h in out.hidden_states]


def assert_rows_match_reference(
    rows: list[dict], texts: dict[int, str], checkpoint: Path, n_pos: int | None = None, atol: float = 1e-5
) -> None:
    """Every exported float32 vector equals the unpadded single-sequence forward (``texts`` by example_id)."""
    reference = Reference(checkpoint)
    for row in rows:
        tokens = reference.tokens(texts[row["example_id"]])
        start = 0 if n_pos is None else max(0, len(tokens) - n_pos)
        assert row["input_ids"] == tokens[start:]
        expected = reference.hidden_states(tokens)
        for name in (k for k in row if k.startswith("layer_")):
            np.testing.assert_allclose(row[name], expected[int(name.removeprefix("layer_"))][start:], rtol=0, atol=atol)
