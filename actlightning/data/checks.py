"""The data module's settings checked together, before anything loads: each error names the setting."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from actlightning.errors import ConfigError, require_positive
from actlightning.files.schema import is_reserved_column


def check_data_settings(h: Mapping[str, Any]) -> None:
    """Refuse settings that cannot work, whatever the data (``h``: the data module's hparams)."""
    require_positive("data.batch_size", h["batch_size"])
    for setting in ("max_tokens", "max_length", "limit", "bucket_size", "min_tokens", "max_tokens_per_sequence"):
        require_positive(f"data.{setting}", h[setting], allow_unset=True)
    low, high = h["min_tokens"], h["max_tokens_per_sequence"]
    if low is not None and high is not None and low > high:
        raise ConfigError(
            f"data.min_tokens ({low}) is above data.max_tokens_per_sequence ({high}): no sequence could pass"
        )
    if h["num_workers"] < 0:
        raise ConfigError(f"data.num_workers must be 0 or more, got {h['num_workers']}")
    require_positive("data.num_proc", h["num_proc"], allow_unset=True)
    if h["streaming"]:
        check_streaming_settings(h)
    for label in h["label_columns"] or []:
        if is_reserved_column(label):
            raise ConfigError(
                f"data.label_columns contains {label!r}, which is the name of a column the export writes; "
                "rename it in the dataset first"
            )


def check_streaming_settings(h: Mapping[str, Any]) -> None:
    """Refuse the settings that need the whole dataset up front, naming each and what to do instead."""
    refused = {
        "data.sort_by_length": (
            h["sort_by_length"] and h["bucket_size"] is None,
            "set data.bucket_size to sort within windows",
        ),
        "data.dedupe": (h["dedupe"], "a whole-set dedupe needs every input first"),
        "data.drop_prefixes": (h["drop_prefixes"], "finding prefixes needs every input first"),
        "data.shuffle_seed": (
            h["shuffle_seed"] is not None,
            "an exact sample needs the whole set; data.limit takes the first rows",
        ),
        "data.batch_order_seed": (
            h["batch_order_seed"] is not None,
            "shuffling whole batches needs all of them first",
        ),
        "data.auto_find_batch_size": (
            h["auto_find_batch_size"],
            "the longest batch is unknown; set data.batch_size or data.max_tokens",
        ),
        "data.num_workers": (h["num_workers"] > 0, "the stream is read once per rank; use 0"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ConfigError(f"{name} does not work with data.streaming: {why}")


def callable_name(function: Callable | None) -> str | None:
    """``module.qualname`` of a filter callable (how the manifest records it)."""
    if function is None:
        return None
    return f"{function.__module__}.{getattr(function, '__qualname__', function)}"


def resolve_max_length(max_length: int | None, model_context: int | None) -> int | None:
    """``data.max_length``, checked against the model's context; unset: the context size."""
    if max_length is not None and model_context is not None and max_length > model_context:
        raise ConfigError(
            f"data.max_length is {max_length}, above the model's context size {model_context}; "
            f"use at most {model_context}, or leave it unset to truncate at the context size"
        )
    return max_length if max_length is not None else model_context
