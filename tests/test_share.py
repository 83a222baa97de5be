"""Sharing and inspecting exports: the verbs, ``inspect``, ``publish`` (through the recording stand-in
``tests.hub.FolderHub``: no Hub is reachable here) and ``hf://`` URLs."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actlightning.face import inspect as inspect_verb
from actlightning.face import publish as publish_verb
from actlightning.face.publish import Target, publish
from tests.helpers import REPO, read_rows, run_export
from tests.hub import FolderHub

HEAVY = ("lightning", "transformers", "torch", "datasets")


@pytest.fixture(scope="module")
def export(tmp_path_factory, checkpoints, games_file) -> Path:
    """A small complete export (two layers, labels, 5 shards)."""
    out = tmp_path_factory.mktemp("share") / "export"
    run_export(
        checkpoints["gpt2"], games_file, out, **{"model.layers": "[1, 3]", "data.label_columns": "[WhiteElo, Site]"}
    )
    return out


@pytest.fixture
def hub(tmp_path):
    FolderHub.reset(tmp_path / "hub")
    return FolderHub


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "actlightning", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


def test_help_lists_the_verbs_and_an_unknown_verb_is_one_line():
    result = _run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: actlightning VERB")
    for verb in ("predict", "publish", "inspect", "report"):
        assert f"\n  {verb} " in result.stdout
    wrong = _run("exprot")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "unknown verb 'exprot'" in wrong.stderr


@pytest.mark.parametrize("verb", ["inspect", "publish"])
def test_light_verbs_import_neither_lightning_transformers_nor_torch(export, verb):
    args = [str(export)] if verb == "inspect" else [str(export), "me/acts", "--dry_run"]
    code = (
        "import sys; from actlightning.face.verbs import main\n"
        f"try:\n    main({[verb, *args]!r})\nfinally:\n"
        f"    print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_inspect_shows_what_the_export_holds(export, capsys):
    inspect_verb.main([str(export)])
    text = capsys.readouterr().out
    manifest = json.loads((export / "manifest.json").read_text())
    assert text.splitlines()[0] == f"{export}: complete"
    assert f"{manifest['totals']['tokens']:,} tokens" in text and "layout sequence" in text
    assert "layer_1: float32 x 32" in text and "WhiteElo: int64" in text
    assert "model.layers=[1, 3]" in text and "data.label_columns=['WhiteElo', 'Site']" in text
    assert "data.batch_size" not in text  # not a setting that defines the export
    inspect_verb.main([str(export), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] and info["shards"] == manifest["totals"]["shards"] and info["missing_shards"] == 0
    assert info["columns"]["layer_3"] == {"dtype": "float32", "width": 32}
    assert info["model"]["layers"] == [1, 3] and info["dataset"]["input_column"] == "Transcript"


def _unfinished_copy(export: Path, folder: Path) -> dict:
    """A copy of ``export`` whose manifest says it is unfinished; returns the manifest."""
    folder.mkdir()
    for path in export.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    return manifest


def test_inspect_counts_missing_shards_and_reads_one_footer(export, tmp_path, monkeypatch, capsys):
    partial = tmp_path / "partial"
    manifest = _unfinished_copy(export, partial)
    sorted(partial.glob("shard-*.parquet"))[-1].unlink()
    from actlightning.files.storage import LocalLocation

    opened = []
    original = LocalLocation.open
    monkeypatch.setattr(LocalLocation, "open", lambda self, name: opened.append(name) or original(self, name))
    inspect_verb.main([str(partial)])
    assert f"incomplete, 1 shard of {manifest['plan']['estimated_shards']} missing" in capsys.readouterr().out
    assert len(opened) == 1, "one shard's schema, not every footer"


def test_publish_dry_run_lists_files_and_touches_no_network(export, capsys, monkeypatch):
    monkeypatch.setattr(publish_verb, "Hub", None)  # any use of the network would fail
    monkeypatch.setenv("HF_TOKEN", "hf_secretTokenThatMustNotShow")
    publish_verb.main([str(export), "me/acts", "--dry_run", "--path_in_repo", "gpt2/layers-1-3"])
    text = capsys.readouterr().out
    shards = sorted(p.name for p in export.glob("shard-*.parquet"))
    for name in [*shards, "manifest.json", "config.yaml"]:
        assert f"gpt2/layers-1-3/{name}  " in text
    assert "README.md  (the card" in text and "total " in text and "hf_secret" not in text


def test_publish_refuses_an_incomplete_export_in_one_line(export, tmp_path, hub, capsys):
    partial = tmp_path / "partial"
    _unfinished_copy(export, partial)
    with pytest.raises(SystemExit) as exit_:
        publish_verb.main([str(partial), "me/acts"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not complete" in error and "--allow_incomplete" in error
    assert publish(str(partial), Target("me/acts", None, None), allow_incomplete=True, hub=hub).startswith("published")


def _data_files(repo: Path, card_config: dict) -> list[str]:
    pattern = card_config["data_files"][0]["path"]
    return sorted(
        str(p.relative_to(repo)) for p in repo.rglob("*.parquet") if fnmatch.fnmatch(str(p.relative_to(repo)), pattern)
    )


def test_published_exports_load_by_name_with_their_features(export, tmp_path, hub, checkpoints, games_file):
    """Two exports side by side (--path_in_repo): the root card declares a config for each, whose
    data_files are exactly its shards, and load_dataset reads each with the export's rows."""
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    other = tmp_path / "other"
    run_export(checkpoints["gpt2"], games_file, other, **{"model.layers": "[2]", "writer.max_shards": 2})
    assert publish(str(export), Target("me/acts", None, "layers-1-3"), hub=hub).endswith("'layers-1-3')")
    publish(str(other), Target("me/acts", None, "layer-2"), private=True, hub=hub)
    repo = hub.root / "me/acts"
    card = DatasetCard((repo / "README.md").read_text())
    configs = {c["config_name"]: c for c in card.data.to_dict()["configs"]}
    assert set(configs) == {"layers-1-3", "layer-2"}
    assert _data_files(repo, configs["layers-1-3"]) == sorted(f"layers-1-3/{p.name}" for p in export.glob("*.parquet"))
    assert (repo / "layers-1-3" / "manifest.json").exists() and (repo / "layer-2" / "README.md").exists()
    assert "Mean token norm per column" in (repo / "layers-1-3" / "README.md").read_text()  # the statistics
    for name, source in (("layers-1-3", export), ("layer-2", other)):
        loaded = load_dataset(str(repo), name, split="train")
        expected = read_rows(source)
        assert sorted(loaded["example_id"]) == [r["example_id"] for r in expected]
        local = load_dataset("parquet", data_files=str(source / "*.parquet"), split="train")
        assert loaded.features == local.features
    assert ("create_repo", "me/acts", True) in hub.calls
    uploads = [c for c in hub.calls if c[0] == "upload"]
    assert uploads[-1][2] == ["README.md"], "the card goes last"


