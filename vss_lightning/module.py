"""`ZeroShotVSS`: the LightningModule shell around the plain-PyTorch `VideoSegmenter`.

No trainable parameters and no training: `predict_step` labels one video (or clip) per step and
hands the labels to the writer (`io.writer.PseudoLabelWriter`); `test_step`/`validation_step` do the
same and score the labels against the ground truth. The backbone is loaded in `setup` (on this
rank's device), so building the module (`--help`, `--print_config`) costs nothing.

Per step, with one `VideoSample` (or `FailedSample`) as the batch:

1. a `FailedSample` becomes a `VideoFailed` (or raises with `on_error="fail"`);
2. in predict, the writer is asked whether the video is already complete with the same settings
   hash; if so the step returns `VideoSkipped` without running the pipeline;
3. the pipeline runs with seed key `"<video_id>:<frame_offset>"` (labels do not depend on the rank
   or the world size) and, for a video split into clips, the `VideoState` of the previous clip of
   the same video on this rank; a GPU out-of-memory error is retried once with half the memory
   budget; any other error becomes a `VideoFailed` naming the video and shard.

No collective runs per step, so ranks with different numbers of videos never wait on each other;
the evaluation metrics sync once, at the end of test/validate, on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics.aggregation import SumMetric

from vss_lightning.data.format import IGNORE_INDEX, FailedSample, SampleError, VideoSample
from vss_lightning.io.summary import (
    VideoFailed,
    VideoLabels,
    VideoResult,
    VideoSkipped,
    atomic_write,
    json_bytes,
)
from vss_lightning.io.writer import PseudoLabelWriter
from vss_lightning.metrics import VideoSegmentationMetrics
from vss_lightning.pipeline.segmenter import VideoSegmenter, VideoState

log = logging.getLogger(__name__)

LabelMode = Literal["cluster", "first_frame_gt"]
METRICS = "metrics.json"


def seed_key(video_id: str, frame_offset: int) -> str:
    """The segmenter's seed key of a clip: the same wherever and whenever the clip is processed."""
    return f"{video_id}:{frame_offset}"


