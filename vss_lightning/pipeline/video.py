"""The video-level algorithm around `VideoSegmenter`: clips of a video, ground-truth anchors, OOM retry.

`VideoLabeller` labels one clip at a time and keeps, per video, what the next clip of the same video
needs on this process:

- the `VideoState` of the previous clip (the context model's memory), held in a `ClipAssembler`; a
  clip that does not follow the previous clip of its video seen here starts afresh (logged);
- which videos had a clip fail: their later clips are not segmented (they would start without
  context), see `earlier_failure`;
- the seed key `"<video_id>:<frame_offset>"` of each clip, so labels never depend on the process,
  the world size or what ran before;
- with `label_mode="first_frame_gt"`, the ground-truth anchor: frame 0 (`gt_anchor="first_frame"`)
  or the first labelled frame k; with k > 0 the frames k.. are segmented forwards from it and the
  frames ..k backwards (reversed) from it, each direction with its own context model;
- on a GPU out-of-memory error, one retry with half the sampler's memory budget (`max_batch_images`,
  `vae_batch_images`), restored afterwards whatever happens;
- the label prototypes of the video (`pipeline.prototypes`: the mean feature of each final label),
  summed over the clips labelled here since the video (re)started and handed out with its last clip.

Plain PyTorch: it uses only the public API of `VideoSegmenter` and no Lightning or data layer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from vss_lightning.clips import Clip, ClipAssembler, is_last_clip
from vss_lightning.pipeline.prototypes import PrototypeAccumulator, VideoPrototypes
from vss_lightning.pipeline.segmenter import VideoSegmenter, VideoState

log = logging.getLogger(__name__)

LabelMode = Literal["cluster", "first_frame_gt"]
GtAnchor = Literal["first_frame", "first_labelled"]
FrameListener = Callable[[str, int, int], None]


class VideoClip(Clip, Protocol):
    """A clip as the labeller sees it (`data.format.VideoMeta` is one)."""

    @property
    def frame_offset(self) -> int: ...

    @property
    def frame_names(self) -> Sequence[str]: ...


def seed_key(video_id: str, frame_offset: int) -> str:
    """The segmenter's seed key of a clip: the same wherever and whenever the clip is processed."""
    return f"{video_id}:{frame_offset}"


@dataclass
class ClipLabels:
    """The labels of one clip.

    Attributes:
        labels: (T, H, W) label ids on the CPU, uint8 when every id is below 256, else int32.
        seconds: wall-clock seconds of the pipeline on the clip.
        stage_seconds: wall-clock seconds per pipeline stage.
        retried: True when the clip ran a second time with half the memory budget after an OOM.
        prototypes: with the last clip of a video, the video's label prototypes (over the clips
            labelled here since it started); None for other clips.
    """

    labels: torch.Tensor
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    retried: bool = False
    prototypes: VideoPrototypes | None = None


def map_labels(labels: torch.Tensor, mapping: dict[int, int]) -> torch.Tensor:
    """`labels` with every id replaced by `mapping[id]` (uint8 when every new id is below 256).

    Raises:
        ValueError: if a label has no entry in `mapping`.
    """
    present = labels.unique().tolist()
    missing = [v for v in present if v not in mapping]
    if missing:
        raise ValueError(f"Expected every label to have a global id, but {missing} have none.")
    lut = torch.zeros(max(present, default=0) + 1, dtype=torch.int64)
    for local in present:
        lut[local] = mapping[local]
    out = lut[labels.long()]
    return out.to(torch.uint8) if out.numel() == 0 or int(out.max()) < 256 else out.to(torch.int32)


