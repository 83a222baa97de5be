"""Bad input ends with a clear message naming the setting, a non-zero exit, and no unusable files."""

from __future__ import annotations

import re

import pytest
import torch
from datasets import Dataset

from actlightning.face.cli import main
from tests.helpers import REPO, export_args, read_rows, run_cli, run_main

NO_DIR = "absent"


def _case(overrides=None, extra=None, rc=2, message="", out_state=NO_DIR, setup=None):
    return {
        "overrides": overrides or {},
        "extra": extra or [],
        "rc": rc,
        "message": message,
        "out_state": out_state,
        "setup": setup,
    }


def _file_instead_of_dir(out):
    out.write_text("not a folder")


def _foreign_files(out):
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _empty_dataset(out):
    path = out.parent / "empty.csv"
    path.write_text("Transcript,WhiteElo\n")  # a header and no rows
    return {"data.path": "csv", "data.data_files": str(path)}


def _bad_yaml(out):
    path = out.parent / "bad.yaml"
    path.write_text("model:\n  checkpoint: [unclosed\n")
    return ["--config", str(path)]


CASES = {
    "missing-input-column": _case(
        {"data.input_column": "Nope"}, message="column(s) ['Nope'] not in the dataset; its columns are"
    ),
    "missing-label-column": _case(
        {"data.label_columns": "[WhiteElo, Elo]"}, message="column(s) ['Elo'] not in the dataset"
    ),
    "input-not-text": _case(
        {"data.input_column": "WhiteElo"}, message="data.input_column 'WhiteElo' holds int64; it must hold text"
    ),
    "label-named-like-output": _case(
        {"data.label_columns": "[input_ids]"}, message="data.label_columns contains 'input_ids'"
    ),
    "label-named-like-layer": _case(
        {"data.label_columns": "[layer_3]"}, message="data.label_columns contains 'layer_3'"
    ),
    "layer-out-of-range": _case(
        {"model.layers": "[40]"}, message="model.layers contains 40, out of range for a model with 4 layers"
    ),
    "duplicate-layers": _case(
        {"model.layers": "[1, -4]"}, message="model.layers names hidden_states index [1] more than once"
    ),
    "nothing-to-export": _case({"model.layers": "[]"}, message="model.layers is empty and model.hook_points unset"),
    "unknown-hook-point": _case(
        {"model.hook_points": "[h.1.mpl]"},
        message="model.hook_points: no submodule 'h.1.mpl' in this model; close matches: ['h.1.mlp'",
    ),
    "shuffle-without-token-layout": _case(
        {"writer.shuffle_buffer": 4}, message="writer.shuffle_buffer shuffles token rows: it needs writer.layout: token"
    ),
    "n-pos-zero": _case({"model.n_pos": 0}, message="model.n_pos must be a positive"),
    "n-pos-above-context": _case(
        {"model.n_pos": 1000}, message="model.n_pos is 1000, above the model's context size 128"
    ),
    "max-length-above-context": _case(
        {"data.max_length": 1000}, message="data.max_length is 1000, above the model's context size 128"
    ),
    "batch-size-zero": _case({"data.batch_size": 0}, message="data.batch_size must be a positive integer"),
    "batches-per-shard-zero": _case(
        {"writer.batches_per_shard": 0}, message="writer.batches_per_shard must be a positive integer"
    ),
    "max-shards-zero": _case({"writer.max_shards": 0}, message="writer.max_shards must be a positive integer"),
    "unknown-dtype": _case({"model.dtype": "float8"}, message='Parser key "model.dtype": Expected a typing.Literal'),
    "unknown-output-dtype": _case({"model.output_dtype": "int8"}, message="int8"),
    "level-without-zstd": _case(
        {"writer.compression": "lz4", "writer.compression_level": 3},
        message="writer.compression_level is set (3) but writer.compression is 'lz4'",
    ),
    "level-out-of-range": _case(
        {"writer.compression": "zstd", "writer.compression_level": 30},
        message="writer.compression_level must be 1..22 for zstd, got 30",
    ),
    "num-proc-zero": _case({"data.num_proc": 0}, message="data.num_proc must be a positive integer or unset, got 0"),
    "unknown-vector-encoder": _case({"writer.vector_encoder": "fast"}, message='Parser key "writer.vector_encoder"'),
    "checkpoint-missing": _case(
        {"model.checkpoint": "/nonexistent/model"}, message="model.checkpoint '/nonexistent/model' is not a folder"
    ),
    "hub-id-offline": _case(
        {"model.checkpoint": "someone/not-cached"}, message="model.checkpoint 'someone/not-cached' could not be loaded"
    ),
    "split-missing": _case(
        {"data.split": "test"}, message="data.split 'test' does not exist; the splits are ['train']"
    ),
    "dataset-missing": _case(
        {"data.path": "/nonexistent/data", "data.data_files": "null"},
        message="data.path '/nonexistent/data' (data.split 'train') could not be loaded",
    ),
    "empty-dataset": _case(message="is empty: there is nothing to export", setup=_empty_dataset),
    "filtered-to-nothing": _case({"data.min_tokens": 100000}, message="no examples left to export"),
    "output-dir-is-a-file": _case(
        message="exists and is not a directory", out_state="file", setup=_file_instead_of_dir
    ),
    "output-dir-foreign-files": _case(
        message="is not empty and holds no export of this tool", out_state=["notes.txt"], setup=_foreign_files
    ),
    "malformed-yaml": _case(message="did not find expected ',' or ']'", setup=_bad_yaml),
    "unknown-key": _case(extra=["--data.no_such_key", "1"], message="unrecognized setting --data.no_such_key"),
    "mistyped-key": _case(
        extra=["--writer.outputdir", "x"], message="--writer.outputdir (did you mean --writer.output_dir?)"
    ),
}
# A few cases also run as a real `python -m actlightning` process; the rest run in-process (same code,
# without a new interpreter's imports).
SUBPROCESS_CASES = {"checkpoint-missing", "mistyped-key"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_clearly_through_the_cli(tmp_path, checkpoints, games_file, name):
    case = CASES[name]
    out = tmp_path / "out"
    overrides = dict(case["overrides"])
    extra = list(case["extra"])
    if case["setup"] is not None:
        made = case["setup"](out)
        if isinstance(made, dict):
            overrides.update(made)
        elif isinstance(made, list):
            extra += made
    args = export_args(checkpoints["gpt2"], games_file, out, **overrides)
    args = args[:1] + extra + args[1:]
    result = run_cli(args) if name in SUBPROCESS_CASES else run_main(args)
    assert result.returncode == case["rc"], result.stderr[-3000:]
    assert case["message"] in result.stderr, result.stderr[-3000:]
    if case["out_state"] == NO_DIR:
        assert not out.exists()
    elif case["out_state"] == "file":
        assert out.read_text() == "not a folder"
    else:
        assert sorted(p.name for p in out.iterdir()) == case["out_state"]
    assert "Traceback" not in result.stderr, "a settings mistake is one line, not a stack trace"
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and error_lines[0].startswith("actlightning: error: "), result.stderr[-3000:]
    assert "usage:" not in result.stderr, "no usage text before the error"


def test_output_dir_holding_another_export_is_refused(tmp_path, checkpoints, games_file):
    out = tmp_path / "out"
    assert run_main(export_args(checkpoints["gpt2"], games_file, out, **{"model.layers": "[1]"})).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    result = run_main(export_args(checkpoints["gpt2"], games_file, out, **{"model.layers": "[2]"}))
    assert result.returncode == 2
    assert "holds an export with different settings (model.layers)" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.fixture(scope="module")
def huge_checkpoint(tmp_path_factory, checkpoints):
    """The tiny GPT-2 with embeddings scaled past float16's range (|x| > 65504)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("huge")
    model = AutoModelForCausalLM.from_pretrained(checkpoints["gpt2"])
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e7)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(checkpoints["gpt2"]).save_pretrained(folder)
    return folder


def test_float16_overflow_stops_with_layer_and_count(tmp_path, huge_checkpoint, games_file):
    out = tmp_path / "out"
    result = run_main(
        export_args(huge_checkpoint, games_file, out, **{"model.output_dtype": "float16", "model.layers": "[0]"})
    )
    assert result.returncode == 1
    assert "model.output_dtype float16 cannot hold layer_0" in result.stderr
    assert "use output_dtype float32 or bfloat16" in result.stderr
    assert not list(out.glob("*.parquet")) and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # bfloat16 storage keeps float32's range
    assert (
        run_main(
            export_args(
                huge_checkpoint,
                games_file,
                tmp_path / "bf16",
                **{"model.output_dtype": "bfloat16", "model.layers": "[0]", "writer.max_shards": 1},
            )
        ).returncode
        == 0
    )


def test_nan_activations_are_reported_never_written(tmp_path, checkpoints, games_file, monkeypatch, capsys):
    from actlightning.model.capture import HiddenStateCapture

    original = HiddenStateCapture.__call__

    def with_nan(self, **inputs):
        hidden = original(self, **inputs)
        hidden["layer_2"] = hidden["layer_2"].clone()
        hidden["layer_2"][0, 0, 0] = float("nan")
        return hidden

    monkeypatch.setattr(HiddenStateCapture, "__call__", with_nan)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(export_args(checkpoints["gpt2"], games_file, out, **{"model.layers": "[1, 2]"}))
    assert exit_info.value.code == 1
    assert "NaN/inf values in hidden_states[2] (layer_2)" in capsys.readouterr().err
    assert not list(out.glob("*.parquet"))


def test_pretokenized_input_ids_column_is_used_as_is(tmp_path, checkpoints):
    folder = tmp_path / "tokens"
    sequences = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    Dataset.from_dict({"input_ids": sequences, "label": ["a", "b", "c"]}).save_to_disk(folder)
    out = tmp_path / "out"
    result = run_main(
        export_args(
            checkpoints["gpt2"],
            folder,
            out,
            **{"data.path": str(folder), "data.input_column": "input_ids", "data.label_columns": "[label]"},
        )
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["input_ids"] for r in read_rows(out)] == sequences


def _readme_error_fragments() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Common errors", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [fragment for row in rows for fragment in re.findall(r"`([^`]+)`", row.split(" | ")[0])]


def test_readme_error_table_quotes_messages_the_tests_assert():
    """Each message in the README's error table is asserted, word for word, by a test."""
    fragments = _readme_error_fragments()
    assert len(fragments) >= 25
    tests_source = "\n".join(p.read_text() for p in sorted((REPO / "tests").glob("test_*.py")))
    for fragment in fragments:
        assert fragment in tests_source, f"README error {fragment!r} is asserted by no test"
