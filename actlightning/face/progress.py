"""A progress bar counted in tokens, with throughput, bytes written and shards done.

Sorted batches vary a lot in cost, so an ETA from batch counts misleads; tokens do not.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from actlightning.humanize import human_bytes


class TokenProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar for ``predict``, whose total and position are this rank's tokens."""

    def _writer(self, trainer):
        from actlightning.writer.callback import ParquetShardWriter  # the face may import any stage

        return next((c for c in trainer.callbacks if isinstance(c, ParquetShardWriter)), None)

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The first batch (re)starts the bar, counted in this rank's planned tokens (unknown: 0).
        if not self.has_dataloader_changed(dataloader_idx):
            return
        writer = self._writer(trainer)
        total = writer.plan.data.planned_tokens_this_rank if writer is not None and writer.plan is not None else 0
        bar = self.predict_progress_bar
        bar.reset(total=int(total) or None)
        bar.unit, bar.unit_scale = "tok", True
        bar.set_description("Exporting")
        self._tokens = 0
        self._started = True

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        writer = self._writer(trainer)
        if writer is None or self.is_disabled:
            return
        bar = self.predict_progress_bar
        # Counted from the batch: the writer (a later callback) has not seen this batch yet.
        self._tokens += batch.host_tokens
        bar.n = self._tokens
        # Shards are finished by the writer threads, so these trail the token count a little.
        self._show_written(writer)
        bar.refresh()

    def _show_written(self, writer) -> None:
        postfix = {"written": human_bytes(writer.bytes_done), "shards": writer.shards_done}
        self.predict_progress_bar.set_postfix(postfix, refresh=False)

    @override
    def on_predict_end(self, trainer, pl_module) -> None:
        # The writer finished its last shards in on_predict_epoch_end: show the final counts.
        writer = self._writer(trainer)
        if writer is not None and not self.is_disabled and getattr(self, "_started", False):
            self._show_written(writer)
            self.predict_progress_bar.refresh()
        super().on_predict_end(trainer, pl_module)