class ZeroShotVSS(L.LightningModule):
    """Zero-shot video semantic segmentation (no training) as a LightningModule.

    Args:
        segmenter: the pipeline and its settings (default: `VideoSegmenter()`, Stable Diffusion 2.1
            base with the paper's settings).
        label_mode: "cluster" (labels are cluster ids, consistent within a video; pure zero-shot) or
            "first_frame_gt" (each cluster takes the majority ground-truth class of frame 0, which
            must be labelled; the evaluation protocol of the paper).
        gt_anchor: which ground-truth frame `first_frame_gt` starts from: "first_frame" (frame 0, the
            paper's protocol) or "first_labelled" (the first frame with a label, e.g. the 20th frame
            of a Cityscapes snippet: the video is segmented forwards from that frame and, for the
            frames before it, backwards from it, each direction with its own context model).
        num_classes: number of ground-truth classes, for the metrics of test/validate; None takes the
            datamodule's `dataset_info` (the shards' `manifest.json`), which must agree when both are set.
        matching: how predicted ids meet classes in the metrics: "auto" ("none" for first_frame_gt,
            per-"video" Hungarian matching for cluster), "none", "video" or "dataset".
        on_error: "skip" records a video that cannot be read or segmented as failed and goes on;
            "fail" raises.
        oom_retry: on a GPU out-of-memory error, retry the video once with half the segmenter's
            `max_batch_images` and `vae_batch_images`, then record it as failed.
    """

    def __init__(
        self,
        segmenter: VideoSegmenter | None = None,
        label_mode: LabelMode = "cluster",
        gt_anchor: Literal["first_frame", "first_labelled"] = "first_frame",
        num_classes: int | None = None,
        matching: Literal["auto", "none", "video", "dataset"] = "auto",
        on_error: Literal["skip", "fail"] = "skip",
        oom_retry: bool = True,
    ) -> None:
        super().__init__()
        if label_mode not in ("cluster", "first_frame_gt"):
            raise ValueError(
                f"Expected `label_mode` to be 'cluster' or 'first_frame_gt', but got {label_mode!r}."
            )
        if gt_anchor not in ("first_frame", "first_labelled"):
            raise ValueError(
                f"Expected `gt_anchor` to be 'first_frame' or 'first_labelled', but got {gt_anchor!r}."
            )
        if matching not in ("auto", "none", "video", "dataset"):
            raise ValueError(
                f"Expected `matching` to be 'auto', 'none', 'video' or 'dataset', but got {matching!r}."
            )
        if on_error not in ("skip", "fail"):
            raise ValueError(f"Expected `on_error` to be 'skip' or 'fail', but got {on_error!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(
                f"Expected `num_classes` to be a positive integer or None, but got {num_classes!r}."
            )
        self.segmenter = segmenter if segmenter is not None else VideoSegmenter()
        self.label_mode = label_mode
        self.gt_anchor = gt_anchor
        self.num_classes = num_classes
        self._given_num_classes = num_classes  # `num_classes` resolves against the manifest per test run
        self.matching = (
            matching if matching != "auto" else ("none" if label_mode == "first_frame_gt" else "video")
        )
        self.on_error = on_error
        self.oom_retry = oom_retry
        self.metrics: VideoSegmentationMetrics | None = None
        self.failed_count: SumMetric | None = None
        self._states: dict[str, tuple[int, VideoState]] = {}  # video id -> (next clip index, state)
        self._failed_videos: set[str] = set()  # multi-clip videos with a failed clip on this rank
        self._eval_parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._hash: str | None = None
        self._frame_listeners: list[Callable[[str, int, int], None]] = []

    def add_frame_listener(self, listener: Callable[[str, int, int], None]) -> None:
        """Call `listener(video_id, frames_done, frames_total)` whenever a batch of a video's frames is
        labelled (e.g. a progress bar showing progress inside long videos). Added once."""
        if listener not in self._frame_listeners:
            self._frame_listeners.append(listener)

    # -- set-up ---------------------------------------------------------------------------------
    def load(self, device: torch.device | str = "cpu") -> ZeroShotVSS:
        """Load the backbone on `device` (done by `setup` under a Trainer); returns self."""
        if not self.segmenter.loaded:
            self.segmenter.load(device)
        return self

    def setup(self, stage: str) -> None:
        if stage in ("test", "validate"):
            self.num_classes = self._eval_num_classes(stage)
            self.metrics = VideoSegmentationMetrics(self.num_classes, matching=self.matching)
            self.failed_count = SumMetric()
            self.failed_count.update(0.0)  # a defined sum on every rank, even with no failure
        self.load(self.trainer.strategy.root_device)
        self._reset_videos()

    def _eval_num_classes(self, stage: str) -> int:
        """C for the metrics: `num_classes` as given, else the datamodule's manifest (`dataset_info`).

        Raises:
            ValueError: if neither tells C, or the given value disagrees with the manifest.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        info = getattr(datamodule, "dataset_info", None)
        manifest = getattr(info, "num_classes", None)
        where = ", ".join(getattr(info, "manifests", ()))
        if self._given_num_classes is None:
            if manifest is None:
                raise ValueError(
                    f"Expected `--model.num_classes` to be set for `{stage}` (the metrics need it), but got "
                    "None and the shards' manifest.json records none. Set it in the config (e.g. 124 for "
                    "VSPW) or pass --model.num_classes N."
                )
            return manifest
        if manifest is not None and manifest != self._given_num_classes:
            raise ValueError(
                f"Expected `--model.num_classes` to match the shards' manifest.json ({manifest}), but got "
                f"{self._given_num_classes}. Pass --model.num_classes {manifest}, or leave it unset to take "
                f"it from {where}."
            )
        return self._given_num_classes

    def settings_hash(self) -> str:
        """A hash of everything that changes the labels (segmenter settings, label mode, backbone)."""
        if self._hash is None:
            payload = {
                "segmenter": self.segmenter.settings(),
                "label_mode": self.label_mode,
                "backbone": self.segmenter.backbone.description,
            }
            text = json.dumps(payload, sort_keys=True, default=repr)
            self._hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._hash

    def output_info(self) -> dict[str, Any]:
        """What the writer records next to the labels."""
        return {
            "settings_hash": self.settings_hash(),
            "label_mode": self.label_mode,
            "backbone": self.segmenter.backbone.description,
        }

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Frames stay on the CPU: the segmenter moves one frame batch at a time to its device.
        return batch

    def _reset_videos(self) -> None:
        self._states.clear()
        self._failed_videos.clear()
        self._eval_parts.clear()

    # -- steps ----------------------------------------------------------------------------------
    def predict_step(self, batch: VideoSample | FailedSample, batch_idx: int) -> VideoResult:
        return self.run_sample(batch, skip_complete=True)

    def test_step(self, batch: VideoSample | FailedSample, batch_idx: int) -> VideoResult:
        result = self.run_sample(batch, skip_complete=False)
        self._score(batch, result)
        return result

    def validation_step(self, batch: VideoSample | FailedSample, batch_idx: int) -> VideoResult:
        result = self.run_sample(batch, skip_complete=False)
        self._score(batch, result)
        return result

    def _writer(self) -> PseudoLabelWriter | None:
        if self._trainer is None:
            return None
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, PseudoLabelWriter)), None)

    def run_sample(self, sample: VideoSample | FailedSample, skip_complete: bool = True) -> VideoResult:
        """Label one sample; see the module docstring for the steps.

        Args:
            sample: a `VideoSample` (frames (T, 3, H, W) uint8) or a `FailedSample`.
            skip_complete: ask the writer first and skip a video whose output is complete.

        Returns:
            `VideoLabels` ((T, H, W) labels on the CPU), `VideoSkipped` or `VideoFailed`.
        """
        if isinstance(sample, FailedSample):
            if self.on_error == "fail":
                raise SampleError(sample.error)
            log.warning(f"Failed sample {sample.where}: {sample.error}")
            return VideoFailed(sample.video_id, sample.key, sample.url, sample.error)
        if not isinstance(sample, VideoSample):
            raise TypeError(
                "Expected each batch to be one VideoSample or FailedSample (VideoShardDataModule, "
                f"batch_size=None), but got {type(sample).__name__}."
            )
        meta = sample.meta
        vid, last_clip = meta.video_id, meta.clip_index >= meta.num_clips - 1
        if meta.clip_index == 0:
            self._states.pop(vid, None)
            self._failed_videos.discard(vid)
        elif vid in self._failed_videos:
            if last_clip:
                self._failed_videos.discard(vid)
            return VideoFailed(
                vid,
                sample.key,
                sample.url,
                f"An earlier clip of video {vid!r} failed on this rank; "
                f"clip {meta.clip_index} was not segmented.",
                meta.clip_index,
            )
        writer = self._writer() if skip_complete else None
        if writer is not None and writer.is_complete(meta):
            self._states.pop(vid, None)
            return VideoSkipped(meta, sample.key, sample.url, ignored_fields=sample.ignored_fields)
        expected, state = self._states.pop(vid, (0, None))
        continuing = state is not None and expected == meta.clip_index
        if meta.clip_index > 0 and not continuing:
            log.warning(
                f"Clip {meta.clip_index} of {sample.where} starts without the context of clip "
                f"{meta.clip_index - 1} (not seen on this rank just before); its labels start afresh."
            )
        state = state if continuing else VideoState()
        try:
            gt = (
                self._first_frame_gt(sample)
                if self.label_mode == "first_frame_gt" and not continuing
                else None
            )
            labels, seconds, stage_seconds, retried = self._segment(sample, gt, state)
        except Exception as e:  # noqa: BLE001 - one bad video must not stop a labelling job (on_error)
            if not last_clip:
                self._failed_videos.add(vid)
            message = f"Expected to segment {sample.where}, but it failed with {type(e).__name__}: {e}"
            if self.on_error == "fail":
                raise RuntimeError(f"{message}. Pass --on_error skip to record it and go on.") from e
            log.warning(message)
            return VideoFailed(vid, sample.key, sample.url, message, meta.clip_index)
        if not last_clip:
            self._states[vid] = (meta.clip_index + 1, state)
        return VideoLabels(
            meta, labels, sample.key, sample.url, seconds, retried, stage_seconds,
            ignored_fields=sample.ignored_fields,  # shard members outside the schema (issue #11)
        )  # fmt: skip

    def _first_frame_gt(self, sample: VideoSample) -> tuple[torch.Tensor, int]:
        """The ground-truth frame the labels start from and its index (see `gt_anchor`)."""
        ignore = self.segmenter.ignore_index
        labelled = (
            []
            if sample.labels is None
            else (sample.labels != ignore).flatten(1).any(1).nonzero().flatten().tolist()
        )
        index = 0 if self.gt_anchor == "first_frame" else (labelled[0] if labelled else 0)
        if index not in labelled:
            name = sample.meta.frame_names[index]
            hint = (
                "Label the first frame, use --model.gt_anchor first_labelled (start from the first "
                "labelled frame), or use --model.label_mode cluster."
                if self.gt_anchor == "first_frame"
                else "Give the video at least one labelled frame, or use --model.label_mode cluster."
            )
            raise ValueError(
                f"Expected frame {index} ({name!r}) of {sample.where} to have a ground-truth label for "
                f"label_mode='first_frame_gt', but it has none. {hint}"
            )
        return sample.labels[index], index

    def _segment(
        self, sample: VideoSample, gt: tuple[torch.Tensor, int] | None, state: VideoState
    ) -> tuple[torch.Tensor, float, dict[str, float], bool]:
        """Run the pipeline; on a GPU OOM retry once with half the memory budget."""
        try:
            return *self._run(sample, gt, state), False
        except torch.cuda.OutOfMemoryError as e:
            if not self.oom_retry:
                raise
            log.warning(
                f"Out of memory on {sample.where} ({str(e).splitlines()[0]}); retrying with half the "
                "memory budget."
            )
        # Outside the except block, so the failed attempt's tensors are freed before the retry.
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        sampler = self.segmenter.sampler
        budget = sampler.max_batch_images, sampler.vae_batch_images
        sampler.max_batch_images, sampler.vae_batch_images = max(2, budget[0] // 2), max(1, budget[1] // 2)
        try:
            return *self._run(sample, gt, state), True
        finally:
            sampler.max_batch_images, sampler.vae_batch_images = budget

    def _run(
        self, sample: VideoSample, gt: tuple[torch.Tensor, int] | None, state: VideoState
    ) -> tuple[torch.Tensor, float, dict[str, float]]:
        """Stream the video through the segmenter into a compact (T, H, W) uint8 (or int32) tensor.

        With a ground-truth anchor at frame k > 0, frames k.. are segmented forwards from it and
        frames ..k backwards (reversed) from it; `state` follows the forward direction.

        Returns:
            The labels, the wall-clock seconds and the seconds per pipeline stage.
        """
        frames = sample.frames
        t, h, w = frames.shape[0], frames.shape[-2], frames.shape[-1]
        out = torch.empty((t, h, w), dtype=torch.uint8)
        t0 = time.perf_counter()
        gt_frame, anchor = gt if gt is not None else (None, 0)
        key = seed_key(sample.meta.video_id, sample.meta.frame_offset + anchor)
        stage_seconds: dict[str, float] = {}  # filled by the segmenter, per stage
        passes = [(frames[anchor:], 1, state, key)]  # (frames, direction, state, seed key)
        done = 0
        for listener in self._frame_listeners:  # the video starts
            listener(sample.meta.video_id, 0, t)
        if anchor > 0:
            back_key = seed_key(f"{sample.meta.video_id}:backward", sample.meta.frame_offset + anchor)
            passes.append((frames[: anchor + 1].flip(0), -1, VideoState(), back_key))
        for clip, direction, clip_state, clip_key in passes:
            for part in self.segmenter.iter_segment(
                clip, gt_frame, clip_state, key=clip_key, seconds=stage_seconds
            ):
                labels = part.labels
                if direction < 0:  # frame i of the reversed clip is frame anchor - i; the anchor is done
                    keep = [j for j, i in enumerate(part.indices) if i > 0]
                    indices, labels = [anchor - part.indices[j] for j in keep], labels[keep]
                else:
                    indices = [anchor + i for i in part.indices]
                if labels.numel() and out.dtype == torch.uint8 and int(labels.max()) > 255:
                    out = out.to(torch.int32)
                out[indices] = labels.to(out.dtype)
                done += len(indices)
                for listener in self._frame_listeners:
                    listener(sample.meta.video_id, done, t)
        return out, time.perf_counter() - t0, stage_seconds

    # -- evaluation -----------------------------------------------------------------------------
    def _score(self, sample: VideoSample | FailedSample, result: VideoResult) -> None:
        """Add a video's labelled frames to the metrics (clips are joined per video first)."""
        if self.metrics is None:
            return
        if isinstance(result, VideoFailed):
            self.failed_count.update(1.0)
            if result.video_id is not None:
                self._eval_parts.pop(result.video_id, None)
            return
        if not isinstance(result, VideoLabels) or sample.labels is None:
            return
        target = sample.labels
        keep = (target != IGNORE_INDEX).flatten(1).any(1)  # (T,) labelled frames
        parts = self._eval_parts.setdefault(result.meta.video_id, [])
        parts.append((result.labels[keep].long(), target[keep]))
        if result.meta.clip_index >= result.meta.num_clips - 1:
            self._update_metrics(self._eval_parts.pop(result.meta.video_id))

    def _update_metrics(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        pred = torch.cat([p for p, _ in parts]).to(self.device)
        target = torch.cat([t for _, t in parts]).to(self.device)
        self.metrics.update(pred, target, torch.ones(target.shape[0], dtype=torch.bool, device=self.device))

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def _finish_eval(self, prefix: str) -> None:
        """Compute the metrics on every rank (the one sync), log them, write metrics.json on rank 0."""
        if self.metrics is None:
            return
        for parts in self._eval_parts.values():  # videos whose last clip was not seen on this rank
            self._update_metrics(parts)
        self._eval_parts.clear()
        results: dict[str, Any] = self.metrics.compute()
        results["failed_videos"] = int(self.failed_count.compute())
        scalars = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
        self.log_dict({f"{prefix}/{k}": v for k, v in scalars.items()}, rank_zero_only=True)
        writer = self._writer()
        if self.trainer.is_global_zero and writer is not None:
            record = {
                **results,
                **self.output_info(),
                "stage": prefix,
                "matching": self.matching,
                "num_classes": self.num_classes,
            }
            atomic_write(Path(writer.root) / METRICS, json_bytes(record))
        self.metrics.reset()
        self.failed_count.reset()

    def on_predict_epoch_end(self) -> None:
        self._reset_videos()
