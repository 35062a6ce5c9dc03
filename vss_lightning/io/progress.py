"""A progress bar that counts videos and frames, with progress inside the current video.

The number of videos is unknown with WebDataset shards, so the bar counts videos; its postfix shows
the frames labelled so far, frames/s, skipped and failed videos, and the current video's frames done
of its total with an ETA (updated after every batch of frames, so a long video never looks stuck).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from .stages import Stage, StageCallback
from .summary import VideoFailed, VideoLabels, VideoSkipped


class VideoProgressBar(StageCallback, TQDMProgressBar):
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
        self._video: tuple[str, float] | None = None  # (id, start time) of the video in progress
        self._bar: Any = None

    def _listen(self, pl_module: L.LightningModule, bar: Any) -> None:
        self._bar = bar
        if hasattr(pl_module, "add_frame_listener"):
            pl_module.add_frame_listener(self.on_frames)

    def on_frames(self, video_id: str, done: int, total: int) -> None:
        """Progress inside a video: `done` of its `total` frames are labelled (0: the video starts)."""
        now = time.perf_counter()
        if self._video is None or self._video[0] != video_id or done <= 0:
            self._video = (video_id, now)
        elapsed = now - self._video[1]
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        bar = self._bar
        if bar is not None and not bar.disable:
            bar.set_postfix(
                video=video_id,
                video_frames=f"{done}/{total}",
                video_fps=f"{rate:.2f}",
                video_eta=_duration(eta),
                frames=self.frames + done,
                skipped=self.skipped,
                failed=self.failed,
                refresh=True,
            )

    def _postfix(self, bar: Any, outputs: Any) -> None:
        if isinstance(outputs, VideoLabels):
            self.frames += outputs.frames
        elif isinstance(outputs, VideoSkipped):
            self.skipped += 1
        elif isinstance(outputs, VideoFailed):
            self.failed += 1
        self._video = None
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
        return _per_video(super().init_predict_tqdm())

    def init_test_tqdm(self) -> Any:
        return _per_video(super().init_test_tqdm())

    def init_validation_tqdm(self) -> Any:
        return _per_video(super().init_validation_tqdm())

    def _stage_bar(self, stage: Stage) -> Any:
        if stage == "predict":
            return self.predict_progress_bar
        return self.test_progress_bar if stage == "test" else self.val_progress_bar

    def on_stage_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        self._reset_counts()
        self._listen(pl_module, self._stage_bar(stage))

    def on_stage_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, stage: Stage
    ) -> None:
        self._postfix(self._stage_bar(stage), outputs)


def _per_video(bar: Any) -> Any:
    bar.unit = "video"
    return bar


def _duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12s` or `?`."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
