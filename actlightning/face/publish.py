"""``actlightning publish EXPORT REPO_ID``: an export as a Hugging Face dataset repository, so that
collaborators run ``load_dataset(REPO_ID)`` (or ``load_dataset(REPO_ID, NAME)`` for one of several
exports side by side, ``--path_in_repo``).

The upload is ``huggingface_hub``'s ``upload_folder``: parallel, resumable (rerun after a cut and
committed files are skipped, uploaded data deduplicated). The card goes last, so a repository whose
card names an export holds all of it. The token is wherever ``huggingface_hub`` looks (``HF_TOKEN``,
``hf auth login``); this command never reads, prints or writes it. Every call that reaches the
network goes through ``Hub``, one small class (the tests replace it with a recording stand-in).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from actlightning.errors import ConfigError
from actlightning.files.manifest import CARD, CONFIG, MANIFEST, REPORT, STATS, read_manifest, shard_names
from actlightning.files.storage import Location, open_location
from actlightning.humanize import human_bytes, plural
from actlightning.writer.card import card_of

# Shards of a bucket export downloaded (and uploaded, then deleted) at a time.
STAGED_SHARDS = 8


class Hub:
    """The Hub, through ``huggingface_hub`` (the only part of publishing that touches the network)."""

    def __init__(self) -> None:
        from huggingface_hub import HfApi

        self.api = HfApi()

    def create_repo(self, repo_id: str, private: bool) -> None:
        self.api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)

    def create_branch(self, repo_id: str, branch: str) -> None:
        self.api.create_branch(repo_id, repo_type="dataset", branch=branch, exist_ok=True)

    def read_text(self, repo_id: str, path: str, revision: str | None) -> str | None:
        """A file of the repository, or None when it has none."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(repo_id, path, repo_type="dataset", revision=revision)).read_text()
        except EntryNotFoundError:
            return None

    def file_sizes(self, repo_id: str, folder: str | None, revision: str | None) -> dict[str, int]:
        """Size of every file under ``folder`` of the repository (its path in the repository)."""
        from huggingface_hub.errors import EntryNotFoundError

        try:
            entries = self.api.list_repo_tree(repo_id, folder, recursive=True, revision=revision, repo_type="dataset")
            return {e.path: e.size for e in entries if hasattr(e, "size")}
        except EntryNotFoundError:
            return {}

    def upload(self, repo_id: str, folder: Path, names: list[str], path_in_repo: str | None, revision: str | None):
        self.api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            repo_type="dataset",
            revision=revision,
            allow_patterns=names,
            commit_message=f"actlightning: {plural(len(names), 'file')}",
        )


@dataclass(frozen=True)
class Target:
    """Where an export goes: the repository, its revision and folder, and the config name it loads as."""

    repo_id: str
    revision: str | None
    path_in_repo: str | None

    @property
    def config_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.path_in_repo.strip("/")) if self.path_in_repo else "default"

    def path(self, name: str) -> str:
        return f"{self.path_in_repo.strip('/')}/{name}" if self.path_in_repo else name

    @property
    def url(self) -> str:
        return f"hf://datasets/{self.repo_id}" + (f"/{self.path_in_repo.strip('/')}" if self.path_in_repo else "")


def export_files(location: Location, manifest: dict) -> dict[str, int]:
    """The files an export publishes (its shards, manifest, config and report; the card is made anew),
    with their sizes (a shard's from the manifest where it has it)."""
    known = {s["file"]: s["bytes"] for s in manifest.get("shards", [])}
    names = location.names()
    files = {name: known.get(name) or location.size(name) for name in shard_names(location)}
    files.update({name: location.size(name) for name in (MANIFEST, STATS, CONFIG, REPORT) if name in names})
    return files


def hub_card(manifest: dict, location: Location, target: Target, root: str | None) -> str:
    """The repository's README.md: its front matter's ``configs`` gain (or replace) this export's,
    whose ``data_files`` are its shards; ``root`` is the card already there (None: this export's)."""
    from huggingface_hub import DatasetCard

    card = DatasetCard(root if root is not None else card_of(manifest, location, shard_names(location)[0], target.url))
    config = {"config_name": target.config_name, "data_files": [{"split": "train", "path": target.path("*.parquet")}]}
    # A new root card declares this export alone (not the "*.parquet" of the export's own card).
    existing = card.data.get("configs") if root is not None else None
    configs = [c for c in (existing or []) if c.get("config_name") != config["config_name"]]
    card.data["configs"] = [*configs, config]
    return card.content


def check_complete(manifest: dict, location: Location, allow_incomplete: bool) -> None:
    if manifest.get("complete") or allow_incomplete:
        return
    planned = (manifest.get("plan") or {}).get("estimated_shards")
    done = len(shard_names(location))
    raise ConfigError(
        f"the export in {location.url} is not complete ({done} of {planned or '?'} shards): a run is still going "
        "or was killed; rerun its command to finish it, or pass --allow_incomplete to publish what is there"
    )


