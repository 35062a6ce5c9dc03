"""Evaluation metrics: VSPW mIoU (optionally Hungarian-matched) and video consistency mVC_n.

`VideoSegmentationMetrics` (a `torchmetrics.MetricCollection`) bundles them for one split, one whole
video per `update`; it is what the LightningModule and `python -m vss_lightning.evaluate` use.
`labelled_part`, `join_parts` and `video_scores` score one video from its clips (module, W&B callback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from vss_lightning.data.format import IGNORE_INDEX
from vss_lightning.metrics.consistency import VideoConsistency, labelled_frames, video_consistency
from vss_lightning.metrics.segmentation import HungarianIoU, SegmentationIoU, hungarian_iou, segmentation_iou

__all__ = [
    "HungarianIoU",
    "SegmentationIoU",
    "VideoConsistency",
    "VideoSegmentationMetrics",
    "hungarian_iou",
    "join_parts",
    "labelled_frames",
    "labelled_part",
    "segmentation_iou",
    "video_consistency",
    "video_scores",
]

VC_LENGTHS = (8, 16)  # the window lengths n of mVC_n that VSPW reports


class _VideoCount(Metric):
    """Counts of scored frames and videos (sum-reduced); each `update` is one video's labelled frames."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("frames", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("videos", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        num_frames = target.shape[0]
        self.frames += num_frames
        self.videos += int(num_frames > 0)

    def compute(self) -> dict[str, Tensor]:
        return {"frames": self.frames, "videos": self.videos}


class _VideoConsistencyOfLabelled(VideoConsistency):
    """`VideoConsistency` of a video's labelled frames, already selected (all of them count)."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        every = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        super().update(preds, target, every)


def labelled_part(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """The labelled frames of one clip: (T', H, W) int64 predictions and their (T', H, W) targets.

    A frame is labelled when one of its target pixels is not `ignore_index`.
    """
    keep = labelled_frames(target, ignore_index)
    return pred[keep].long(), target[keep]


def join_parts(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The `labelled_part`s of a video's clips, in clip order, as one (T, H, W) prediction and target."""
    return torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])


