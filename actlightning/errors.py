"""Errors a user can fix: each message names the setting, what was wrong and what would be valid."""


class ConfigError(ValueError):
    """A setting or an input (dataset, checkpoint, output dir) that cannot work as given."""


class ExportError(RuntimeError):
    """The export stopped for a reason the user can act on (shown as one line, exit code 1)."""


class ActivationError(ExportError):
    """The model produced activations that cannot be stored faithfully (NaN, or overflow of the storage dtype)."""


def require_positive(setting: str, value: int | None, allow_unset: bool = False) -> None:
    """Raise ``ConfigError`` naming ``setting`` unless ``value`` is a positive integer (or unset, if allowed)."""
    if value is None and allow_unset:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{setting} must be a positive integer{' or unset' if allow_unset else ''}, got {value}")


def first_line(error: BaseException) -> str:
    """The first line of an error's message (other libraries' messages run to many lines), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
