"""Evaluation metrics: VSPW mIoU (optionally Hungarian-matched) and video consistency mVC_n.

`VideoSegmentationMetrics` bundles them for one split, one whole video per `update`; it is what the
LightningModule and `python -m vss_lightning.evaluate` use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from vss_lightning.data.format import IGNORE_INDEX
from vss_lightning.metrics.consistency import VideoConsistency, labelled_frames, video_consistency
from vss_lightning.metrics.segmentation import HungarianIoU, SegmentationIoU, hungarian_iou, segmentation_iou

__all__ = [
    "HungarianIoU",
    "SegmentationIoU",
    "VideoConsistency",
    "VideoSegmentationMetrics",
    "hungarian_iou",
    "labelled_frames",
    "segmentation_iou",
    "video_consistency",
]


class _VideoCount(Metric):
    """Counts of scored frames and videos (sum-reduced)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("frames", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("videos", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_frames: int) -> None:
        self.frames += num_frames
        self.videos += int(num_frames > 0)

    def compute(self) -> dict[str, Tensor]:
        return {"frames": self.frames, "videos": self.videos}


class VideoSegmentationMetrics(nn.Module):
    """mIoU, pixel accuracy, per-class IoU and mVC_n of a split, fed one whole video at a time.

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
        vc_lengths: Sequence[int] = (8, 16),
    ) -> None:
        super().__init__()
        if matching not in ("none", "video", "dataset"):
            raise ValueError(f"Expected `matching` to be 'none', 'video' or 'dataset', but got {matching!r}.")
        self.ignore_index = ignore_index
        self.matching = matching
        if matching == "none":
            self.iou: Metric = SegmentationIoU(num_classes, ignore_index)
        else:
            self.iou = HungarianIoU(num_classes, matching, ignore_index, max_pred_ids)
        self.vc_lengths = [int(n) for n in vc_lengths]
        self.vc = nn.ModuleDict({str(n): VideoConsistency(n, ignore_index) for n in self.vc_lengths})
        self.count = _VideoCount()

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
        pred, target = pred[keep], target[keep]  # (T', H, W) labelled frames, in order
        self.iou.update(pred, target)
        all_frames = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        for metric in self.vc.values():
            metric.update(pred, target, all_frames)
        self.count.update(target.shape[0])

    def compute(self) -> dict[str, float | int | list[float]]:
        """Sync (under DDP) and compute; call on every rank.

        Returns:
            `mIoU`, `pixel_acc`, `per_class_iou` (C floats, NaN for classes absent from the ground
            truth), `mVC{n}` for each n, `frames` and `videos` (the videos with a labelled frame).
            Undefined values are NaN.
        """
        iou = self.iou.compute()
        out: dict[str, float | int | list[float]] = {
            "mIoU": float(iou["mIoU"]),
            "pixel_acc": float(iou["pixel_acc"]),
            "per_class_iou": [float(v) for v in iou["per_class_iou"]],
        }
        for n, metric in self.vc.items():
            out[f"mVC{n}"] = float(metric.compute())
        counts = self.count.compute()
        out["frames"] = int(counts["frames"])
        out["videos"] = int(counts["videos"])
        return out

    def reset(self) -> None:
        """Clear every state (e.g. at the start of a test epoch)."""
        self.iou.reset()
        for metric in self.vc.values():
            metric.reset()
        self.count.reset()
