"""Errors a user can fix: each message names the setting, what was wrong and what would be valid."""


class ConfigError(ValueError):
    """A setting or an input (dataset, checkpoint, output dir) that cannot work as given."""


class ActivationError(RuntimeError):
    """The model produced activations that cannot be stored faithfully (NaN, or overflow of the storage dtype)."""
