"""A progress bar that counts videos and frames (the total is unknown with WebDataset shards)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from .summary import VideoFailed, VideoLabels, VideoSkipped


class VideoProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting videos (steps) with frames, frames/s, skipped and failed.

    Shows on global rank 0 only (Lightning disables progress bars on the other ranks); with an
    `IterableDataset` the total is unknown, so the bar shows counts and rates without an ETA. The
    counts are rank 0's own (the merged totals are in `summary.json`).
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.frames = self.skipped = self.failed = 0
        self._t0 = time.perf_counter()

    def _postfix(self, bar: Any, outputs: Any) -> None:
        if isinstance(outputs, VideoLabels):
            self.frames += outputs.frames
        elif isinstance(outputs, VideoSkipped):
            self.skipped += 1
        elif isinstance(outputs, VideoFailed):
            self.failed += 1
        elapsed = max(time.perf_counter() - self._t0, 1e-6)
        if bar is not None and not bar.disable:
            bar.set_postfix(
                frames=self.frames,
                fps=f"{self.frames / elapsed:.2f}",
                skipped=self.skipped,
                failed=self.failed,
                refresh=False,
            )

    def init_predict_tqdm(self) -> Any:
        bar = super().init_predict_tqdm()
        bar.unit = "video"
        return bar

    def init_test_tqdm(self) -> Any:
        bar = super().init_test_tqdm()
        bar.unit = "video"
        return bar

    def init_validation_tqdm(self) -> Any:
        bar = super().init_validation_tqdm()
        bar.unit = "video"
        return bar

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._reset_counts()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._reset_counts()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._reset_counts()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._postfix(self._predict_progress_bar, outputs)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._postfix(self._test_progress_bar, outputs)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._postfix(self._val_progress_bar, outputs)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
