"""When this process started, for the seconds from start to the first batch (imports included)."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Fallback: when this module was first imported (the command line imports it first thing).
_IMPORTED = time.time()
# Set by the command line (``python -m actlightning``, the console script): in a notebook or a test
# that runs the CLI in its own process, the process's start says nothing about the export.
STARTED: float | None = None


def mark_command_line() -> None:
    global STARTED
    STARTED = process_started()


def process_started() -> float:
    """The process's start (epoch seconds): on Linux from ``/proc`` (its start and the uptime, both
    since boot, to 10 ms), else when this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): after "pid (name)"
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return _IMPORTED
