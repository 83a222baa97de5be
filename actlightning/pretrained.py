"""Loading from the Hub or a local folder, with the failures a user can fix as one clear line."""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

from actlightning.errors import ConfigError, first_line


def load_pretrained(loader, setting: str, name: str, **kwargs):
    """``loader(name, **kwargs)``, with a missing folder or an unreachable Hub id as one clear line."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{setting} {name!r} is not a folder; give an existing local folder or a Hub id")
    try:
        return loader(name, **kwargs)
    except OSError as error:
        raise ConfigError(
            f"{setting} {name!r} could not be loaded: {first_line(error)} "
            "(a local folder must hold a saved model; a Hub id needs network access or a warm HF cache)"
        ) from None


def context_size(config: PretrainedConfig) -> int | None:
    """The model's maximum sequence length, where the config states one."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