@contextlib.contextmanager
def halved_memory_budget(segmenter: VideoSegmenter) -> Iterator[None]:
    """Halve the sampler's `max_batch_images` (at least 2) and `vae_batch_images` (at least 1) inside
    the block; the budget is restored on leaving it, also on an error."""
    sampler = segmenter.sampler
    budget = sampler.max_batch_images, sampler.vae_batch_images
    sampler.max_batch_images, sampler.vae_batch_images = max(2, budget[0] // 2), max(1, budget[1] // 2)
    try:
        yield
    finally:
        sampler.max_batch_images, sampler.vae_batch_images = budget


class VideoLabeller:
    """Labels the clips of videos with a `VideoSegmenter` (see the module docstring).

    Args:
        segmenter: the (loaded) pipeline.
        label_mode: "cluster" or "first_frame_gt" (each cluster takes the ground-truth class of the
            anchor frame).
        gt_anchor: "first_frame" or "first_labelled" (the anchor of "first_frame_gt").
        oom_retry: retry a clip once with half the memory budget on a GPU out-of-memory error.
        relabel: maps a video's prototypes to `{local label: global id}` (a corpus vocabulary); the
            clip's labels are then written in global ids. The map uses the prototypes of the clips
            labelled so far, so for a video in one clip it equals `vocabulary apply` on the local
            labels; earlier clips of a video split into clips are mapped with fewer frames' evidence.
    """

    def __init__(
        self,
        segmenter: VideoSegmenter,
        label_mode: LabelMode = "cluster",
        gt_anchor: GtAnchor = "first_frame",
        oom_retry: bool = True,
        relabel: Callable[[VideoPrototypes], dict[int, int]] | None = None,
    ) -> None:
        self.segmenter = segmenter
        self.label_mode = label_mode
        self.gt_anchor = gt_anchor
        self.oom_retry = oom_retry
        self.relabel = relabel
        self.states: ClipAssembler[VideoState] = ClipAssembler()
        self.failed: set[str] = set()  # split videos with a failed clip, until their last clip
        self.listeners: list[FrameListener] = []
        self._prototypes: dict[str, PrototypeAccumulator] = {}  # per video, until its last clip

    def reset(self) -> None:
        """Forget every video (a new run)."""
        self.states.clear()
        self.failed.clear()
        self._prototypes.clear()

    def earlier_failure(self, clip: Clip) -> str | None:
        """Why `clip` must not be segmented (an earlier clip of its video failed here), else None.

        Call it first for every clip: clip 0 starts its video afresh.
        """
        vid = clip.video_id
        if clip.clip_index == 0:
            self.states.pop(vid)
            self.failed.discard(vid)
            self._prototypes.pop(vid, None)
            return None
        if vid not in self.failed:
            return None
        if is_last_clip(clip):
            self.failed.discard(vid)
        return (
            f"An earlier clip of video {vid!r} failed on this rank; clip {clip.clip_index} was not segmented."
        )

    def skip(self, clip: Clip) -> None:
        """`clip` is not labelled here (its output is complete): its video's state goes."""
        self.states.pop(clip.video_id)
        self._prototypes.pop(clip.video_id, None)

    def label(
        self, clip: VideoClip, frames: torch.Tensor, labels: torch.Tensor | None = None, where: str = ""
    ) -> ClipLabels:
        """Label one clip, carrying its video's state from the previous clip seen here.

        Args:
            clip: the clip's identity, offset and frame names.
            frames: (T, 3, H, W) uint8 frames (any device).
            labels: (T, H, W) ground truth, `segmenter.context.ignore_index` where unlabelled (needed by
                "first_frame_gt").
            where: names the clip in messages (video and shard).

        Raises:
            Whatever the pipeline raises (e.g. torch.cuda.OutOfMemoryError twice), or ValueError when
            "first_frame_gt" has no ground truth at its anchor; the video's later clips are then
            refused by `earlier_failure`.
        """
        vid = clip.video_id
        continuing = clip.clip_index > 0 and self.states.follows(clip)
        state = self.states.last(vid) if continuing else None
        self.states.pop(vid)
        if clip.clip_index > 0 and not continuing:
            log.warning(
                f"Clip {clip.clip_index} of {where} starts without the context of clip "
                f"{clip.clip_index - 1} (not seen on this rank just before); its labels start afresh."
            )
        state = state if state is not None else VideoState()
        if not continuing:
            self._prototypes.pop(vid, None)
        try:
            gt = (
                self.anchor(clip, labels, where)
                if self.label_mode == "first_frame_gt" and not continuing
                else None
            )
            out = self._with_oom_retry(clip, frames, gt, state, where)
        except Exception:
            self._prototypes.pop(vid, None)
            if not is_last_clip(clip):
                self.failed.add(vid)
            raise
        mapping = None
        if self.relabel is not None and vid in self._prototypes:
            mapping = self.relabel(self._prototypes[vid].result(vid))
            out.labels = map_labels(out.labels, mapping)
        if not is_last_clip(clip):
            self.states.add(clip, state)
        else:
            accumulator = self._prototypes.pop(vid, None)
            if accumulator is not None and mapping is not None:
                accumulator = accumulator.remapped(mapping)  # prototypes of the ids written
            out.prototypes = accumulator.result(vid) if accumulator is not None else None
        return out

    def anchor(
        self, clip: VideoClip, labels: torch.Tensor | None, where: str = ""
    ) -> tuple[torch.Tensor, int]:
        """The ground-truth frame the labels start from and its index (see `gt_anchor`).

        Raises:
            ValueError: if that frame has no label (naming the frame and the fix).
        """
        ignore = self.segmenter.context.ignore_index
        labelled = [] if labels is None else (labels != ignore).flatten(1).any(1).nonzero().flatten().tolist()
        index = 0 if self.gt_anchor == "first_frame" else (labelled[0] if labelled else 0)
        if index not in labelled:
            name = clip.frame_names[index]
            hint = (
                "Label the first frame, use --model.gt_anchor first_labelled (start from the first "
                "labelled frame), or use --model.label_mode cluster."
                if self.gt_anchor == "first_frame"
                else "Give the video at least one labelled frame, or use --model.label_mode cluster."
            )
            raise ValueError(
                f"Expected frame {index} ({name!r}) of {where} to have a ground-truth label for "
                f"label_mode='first_frame_gt', but it has none. {hint}"
            )
        return labels[index], index

    def _with_oom_retry(
        self,
        clip: VideoClip,
        frames: torch.Tensor,
        gt: tuple[torch.Tensor, int] | None,
        state: VideoState,
        where: str,
    ) -> ClipLabels:
        """`run`; on a GPU OOM (with `oom_retry`) once more with half the memory budget."""
        try:
            return self.run(clip, frames, gt, state)
        except torch.cuda.OutOfMemoryError as e:
            if not self.oom_retry:
                raise
            log.warning(
                f"Out of memory on {where} ({str(e).splitlines()[0]}); retrying with half the memory budget."
            )
        # Outside the except block, so the failed attempt's tensors are freed before the retry.
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        with halved_memory_budget(self.segmenter):
            out = self.run(clip, frames, gt, state)
        out.retried = True
        return out

    def run(
        self,
        clip: VideoClip,
        frames: torch.Tensor,
        gt: tuple[torch.Tensor, int] | None,
        state: VideoState,
    ) -> ClipLabels:
        """Stream the clip through the segmenter into a compact (T, H, W) uint8 (or int32) tensor.

        With a ground-truth anchor at frame k > 0, frames k.. are segmented forwards from it and
        frames ..k backwards (reversed) from it; `state` follows the forward direction. Every
        listener hears `(video_id, frames_done, frames_total)` after each batch (0 at the start).
        """
        vid = clip.video_id
        t, h, w = frames.shape[0], frames.shape[-2], frames.shape[-1]
        out = torch.empty((t, h, w), dtype=torch.uint8)
        t0 = time.perf_counter()
        gt_frame, anchor = gt if gt is not None else (None, 0)
        stage_seconds: dict[str, float] = {}  # filled by the segmenter, per stage
        # (frames, direction, state, seed key)
        passes = [(frames[anchor:], 1, state, seed_key(vid, clip.frame_offset + anchor))]
        if anchor > 0:  # backwards from the anchor, whose labels the forward pass gave (context only)
            back_key = seed_key(f"{vid}:backward", clip.frame_offset + anchor)
            passes.append((frames[: anchor + 1].flip(0), -1, VideoState(), back_key))
        done = 0
        namer = self.segmenter.naming
        names = namer.class_names if namer is not None else None
        clip_sums = PrototypeAccumulator(class_names=names)  # this attempt's; merged on success
        self._tell(vid, 0, t)  # the video starts
        for part_frames, direction, part_state, key in passes:
            for part in self.segmenter.iter_segment(
                part_frames,
                gt_frame,
                part_state,
                key=key,
                seconds=stage_seconds,
                context_frames=int(direction < 0),
            ):
                labels = part.labels
                # frame i of the reversed clip is frame anchor - i (the anchor, i = 0, is context there)
                indices = [anchor + direction * i for i in part.indices]
                if labels.numel() and out.dtype == torch.uint8 and int(labels.max()) > 255:
                    out = out.to(torch.int32)
                out[indices] = labels.to(out.dtype)
                if part.features is not None:
                    clip_sums.add(
                        part.features,
                        part.coarse,
                        [clip.frame_offset + i for i in indices],
                        part.class_scores,
                    )
                done += len(indices)
                self._tell(vid, done, t)
        self._prototypes.setdefault(vid, PrototypeAccumulator(class_names=names)).merge(clip_sums)
        return ClipLabels(out, time.perf_counter() - t0, stage_seconds)

    def _tell(self, video_id: str, done: int, total: int) -> None:
        for listener in self.listeners:
            listener(video_id, done, total)
