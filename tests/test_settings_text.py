"""One source for each setting's text: the docstrings (what --help shows); the README's tables and the
configs' comments must name exactly the settings that exist."""

from __future__ import annotations

import inspect
import re

import pytest
import yaml

from actlightning import ActivationDataModule, ActivationModule, ParquetShardWriter
from tests.helpers import REPO

SECTIONS = {"model": ActivationModule, "data": ActivationDataModule, "writer": ParquetShardWriter}
# Set by the CLI from model.checkpoint / model.revision (link_arguments), not by users.
LINKED = {"data": {"tokenizer", "tokenizer_revision"}}


def _settings(section: str) -> set[str]:
    parameters = inspect.signature(SECTIONS[section].__init__).parameters
    return {name for name in parameters if name != "self"} - LINKED.get(section, set())


def _readme_table_keys(section: str) -> set[str]:
    readme = (REPO / "README.md").read_text()
    body = readme.split(f"### `{section}`", 1)[1].split("\n### ", 1)[0]
    keys = set()
    for row in body.splitlines():
        if row.startswith("| `"):
            keys |= set(re.findall(r"`([a-z_]+)`", row.split(" | ")[0]))
    return keys


@pytest.mark.parametrize("section", list(SECTIONS))
def test_readme_table_names_every_setting_and_no_other(section):
    assert _readme_table_keys(section) == _settings(section)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_setting_is_documented_where_it_is_declared(section):
    docstring = inspect.getdoc(SECTIONS[section]) or ""
    documented = set(re.findall(r"^ {4}(\w+):", docstring, flags=re.M))
    assert _settings(section) <= documented, sorted(_settings(section) - documented)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_set_every_setting_and_no_other(config):
    loaded = yaml.safe_load(config.read_text())
    for section in SECTIONS:
        assert set(loaded[section]) == _settings(section), (config.name, section)
