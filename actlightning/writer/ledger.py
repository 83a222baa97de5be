"""The export's ledger: every complete shard (this rank's as they finish, other ranks' from the
listing), the manifest rebuilt from them, the statistics summed from their footers, and the card."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from actlightning.contracts import ExportPlan
from actlightning.files.manifest import CARD, MANIFEST, STATS, build_manifest, manifest_bytes, shard_names
from actlightning.files.shard_file import ShardInfo, add_moments
from actlightning.files.statistics import statistics
from actlightning.files.storage import Location
from actlightning.writer.card import card_of
from actlightning.writer.resume import READ_AHEAD
from actlightning.writer.summary import data_summary

# In a bucket the manifest is one PUT of the whole shard list (and a listing): at most this often while
# running, always at the end. A resume reads the listing, not the manifest.
REMOTE_MANIFEST_SECONDS = 30.0


class Ledger:
    """What ``location`` holds of the export ``plan``; ``cost`` is the plan's estimate (the manifest's ``plan``)."""

    def __init__(self, location: Location, plan: ExportPlan, cost: dict | None, shards: Iterable[ShardInfo]) -> None:
        self.location, self.plan, self.cost = location, plan, cost
        # Footers' sums are read again at the end, in shard order: kept here they would grow with the export.
        self.known = {info.file: replace(info, moments=None) for info in shards}
        self._lock = threading.Lock()
        self._written = 0.0

    def write_manifest(self, complete: bool, extra: dict | None = None) -> dict:
        with self._lock:
            # Shards finished by other ranks are picked up from the listing; footers are read once.
            for name in shard_names(self.location):
                if name not in self.known:
                    self.known[name] = replace(ShardInfo.read(self.location, name), moments=None)
            planned = {"plan": self.cost} if self.cost is not None else {}
            extra = {"data": data_summary(self.plan.data), **planned, **(extra or {})}
            stats = self.statistics() if complete else None
            if stats:
                extra["stats"] = {name: _scalars(column) for name, column in stats.items()}
            manifest = build_manifest(self.plan.settings, self.known.values(), complete, extra)
            if stats:
                self.location.write_bytes(STATS, manifest_bytes({n: _lists(c) for n, c in stats.items()}))
            self.location.write_bytes(MANIFEST, manifest_bytes(manifest))
            self._written = time.monotonic()
            return manifest

    def shard_done(self, info: ShardInfo) -> None:
        self.known[info.file] = replace(info, moments=None)
        if self.location.remote and time.monotonic() - self._written < REMOTE_MANIFEST_SECONDS:
            return
        self.write_manifest(complete=False)

    def statistics(self) -> dict[str, dict[str, Any]]:
        """Each vector column's statistics over every shard, from their footers' float64 sums, added in
        shard order (the same whatever the devices, threads or resumes that wrote them), one footer at a
        time. Empty when a shard lacks them."""
        names = sorted(self.known, key=lambda name: (self.known[name].shard_index, name))
        total: dict[str, np.ndarray] = {}
        with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
            for info in pool.map(lambda name: ShardInfo.read(self.location, name), names):
                if info.moments is None:
                    return {}
                total = add_moments(total, info.moments)
        tokens = sum(self.known[name].tokens for name in names)
        return {name: statistics(sums, tokens) for name, sums in total.items()}

    def write_card(self, manifest: dict) -> None:
        names = sorted(self.known)
        if names:
            self.location.write_text(CARD, card_of(manifest, self.location, names[0]))


def _scalars(column: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in column.items() if not isinstance(value, np.ndarray)}


def _lists(column: dict[str, Any]) -> dict[str, Any]:
    return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in column.items()}