def test_publish_to_the_root_loads_without_a_name_and_keeps_the_token_out(export, hub, monkeypatch, capsys):
    from datasets import load_dataset

    monkeypatch.setenv("HF_TOKEN", "hf_secretTokenThatMustNotShow")
    monkeypatch.setattr(publish_verb, "Hub", hub)
    publish_verb.main([str(export), "me/root", "--revision", "v1"])
    out = capsys.readouterr()
    assert "hf_secret" not in out.out + out.err
    repo = hub.root / "me/root"
    assert ("create_branch", "me/root", "v1") in hub.calls
    assert len(load_dataset(str(repo), split="train")) == len(read_rows(export))
    assert all("hf_secret" not in p.read_text(errors="ignore") for p in repo.rglob("*") if p.suffix != ".parquet")


def test_bucket_export_publishes_a_few_files_at_a_time_and_resumes(export, bucket, hub, monkeypatch):
    import fsspec

    fs = fsspec.filesystem("s3", **bucket.options)
    for path in export.iterdir():
        fs.put_file(str(path), f"{bucket.name}/export/{path.name}")
    monkeypatch.setattr(publish_verb, "STAGED_SHARDS", 2)
    target = Target("me/from-s3", None, None)
    hub.fail_after = 2  # the connection drops on the third upload
    with pytest.raises(ConnectionError):
        publish(bucket.url("export"), target, storage_options=bucket.options, hub=hub)
    first = [c[2] for c in hub.calls if c[0] == "upload"]
    hub.fail_after = None
    publish(bucket.url("export"), target, storage_options=bucket.options, hub=hub)
    second = [c[2] for c in hub.calls if c[0] == "upload"][len(first) :]
    assert all(len(names) <= 2 for names in first + second)
    assert not set(sum(first, [])) & set(sum(second[:-1], [])), "files already there are not uploaded again"
    repo = hub.root / "me/from-s3"
    assert sorted(p.name for p in repo.glob("*.parquet")) == sorted(p.name for p in export.glob("*.parquet"))


def test_hf_urls_open_through_fsspecs_hub_filesystem():
    from huggingface_hub import HfFileSystem

    from actlightning.files.storage import open_location

    location = open_location("hf://datasets/me/acts/layers-1-3")
    assert isinstance(location.fs, HfFileSystem) and location.root == "datasets/me/acts/layers-1-3"
    assert location.path("manifest.json") == "hf://datasets/me/acts/layers-1-3/manifest.json"


def test_readme_documents_the_verbs_and_what_was_tested_against_the_real_hub():
    readme = (REPO / "README.md").read_text()
    for text in ("actlightning publish", "actlightning inspect", "--path_in_repo", "hf://datasets/", "not tested"):
        assert text in readme, text
    assert os.path.exists(REPO / "tests" / "hub.py")