def dry_run_text(target: Target, files: dict[str, int], location: Location) -> str:
    """What ``--dry_run`` prints: the repository, every file with its size, the total."""
    revision = f" (revision {target.revision})" if target.revision else ""
    lines = [f"would publish {location.url} to the dataset repository {target.repo_id}{revision}:"]
    lines += [f"  {target.path(name)}  {human_bytes(size)}" for name, size in files.items()]
    cards = [target.path(CARD), CARD] if target.path_in_repo else [CARD]
    lines += [f"  {name}  (the card, made for the Hub)" for name in cards]
    lines.append(f"total {human_bytes(sum(files.values()))} in {plural(len(files), 'file')} and the card")
    if location.remote:
        staged = sum(sorted(files.values())[-STAGED_SHARDS:])
        lines.append(
            f"a bucket export is staged {STAGED_SHARDS} files at a time: at most {human_bytes(staged)} of local disk"
        )
    return "\n".join(lines)


def upload_export(hub: Hub, location: Location, files: dict[str, int], target: Target) -> None:
    """The export's files: a folder in one resumable upload; a bucket a few files at a time through a
    local staging folder, skipping those the repository already holds at the same size."""
    if not location.remote:
        hub.upload(target.repo_id, Path(location.url), list(files), target.path_in_repo, target.revision)
        return
    there = hub.file_sizes(target.repo_id, target.path_in_repo, target.revision)
    missing = [name for name, size in files.items() if there.get(target.path(name)) != size]
    with tempfile.TemporaryDirectory(prefix="actlightning-publish-") as staging:
        for start in range(0, len(missing), STAGED_SHARDS):
            group = missing[start : start + STAGED_SHARDS]
            for name in group:
                with location.open(name) as source, open(Path(staging) / name, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 24)
            hub.upload(target.repo_id, Path(staging), group, target.path_in_repo, target.revision)
            for name in group:
                (Path(staging) / name).unlink()


def upload_cards(hub: Hub, manifest: dict, location: Location, target: Target) -> None:
    """The root card (its configs merged with those already there) and, under ``--path_in_repo``, the
    export's own card in its folder."""
    root = hub.read_text(target.repo_id, CARD, target.revision)
    with tempfile.TemporaryDirectory(prefix="actlightning-card-") as folder:
        Path(folder, CARD).write_text(hub_card(manifest, location, target, root))
        hub.upload(target.repo_id, Path(folder), [CARD], None, target.revision)
        if target.path_in_repo:
            Path(folder, CARD).write_text(hub_card(manifest, location, target, None))
            hub.upload(target.repo_id, Path(folder), [CARD], target.path_in_repo, target.revision)


def publish(
    export: str,
    target: Target,
    *,
    private: bool = False,
    dry_run: bool = False,
    allow_incomplete: bool = False,
    storage_options: dict | None = None,
    hub: type[Hub] | None = None,
) -> str:
    """Publish ``export`` (a folder or URL) to ``target``; returns what to print."""
    location = open_location(export, storage_options)
    manifest = read_manifest(location)
    if manifest is None or not shard_names(location):
        raise ConfigError(f"{location.url} holds no export of this tool (no manifest.json or no complete shard)")
    check_complete(manifest, location, allow_incomplete)
    files = export_files(location, manifest)
    if dry_run:
        return dry_run_text(target, files, location)
    client = (hub or Hub)()
    client.create_repo(target.repo_id, private)
    if target.revision:
        client.create_branch(target.repo_id, target.revision)
    upload_export(client, location, files, target)
    upload_cards(client, manifest, location, target)
    name = "" if target.config_name == "default" else f", {target.config_name!r}"
    return f"published {plural(len(files), 'file')} to {target.url}: load_dataset({target.repo_id!r}{name})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="actlightning publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an export: a folder or a URL (s3://...)")
    parser.add_argument("repo_id", help="the dataset repository, e.g. user/gpt2-layer6-activations")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to publish to (created if needed)")
    parser.add_argument("--path_in_repo", default=None, help="folder in the repository (loads as its own config)")
    parser.add_argument("--dry_run", action="store_true", help="print what would be uploaded; no network")
    parser.add_argument("--allow_incomplete", action="store_true", help="publish an unfinished export as it is")
    parser.add_argument("--storage_options", type=json.loads, default=None, help="fsspec options for a URL, as JSON")
    args = parser.parse_args(argv)
    target = Target(args.repo_id, args.revision, args.path_in_repo)
    try:
        text = publish(
            args.export,
            target,
            private=args.private,
            dry_run=args.dry_run,
            allow_incomplete=args.allow_incomplete,
            storage_options=args.storage_options,
        )
    except ConfigError as error:
        print(f"actlightning: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(text)