def video_scores(
    pred: Tensor,
    target: Tensor,
    num_classes: int | None,
    matching: str = "none",
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, float | None]:
    """mIoU, mVC8 and mVC16 of one whole video on its labelled frames.

    Args:
        pred: (T, H, W) predicted ids (class ids, or cluster ids under matching).
        target: (T, H, W) ground truth, `ignore_index` where unlabelled.
        num_classes: C; None gives mIoU None.
        matching: "none" (ids are classes) or "video"/"dataset" (Hungarian matching on this video).
        ignore_index: the unlabelled value.

    Returns:
        {"mIoU", "mVC8", "mVC16"}: floats, None where undefined (no labelled frame, fewer labelled
        frames than the window, no class count).
    """
    p, t = labelled_part(pred, target, ignore_index)  # (T', H, W) labelled frames in order
    t = t.long()
    out: dict[str, float | None] = {"mIoU": None, **{f"mVC{n}": None for n in VC_LENGTHS}}
    if t.shape[0] == 0:
        return out
    if num_classes is not None:
        if matching == "none":
            iou = segmentation_iou(p, t, num_classes, ignore_index)
        else:
            top = int(p.max()) + 1 if p.numel() else 1
            iou = hungarian_iou(p, t, num_classes, ignore_index, max_pred_ids=max(256, top))
        out["mIoU"] = _finite(float(iou["mIoU"]))
    for n in VC_LENGTHS:
        out[f"mVC{n}"] = _finite(float(video_consistency(p, t, n, ignore_index)))
    return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class VideoSegmentationMetrics(MetricCollection):
    """mIoU, pixel accuracy, per-class IoU and mVC_n of a split, fed one whole video at a time.

    A `MetricCollection` of the IoU metric (`iou`: `SegmentationIoU`, or `HungarianIoU` under
    matching), one `VideoConsistency` per window length (`vc<n>`) and the frame/video counts
    (`count`); `update` selects the video's labelled frames once and feeds them to all of them.

    Only labelled frames are scored. A frame is labelled when at least one of its target pixels is not
    `ignore_index` (the shards store unlabelled frames as all-`ignore_index` maps); VSPW counts a frame
    when its mask file exists, so pass `labelled` to `update` to use that definition instead. mVC_n is
    computed over the labelled frames of each video, in order.

    Every state is sum-reduced and synced only in `compute`, which every rank must call (no per-step
    sync). Register the object as an attribute of the LightningModule so it follows the device.

    Args:
        num_classes: C; ground truth outside `[0, C)` (the ignore label included) is skipped by mIoU.
        matching: "none" (predictions are class ids), "video" (Hungarian matching of predicted ids to
            classes per video) or "dataset" (one matching over the whole split).
        ignore_index: the ignore / unlabelled value of the targets.
        max_pred_ids: bound on predicted ids under Hungarian matching.
        vc_lengths: the window lengths n of the reported mVC_n (keys `mVC{n}`).
    """

    def __init__(
        self,
        num_classes: int,
        matching: Literal["none", "video", "dataset"] = "none",
        ignore_index: int = IGNORE_INDEX,
        max_pred_ids: int = 256,
        vc_lengths: Sequence[int] = VC_LENGTHS,
    ) -> None:
        if matching not in ("none", "video", "dataset"):
            raise ValueError(f"Expected `matching` to be 'none', 'video' or 'dataset', but got {matching!r}.")
        if matching == "none":
            iou: Metric = SegmentationIoU(num_classes, ignore_index)
        else:
            iou = HungarianIoU(num_classes, matching, ignore_index, max_pred_ids)
        lengths = [int(n) for n in vc_lengths]
        vc = {f"vc{n}": _VideoConsistencyOfLabelled(n, ignore_index) for n in lengths}
        # No compute groups: metrics of one class (the mVC_n) must never share their states.
        super().__init__({"iou": iou, **vc, "count": _VideoCount()}, compute_groups=False)
        self.ignore_index = ignore_index
        self.matching = matching
        self.vc_lengths = lengths

    def update(self, pred: Tensor, target: Tensor, labelled: Tensor | None = None) -> None:
        """Add one whole video.

        Args:
            pred: (T, H, W) integer predictions (class ids, or cluster ids under matching); a negative
                id marks a missing prediction, which counts as wrong.
            target: (T, H, W) integer ground truth, `ignore_index` where unlabelled.
            labelled: optional (T,) bool marking the labelled frames; default: frames with at least one
                pixel that is not `ignore_index`.
        """
        if target.ndim != 3 or pred.shape != target.shape:
            raise ValueError(
                f"Expected `pred` and `target` to be (T, H, W) maps of one video with the same shape, "
                f"but got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        if labelled is None:
            labelled = labelled_frames(target, self.ignore_index)
        elif labelled.dtype != torch.bool or labelled.shape != target.shape[:1]:
            raise ValueError(
                f"Expected `labelled` to be a ({target.shape[0]},) bool tensor, but got "
                f"{labelled.dtype} {tuple(labelled.shape)}."
            )
        keep = labelled.to(target.device)
        super().update(pred[keep], target[keep])  # (T', H, W) labelled frames, in order

    def compute(self) -> dict[str, float | int | list[float]]:
        """Sync (under DDP) and compute; call on every rank.

        Returns:
            `mIoU`, `pixel_acc`, `per_class_iou` (C floats, NaN for classes absent from the ground
            truth), `mVC{n}` for each n, `frames` and `videos` (the videos with a labelled frame).
            Undefined values are NaN.
        """
        iou = self["iou"].compute()
        out: dict[str, float | int | list[float]] = {
            "mIoU": float(iou["mIoU"]),
            "pixel_acc": float(iou["pixel_acc"]),
            "per_class_iou": [float(v) for v in iou["per_class_iou"]],
        }
        for n in self.vc_lengths:
            out[f"mVC{n}"] = float(self[f"vc{n}"].compute())
        counts = self["count"].compute()
        out["frames"] = int(counts["frames"])
        out["videos"] = int(counts["videos"])
        return out
