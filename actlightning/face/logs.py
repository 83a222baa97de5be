"""Logging for a run: this package's lines (with the rank) to stderr and ``--log_file``, and the
lines other libraries print on every run that say nothing about an export, dropped by name."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

log = logging.getLogger("actlightning")

# Lines that other libraries print on every run and that say nothing about an export.
_NOISY_INFO = ("GPU available:", "TPU available:", "HPU available:", "💡 Tip:")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(_NOISY_INFO)


def quiet_third_party() -> None:
    """Silence what other libraries print on every run and is not about the export.

    Only named messages are dropped (no blanket category filters), so real warnings still show.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    # The data module's batches carry their own bookkeeping; Lightning's batch-index tracking is not needed.
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    # Lightning 2.6 uses torch's deprecated LeafSpec internally; nothing a user can change.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    # transformers' "Loading weights" bar: the plan and the export's own bar say what is happening.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


class _RankFilter(logging.Filter):
    """Adds ``rank`` to log records, so lines from several processes can be told apart."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        record.rank = getattr(rank_zero_only, "rank", 0)
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time, so that in-process runs (tests, notebooks)
    that redirect it see the logs."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LogFileHandler(logging.FileHandler):
    """The ``--log_file`` handler; one run's file is closed and dropped when the next run starts."""


def configure_logging(log_file: str | Path | None) -> None:
    """INFO logs of this package to stderr, and with ``log_file`` also Lightning's, to that file."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        stream = _StderrHandler()
        stream.setFormatter(formatter)
        stream.addFilter(_RankFilter())
        log.addHandler(stream)
    names = ("actlightning", "lightning.pytorch", "lightning.fabric")
    for name in names:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _LogFileHandler)]:
            logger.removeHandler(handler)
            handler.close()
    if log_file is not None:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = _LogFileHandler(log_file)
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter())
        for name in names:
            logging.getLogger(name).addHandler(handler)
