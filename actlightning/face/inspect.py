"""``actlightning inspect EXPORT``: what an export holds, in a second, from its manifest (one read), the
shard listing and one shard's schema; no footers of every shard, no torch, no Lightning."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.errors import ConfigError
from actlightning.files.manifest import read_manifest, shard_names
from actlightning.files.schema import is_vector_column, storage_type, stored_dtype
from actlightning.files.storage import open_location
from actlightning.humanize import human_bytes, plural

PACKAGE = Path(__file__).resolve().parents[1]
# Where each section's settings are declared (read with ast: their defaults, without importing them).
SECTIONS = {
    "model": ("model/module.py", "ActivationModule"),
    "data": ("data/module.py", "ActivationDataModule"),
    "writer": ("writer/callback.py", "ParquetShardWriter"),
}


def declared_defaults(section: str) -> dict[str, Any]:
    """A section's settings and their defaults, from the class's ``__init__`` in the source."""
    path, name = SECTIONS[section]
    tree = ast.parse((PACKAGE / path).read_text())
    init = next(
        node
        for cls in tree.body
        if isinstance(cls, ast.ClassDef) and cls.name == name
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    arguments = init.args.args[1:]
    defaults = [None] * (len(arguments) - len(init.args.defaults)) + list(init.args.defaults)
    return {a.arg: ast.literal_eval(d) if d is not None else None for a, d in zip(arguments, defaults, strict=True)}


def _same(value: Any, default: Any) -> bool:
    empty: tuple = (None, [], ())
    return (value in empty and default in empty) or value == default


def changed_settings(settings: dict) -> dict[str, Any]:
    """The export's settings that differ from their defaults, as ``section.key`` (the model's layers
    and storage dtype are recorded resolved: all layers and the compute dtype count as defaults)."""
    model = settings.get("model", {})
    resolved = {"layers": list(range(model.get("num_layers", -2) + 1)), "output_dtype": model.get("dtype")}
    changed = {}
    for section in ("model", "data"):
        defaults = declared_defaults(section)
        for key, value in settings.get(section, {}).items():
            if (
                key in defaults
                and not _same(value, defaults[key])
                and not (section == "model" and resolved.get(key) == value)
            ):
                changed[f"{section}.{key}"] = value
    writer = declared_defaults("writer")  # the writer's shuffle_seed is recorded None without a shuffle
    changed.update({f"writer.{k}": v for k, v in settings.items() if k in writer and v is not None and v != writer[k]})
    return changed


def _column(field: pa.Field, features: dict) -> dict[str, Any]:
    if not is_vector_column(field.name):
        return {"type": str(storage_type(field.type))}
    shape = features.get(field.name, {}).get("shape") or features.get(field.name, {}).get("length")
    width = shape[-1] if isinstance(shape, list) else shape
    return {"dtype": stored_dtype(field), "width": width}


def describe(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as one JSON-ready dict."""
    location = open_location(path, storage_options)
    manifest = read_manifest(location)
    if manifest is None:
        raise ConfigError(f"{location.url} holds no manifest.json: it is not an export of this tool (or not yet)")
    names = shard_names(location)
    planned = (manifest.get("plan") or {}).get("estimated_shards")
    columns: dict[str, Any] = {}
    if names:
        with location.open(names[0]) as handle:
            schema = pq.read_schema(handle)
        metadata = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        features = metadata.get("info", {}).get("features", {})
        columns = {field.name: _column(field, features) for field in schema}
    settings, totals = manifest.get("settings", {}), manifest.get("totals", {})
    return {
        "path": location.url,
        "complete": bool(manifest.get("complete")),
        "shards": len(names),
        "planned_shards": planned,
        "missing_shards": None if planned is None else max(planned - len(names), 0),
        "layout": settings.get("layout", "sequence"),
        **{key: totals.get(key) for key in ("rows", "examples", "tokens", "bytes")},
        "columns": columns,
        "stats": manifest.get("stats"),
        "model": settings.get("model", {}),
        "dataset": settings.get("data", {}),
        "changed_settings": changed_settings(settings),
    }


def render(info: dict[str, Any]) -> str:
    """``describe``'s dict as the lines ``inspect`` prints."""
    missing = info["missing_shards"]
    state = "complete" if info["complete"] else "incomplete"
    if not info["complete"] and missing:
        state += f", {plural(missing, 'shard')} of {info['planned_shards']} missing"
    model, data = info["model"], info["dataset"]
    rows, examples, tokens = (plural(info[k] or 0, k[:-1]) for k in ("rows", "examples", "tokens"))
    lines = [
        f"{info['path']}: {state}",
        f"layout {info['layout']}: {rows}, {examples}, {tokens} in {plural(info['shards'], 'shard')}, "
        f"{human_bytes(info['bytes'] or 0)}",
        f"model: {model.get('checkpoint')} (compute {model.get('dtype')}, layers {model.get('layers')}, "
        f"stored as {model.get('output_dtype')})",
        f"dataset: {data.get('path')} split {data.get('split')}, input column {data.get('input_column')}",
        "columns:",
    ]
    for name, column in info["columns"].items():
        kind = f"{column['dtype']} x {column['width']}" if "dtype" in column else column["type"]
        lines.append(f"  {name}: {kind}")
    for name, stats in (info["stats"] or {}).items():
        lines.append(f"  {name} statistics: mean norm {stats.get('mean_norm')}, count {stats.get('count')}")
    changed = ", ".join(f"{k}={v}" for k, v in info["changed_settings"].items()) or "none"
    lines.append(f"settings that differ from the defaults: {changed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="actlightning inspect", description=__doc__)
    parser.add_argument("export", help="an export: a folder or a URL (s3://..., hf://datasets/...)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument("--storage_options", type=json.loads, default=None, help="fsspec options for a URL, as JSON")
    args = parser.parse_args(argv)
    try:
        info = describe(args.export, args.storage_options)
    except ConfigError as error:
        print(f"actlightning: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
