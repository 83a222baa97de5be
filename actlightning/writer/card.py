"""The dataset card (``README.md``) written next to the shards, ready for a Hub dataset repository."""

from __future__ import annotations

from pathlib import Path
from string import Template

import pyarrow as pa
import pyarrow.parquet as pq

from actlightning.files.schema import VECTOR_PREFIXES, storage_type
from actlightning.files.storage import Location

# The card's text: card.md beside this module, ``${name}`` filled in by render_card.
TEMPLATE = Template((Path(__file__).parent / "card.md").read_text())


def _describe_type(field: pa.Field) -> str:
    return str(storage_type(field.type))


BFLOAT16_NOTE = " (raw bfloat16 bit patterns as 2-byte binaries; decode with the reader)"


def _given(**settings: object) -> str:
    """`` (config `x`, revision `y`)`` for the settings that are set; nothing when none is."""
    given = [f"{name.replace('_', ' ')} `{value}`" for name, value in settings.items() if value is not None]
    return f" ({', '.join(given)})" if given else ""


def _norms(stats: dict | None) -> str:
    """The statistics line: each vector column's mean norm (``stats.json`` has means and variances)."""
    if not stats:
        return ""
    norms = ", ".join(f"`{name}` {column['mean_norm']:.4g}" for name, column in stats.items())
    return f"\n- Mean token norm per column (as stored; `stats.json` holds means and variances): {norms}"


def render_card(manifest: dict, schema: pa.Schema, folder: Path | str, remote: bool = False) -> str:
    """Markdown with Hub front matter: what model and data, which layers, the schema, how to load it.

    For a URL the snippets pass ``storage_options`` (never their values: credentials stay out of the card).
    """
    options = ", storage_options=storage_options" if remote else ""
    options_note = (
        "\n# storage_options: the same as writer.storage_options ({} when the environment has the credentials)"
        if remote
        else ""
    )
    settings, totals = manifest["settings"], manifest["totals"]
    model, data = settings["model"], settings["data"]
    layout = settings.get("layout", "sequence")
    vectors = [f.name for f in schema if f.name.startswith(VECTOR_PREFIXES)]
    return TEMPLATE.substitute(
        checkpoint=model["checkpoint"],
        model_given=_given(revision=model["revision"]),
        dtype=model["dtype"],
        split=data["split"],
        path=data["path"],
        data_given=_given(config=data["name"], data_files=data["data_files"], revision=data["revision"]),
        input_column=data["input_column"],
        layout=layout,
        layout_text="one row per sequence" if layout == "sequence" else "one row per token",
        layers=model["layers"],
        hook_points=model.get("hook_points") or [],
        output_dtype=model["output_dtype"],
        dtype_note=BFLOAT16_NOTE if model["output_dtype"] == "bfloat16" else "",
        kept="all" if model["n_pos"] is None else f"the last {model['n_pos']}",
        hidden_size=model["hidden_size"],
        num_layers=model["num_layers"],
        rows=f"{totals['rows']:,}",
        tokens=f"{totals['tokens']:,}",
        shards=totals["shards"],
        bytes=f"{totals['bytes']:,}",
        removed=manifest.get("data", {}).get("removed", {}),
        norms=_norms(manifest.get("stats")),
        complete=manifest["complete"],
        schema_rows="\n".join(f"| `{f.name}` | `{_describe_type(f)}` |" for f in schema),
        options_note=options_note,
        folder=folder,
        options=options,
        first=vectors[0] if vectors else "layer_0",
        versions=manifest.get("versions", {}),
    )


def card_of(manifest: dict, location: Location, shard: str, url: str | None = None) -> str:
    """The card of the export at ``location`` (its schema read from ``shard``'s footer); the loading
    snippets point at ``url`` (unset: the location itself, with ``storage_options`` for a bucket)."""
    with location.open(shard) as handle:
        schema = pq.read_schema(handle)
    return render_card(manifest, schema, url or location.url, location.remote and url is None)
