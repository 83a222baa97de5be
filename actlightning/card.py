"""The dataset card (``README.md``) written next to the shards, ready for a Hub dataset repository."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from actlightning.schema import VECTOR_PREFIXES, storage_type


def _describe_type(field: pa.Field) -> str:
    return str(storage_type(field.type))


BFLOAT16_NOTE = " (raw bfloat16 bit patterns as 2-byte binaries; decode with the reader)"


def _given(**settings: object) -> str:
    """`` (config `x`, revision `y`)`` for the settings that are set; nothing when none is."""
    given = [f"{name.replace('_', ' ')} `{value}`" for name, value in settings.items() if value is not None]
    return f" ({', '.join(given)})" if given else ""


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
    first = vectors[0] if vectors else "layer_0"
    rows = "\n".join(f"| `{f.name}` | `{_describe_type(f)}` |" for f in schema)
    removed = manifest.get("data", {}).get("removed", {})
    return f"""---
configs:
- config_name: default
  data_files: "*.parquet"
tags:
- activations
- interpretability
---

# Activations of `{model["checkpoint"]}`

Hidden states exported with actlightning from `{model["checkpoint"]}`{_given(revision=model["revision"])}
(compute dtype `{model["dtype"]}`), run over the `{data["split"]}` split of
`{data["path"]}`{_given(config=data["name"], data_files=data["data_files"], revision=data["revision"])}, input column
`{data["input_column"]}`.

- Layout: **{layout}** ({"one row per sequence" if layout == "sequence" else "one row per token"})
- Layers (HF `hidden_states` indices; the last includes the final norm): `{model["layers"]}`
- Hook points: `{model.get("hook_points") or []}`
- Stored dtype: `{model["output_dtype"]}`{BFLOAT16_NOTE if model["output_dtype"] == "bfloat16" else ""}
- Tokens kept per sequence: {"all" if model["n_pos"] is None else f"the last {model['n_pos']}"}
- Hidden size: {model["hidden_size"]}, model layers: {model["num_layers"]}
- Rows: {totals["rows"]:,}; tokens: {totals["tokens"]:,}; shards: {totals["shards"]}; bytes: {totals["bytes"]:,}
- Rows removed by each selection step: `{removed}`
- Complete: {manifest["complete"]}

## Schema

| column | Arrow type |
| --- | --- |
{rows}

`example_id` is the row's index in the loaded split, before any filtering or sorting.

## Loading

```python
from datasets import load_dataset{options_note}
ds = load_dataset("parquet", data_files="{folder}/*.parquet", split="train"{options})
ds.with_format("torch")[0]["{first}"]   # note: datasets' torch format casts floats to float32
```

Stored dtype kept, and streaming batches of token vectors (e.g. for SAE training):

```python
from actlightning.reader import open_export, iter_token_batches
export = open_export("{folder}"{options})
ds = export.dataset()                        # torch tensors in their stored dtype
for batch in iter_token_batches("{folder}", "{first}", batch_size=4096, shuffle_buffer=1_000_000{options}):
    ...                                      # [4096, width]
```

Versions: `{manifest.get("versions", {})}`
"""
