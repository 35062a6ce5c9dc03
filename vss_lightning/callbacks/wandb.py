"""`WandbVideoLogger`: progress, timings, per-video scores and pictures of the labels, to the loggers.

During predict, test and validate, after every step (one video or clip) on global rank 0:

- to every logger of the trainer (any Lightning `Logger`: `log_metrics` only), under the stage's
  prefix (`predict/`, `test/`, `val/`): videos and frames done, frames/s since the start, skipped and
  failed samples, this sample's seconds per pipeline stage (`seconds/encode`, `seconds/features`,
  ...), the peak GPU memory (`gpu_max_memory_gib`, on CUDA) and, when the sample has ground truth, the
  video's scores once its last clip is done (`video_mIoU`, `video_mVC8`, `video_mVC16`);
- to a `WandbLogger` only (W&B is imported lazily, only then): for every `log_every_n_videos`-th
  video, up to `max_logged_videos`, `frames_per_video` frames as `wandb.Image` with the prediction
  and the ground truth as mask layers (class names from `meta.class_names` where known) and a short
  overlay clip (`wandb.Video` of an mp4 or GIF made by `vss_lightning.viz`); at the end a table with
  one row per video (id, frames, mIoU, mVC8, mVC16, thumbnail) and a table of the failures.

The split's metrics at the end of test/validate are logged by `ZeroShotVSS` itself (`test/mIoU`,
...), and the merged run totals by the writer (`<stage>/summary/...`).

Per-video scores follow the module's `matching` ("dataset" matching is done per video here), on the
video's labelled frames; they are None in predict (no ground truth) or without `model.num_classes`
(mIoU). Under DDP the callback sees rank 0's own videos only (loggers log from rank 0; no collective
is added): the per-step counts and the table cover rank 0, the totals are in `summary.json`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from vss_lightning import viz
from vss_lightning.clips import ClipAssembler, ClipRun
from vss_lightning.data.format import IGNORE_INDEX, VideoMeta, VideoSample
from vss_lightning.io.previews import sample_frames
from vss_lightning.io.stages import Stage, StageCallback
from vss_lightning.io.summary import VideoFailed, VideoLabels, VideoResult, VideoSkipped
from vss_lightning.metrics import join_parts, labelled_part, video_scores

TABLE_COLUMNS = ["video_id", "frames", "mIoU", "mVC8", "mVC16", "thumbnail"]
FAILURE_COLUMNS = ["video_id", "shard", "key", "clip_index", "error"]


def class_labels(ids: np.ndarray, names: list[str] | None, kind: str) -> dict[int, str]:
    """W&B mask class labels for the ids present: `names[i]` where known, else "<kind> i"."""
    out = {}
    for i in np.unique(ids).tolist():
        if i == IGNORE_INDEX and kind == "class":
            out[int(i)] = "ignore"
        elif names is not None and 0 <= i < len(names):
            out[int(i)] = str(names[i])
        else:
            out[int(i)] = f"{kind} {i}"
    return out


PREFIXES = {"predict": "predict", "test": "test", "validate": "val"}


@dataclass
class _ClipPart:
    """What the callback keeps of one clip until its video's last clip."""

    frames: int
    scored: tuple[torch.Tensor, torch.Tensor] | None  # (pred, target) of the labelled frames
    thumbnail: np.ndarray | None  # the video's, from the first clip that had frames


