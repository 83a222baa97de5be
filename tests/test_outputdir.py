"""The output-folder policy and the cost arithmetic, without a Trainer."""

from __future__ import annotations

import numpy as np
import pytest

from actlightning.errors import ConfigError
from actlightning.files.manifest import FORMAT_VERSION, MANIFEST, manifest_bytes
from actlightning.files.shard_file import shard_name, tmp_name
from actlightning.files.storage import LocalLocation
from actlightning.writer.cost import bytes_per_token, exported_tokens
from actlightning.writer.outputdir import clean_output_dir, inspect_output_dir

SETTINGS = {"model": {"layers": [1]}, "max_shards": None}


def _export(folder, complete: bool, settings=SETTINGS, version=FORMAT_VERSION):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / shard_name(0, 0)).write_bytes(b"PAR1")
    manifest = {"format_version": version, "complete": complete, "settings": settings}
    LocalLocation(folder).write_bytes(MANIFEST, manifest_bytes(manifest))


def test_absent_or_empty_folder_is_new(tmp_path):
    assert inspect_output_dir(tmp_path / "absent", SETTINGS, overwrite=False) == "new"
    assert inspect_output_dir(tmp_path, SETTINGS, overwrite=False) == "new"


def test_same_settings_resume_or_are_complete(tmp_path):
    _export(tmp_path / "a", complete=False)
    _export(tmp_path / "b", complete=True)
    assert inspect_output_dir(tmp_path / "a", SETTINGS, overwrite=False) == "resume"
    assert inspect_output_dir(tmp_path / "b", SETTINGS, overwrite=False) == "complete"


def test_other_settings_foreign_files_and_old_formats_are_refused(tmp_path):
    _export(tmp_path / "a", complete=False)
    with pytest.raises(ConfigError, match=r"different settings \(model.layers\)"):
        inspect_output_dir(tmp_path / "a", {**SETTINGS, "model": {"layers": [2]}}, overwrite=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no export of this tool"):
        inspect_output_dir(tmp_path / "b", SETTINGS, overwrite=False)
    with pytest.raises(ConfigError, match="files this tool did not write"):
        inspect_output_dir(tmp_path / "b", SETTINGS, overwrite=True)
    _export(tmp_path / "c", complete=False, version=1)
    with pytest.raises(ConfigError, match="file format 1"):
        inspect_output_dir(tmp_path / "c", SETTINGS, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        inspect_output_dir(tmp_path / "file", SETTINGS, overwrite=False)


def test_overwrite_and_resume_delete_only_what_they_should(tmp_path):
    folder = tmp_path / "out"
    _export(folder, complete=False)
    (folder / tmp_name(shard_name(1, 0))).write_bytes(b"half")
    (folder / "notes.txt").write_text("mine")
    clean_output_dir(folder, "resume")
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, "notes.txt", shard_name(0, 0)])
    (folder / "notes.txt").unlink()
    assert inspect_output_dir(folder, {"other": 1}, overwrite=True) == "overwrite"
    clean_output_dir(folder, "overwrite")
    assert list(folder.iterdir()) == []


def test_cost_per_token_by_dtype_and_layout():
    widths = {"layer_1": 32, "hook_h_0_mlp": 128}
    assert bytes_per_token(widths, "float16", "sequence") == 160 * 2 + 4
    assert bytes_per_token(widths, "bfloat16", "sequence") == 160 * 2 + 4  # 2-byte binaries
    assert bytes_per_token(widths, "float32", "token") == 160 * 4 + 4 + 12
    assert exported_tokens(np.array([3, 10, 1]), 4).tolist() == [3, 4, 1]
    assert exported_tokens(np.array([3, 10]), None).tolist() == [3, 10]