class WandbVideoLogger(StageCallback):
    """Logs progress, stage timings, per-video scores and (to W&B) pictures of the labels.

    See the module docstring for what is logged. Works with any logger (metrics only) and with none
    (then it does nothing); images, videos and tables go only to a `WandbLogger`.

    Args:
        log_every_n_videos: pictures for every n-th video of rank 0 (1: every video).
        max_logged_videos: at most this many videos with pictures per stage (0: no pictures).
        frames_per_video: images with masks per pictured video (evenly spaced over its first clip).
        video_frames: frames of the overlay clip per pictured video (its first ones; 0: no clip).
        video_fps: frames per second of the overlay clip.
        media_max_size: images and clips are shrunk to this longer side (pixels).
        thumbnail_size: longer side of the table's thumbnails (pixels).
        log_table: log the per-video table (and the failures) at the end, to W&B.
    """

    def __init__(
        self,
        log_every_n_videos: int = 1,
        max_logged_videos: int = 8,
        frames_per_video: int = 2,
        video_frames: int = 32,
        video_fps: float = 8.0,
        media_max_size: int = 320,
        thumbnail_size: int = 96,
        log_table: bool = True,
    ) -> None:
        super().__init__()
        ints = {
            "log_every_n_videos": (log_every_n_videos, 1),
            "max_logged_videos": (max_logged_videos, 0),
            "frames_per_video": (frames_per_video, 0),
            "video_frames": (video_frames, 0),
            "media_max_size": (media_max_size, 8),
            "thumbnail_size": (thumbnail_size, 8),
        }
        for name, (value, low) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Expected `{name}` to be an int >= {low}, but got {value!r}.")
        if not video_fps > 0:
            raise ValueError(f"Expected `video_fps` to be positive, but got {video_fps!r}.")
        self.log_every_n_videos = log_every_n_videos
        self.max_logged_videos = max_logged_videos
        self.frames_per_video = frames_per_video
        self.video_frames = video_frames
        self.video_fps = video_fps
        self.media_max_size = media_max_size
        self.thumbnail_size = thumbnail_size
        self.log_table = log_table
        self._start("predict")

    # -- state ----------------------------------------------------------------------------------
    def _start(self, prefix: str) -> None:
        self.prefix = prefix
        self.step = 0
        self.counts = {"videos": 0, "clips": 0, "frames": 0, "skipped": 0, "failed": 0}
        self.seen_videos = 0  # first clips seen: the sampling index of pictures
        self.pictured = 0
        self.rows: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._open: ClipAssembler[_ClipPart] = ClipAssembler()
        self._t0 = time.perf_counter()

    @staticmethod
    def _active(trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and bool(trainer.loggers)

    @staticmethod
    def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    # -- hooks ----------------------------------------------------------------------------------
    def on_stage_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        self._start(PREFIXES[stage])

    def on_stage_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, stage: Stage
    ) -> None:
        self.on_result(trainer, pl_module, outputs, batch)

    # -- per step -------------------------------------------------------------------------------
    def on_result(
        self, trainer: L.Trainer, pl_module: L.LightningModule, result: VideoResult, batch: Any
    ) -> None:
        """Count one step's result and log this step's metrics (and pictures of a sampled video)."""
        if not self._active(trainer):
            return
        self.step += 1
        metrics: dict[str, float] = {}
        if isinstance(result, VideoLabels):
            metrics.update(self._labels(trainer, pl_module, result, batch))
        elif isinstance(result, VideoSkipped):
            self.counts["skipped"] += 1
        elif isinstance(result, VideoFailed):
            self.counts["failed"] += 1
            self.failures.append(result.record())
            if result.video_id is not None:
                self._open.pop(result.video_id)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        metrics.update({k: float(v) for k, v in self.counts.items()})
        metrics["frames_per_second"] = self.counts["frames"] / elapsed
        device = getattr(pl_module, "device", torch.device("cpu"))
        if device.type == "cuda":
            metrics["gpu_max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        named = {f"{self.prefix}/{k}": v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(named, step=self.step)

    def _labels(
        self, trainer: L.Trainer, pl_module: L.LightningModule, res: VideoLabels, batch: Any
    ) -> dict[str, float]:
        meta = res.meta
        vid = meta.video_id
        out: dict[str, float] = {"video_seconds": res.seconds}
        if res.seconds > 0:
            out["video_frames_per_second"] = res.frames / res.seconds
        out.update({f"seconds/{k}": v for k, v in res.stage_seconds.items()})
        self.counts["clips"] += 1
        self.counts["frames"] += res.frames
        target = batch.labels if isinstance(batch, VideoSample) and batch.video_id == vid else None
        scored = None
        if target is not None and target.shape == res.labels.shape:
            scored = labelled_part(res.labels, target)
        wandb_loggers = self._wandb_loggers(trainer)
        frames = sample_frames(batch, res) if wandb_loggers else None
        if meta.clip_index == 0:
            self.seen_videos += 1
        earlier = self._open.last(vid) if meta.clip_index > 0 and self._open.follows(meta) else None
        thumbnail = earlier.thumbnail if earlier is not None else None
        if frames is not None and self.log_table and thumbnail is None:  # from the first clip seen
            mid = res.frames // 2
            image = viz.overlay(frames[mid], res.labels[mid].numpy(), self._palette(pl_module, meta))
            thumbnail = viz.resize_max(image, self.thumbnail_size)
        sampled = (
            meta.clip_index == 0
            and (self.seen_videos - 1) % self.log_every_n_videos == 0
            and self.pictured < self.max_logged_videos
        )
        if sampled and frames is not None:
            self.pictured += 1
            for logger in wandb_loggers:
                self._log_pictures(logger, pl_module, res, frames, target)
        for run in self._open.add(meta, _ClipPart(res.frames, scored, thumbnail)):
            out.update(self._close(pl_module, run))
        return out

    def _close(self, pl_module: L.LightningModule, run: ClipRun[_ClipPart]) -> dict[str, float]:
        """A video's clips are done (its last one, or a clip that broke their order): score the video
        and keep its table row."""
        self.counts["videos"] += 1
        scores: dict[str, float | None] = {"mIoU": None, "mVC8": None, "mVC16": None}
        parts = [p.scored for p in run.parts if p.scored is not None]
        if parts:
            pred, target = join_parts(parts)
            matching = getattr(pl_module, "matching", "none")
            scores = video_scores(pred, target, getattr(pl_module, "num_classes", None), matching)
        frames = sum(p.frames for p in run.parts)
        thumbnail = run.parts[-1].thumbnail
        self.rows.append({"video_id": run.video_id, "frames": frames, **scores, "thumbnail": thumbnail})
        return {f"video_{k}": v for k, v in scores.items() if v is not None}

    # -- pictures (W&B only) --------------------------------------------------------------------
    def _palette(self, pl_module: L.LightningModule, meta: VideoMeta) -> np.ndarray:
        return viz.palette_for(meta.source, meta.num_classes, getattr(pl_module, "label_mode", "cluster"))

    def _log_pictures(
        self,
        logger: WandbLogger,
        pl_module: L.LightningModule,
        res: VideoLabels,
        frames: np.ndarray,
        target: torch.Tensor | None,
    ) -> None:
        """Images with prediction / ground-truth masks and an overlay clip of one video's first clip."""
        import wandb

        meta = res.meta
        labels = res.labels.numpy()  # (T, H, W)
        cluster = getattr(pl_module, "label_mode", "cluster") == "cluster"
        pred_names = None if cluster else meta.class_names
        pred_kind = "cluster" if cluster else "class"
        images = []
        count = min(self.frames_per_video, res.frames)
        for i in np.linspace(0, res.frames - 1, count).round().astype(int).tolist() if count else []:
            image = viz.resize_max(frames[i], self.media_max_size)
            masks = {}
            pred = viz.resize_max(labels[i], self.media_max_size, nearest=True)
            if int(pred.max()) <= 255:  # W&B masks hold ids 0..255
                masks["prediction"] = {
                    "mask_data": pred.astype(np.uint8),
                    "class_labels": class_labels(pred, pred_names, pred_kind),
                }
            if target is not None and bool((target[i] != IGNORE_INDEX).any()):
                gt = viz.resize_max(target[i].numpy().astype(np.uint8), self.media_max_size, nearest=True)
                masks["ground_truth"] = {
                    "mask_data": gt,
                    "class_labels": class_labels(gt, meta.class_names, "class"),
                }
            images.append(
                wandb.Image(image, masks=masks or None, caption=f"{meta.video_id}/{meta.frame_names[i]}")
            )
        record: dict[str, Any] = {"trainer/global_step": self.step}
        if images:
            record[f"{self.prefix}/examples"] = images
        with tempfile.TemporaryDirectory(prefix="vss-wandb-") as tmp:
            if self.video_frames > 0:
                n = min(self.video_frames, res.frames)
                palette = self._palette(pl_module, meta)
                clip = [
                    viz.resize_max(viz.overlay(frames[i], labels[i], palette), self.media_max_size)
                    for i in range(n)
                ]
                fmt = viz.video_format()
                path = viz.write_video(Path(tmp) / f"overlay.{fmt}", clip, self.video_fps)
                if path is not None:
                    record[f"{self.prefix}/overlay_videos"] = wandb.Video(
                        str(path), caption=meta.video_id, format=fmt
                    )
            if len(record) > 1:
                logger.experiment.log(record)  # copies the media into the run before the folder goes

    # -- the end ----------------------------------------------------------------------------------
    def on_stage_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        """Score videos whose last clip never came here and log the tables (W&B)."""
        if not self._active(trainer):
            return
        for run in self._open.clear():
            self._close(pl_module, run)
        wandb_loggers = self._wandb_loggers(trainer)
        if not (wandb_loggers and self.log_table):
            return
        import wandb

        rows = [
            [
                r["video_id"], r["frames"], r["mIoU"], r["mVC8"], r["mVC16"],
                wandb.Image(r["thumbnail"]) if r["thumbnail"] is not None else None,
            ]
            for r in self.rows
        ]  # fmt: skip
        record: dict[str, Any] = {
            f"{self.prefix}/videos_table": wandb.Table(columns=TABLE_COLUMNS, data=rows)
        }
        if self.failures:
            failed = [
                [f["video_id"], f["shard"], f["key"], f["clip_index"], f["error"]] for f in self.failures
            ]
            record[f"{self.prefix}/failures_table"] = wandb.Table(columns=FAILURE_COLUMNS, data=failed)
        for logger in wandb_loggers:
            logger.experiment.log(record)
