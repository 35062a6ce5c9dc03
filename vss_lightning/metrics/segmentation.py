"""Dataset-level mIoU as the VSPW benchmark computes it, with optional Hungarian matching of cluster ids.

Definitions (shared by the functional core and the `Metric` classes):

- Valid pixels are those whose ground truth is in `[0, num_classes)`; the ignore index and any other
  value are skipped.
- One confusion matrix is accumulated over all valid pixels of the split. It has shape `(C, C + 1)`:
  rows are ground-truth classes, column `p < C` counts pixels predicted as class `p`, and the extra
  column `C` counts valid pixels with no usable prediction: a predicted id outside `[0, C)` (including
  a negative id, which marks a missing prediction). Those pixels are false negatives of their
  ground-truth class and false positives of no class.
- `IoU_c = TP_c / (TP_c + FP_c + FN_c)`. Per-class IoU is NaN for classes absent from the ground truth,
  and `mIoU` is the mean over the classes present in the ground truth (a class that is predicted but
  never occurs in the ground truth therefore does not lower the mean). `pixel_acc = sum(TP) / #valid`.

`torchmetrics.classification.MulticlassJaccardIndex` is not reused because it rejects predicted ids
outside `[0, C)` and averages over classes with a non-empty union instead of the classes present.

Hungarian matching (class-agnostic `cluster` outputs): predicted ids in `[0, max_pred_ids)` are
assigned one-to-one to classes maximising the total pixel overlap (`scipy.optimize.linear_sum_assignment`
with `maximize=True`, rectangular allowed), either per video (each `update` call is one whole video)
or once over the whole split. An assigned pair with zero overlap is dropped, so the result does not
depend on how the solver breaks ties between empty pairs. Pixels of predicted ids left unassigned, and
of negative ids, count as wrong (column `C`). A predicted id `>= max_pred_ids` is an error.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from vss_lightning.data.format import IGNORE_INDEX

Matching = Literal["video", "dataset"]


def _check_inputs(preds: Tensor, target: Tensor) -> None:
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"Expected `preds` and `target` to be tensors, but got {type(preds).__name__} and "
            f"{type(target).__name__}."
        )
    if preds.shape != target.shape:
        raise ValueError(
            f"Expected `preds` and `target` to have the same shape, but got {tuple(preds.shape)} and "
            f"{tuple(target.shape)}. Resize predictions to the label size before scoring."
        )
    if preds.is_floating_point() or target.is_floating_point():
        raise ValueError(
            f"Expected `preds` and `target` to be integer label maps, but got {preds.dtype} and "
            f"{target.dtype}. Take the argmax over classes first."
        )


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"Expected `num_classes` to be an int >= 2 (mIoU needs at least two classes), but got "
            f"{num_classes!r}. Pass the dataset's number of classes."
        )


def _valid(preds: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Flatten and keep the valid pixels (ground truth in `[0, num_classes)`), as int64."""
    target = target.reshape(-1).long()
    preds = preds.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    return preds[keep], target[keep]


def _confmat_update(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Confusion matrix of one batch of label maps.

    Args:
        preds: (...) integer predicted class ids; ids outside `[0, num_classes)` count as no prediction.
        target: (...) integer ground truth, same shape; values outside `[0, num_classes)` are skipped.
        num_classes: C.

    Returns:
        (C, C + 1) int64 counts; rows are ground truth, column C counts pixels with no usable prediction.
    """
    _check_inputs(preds, target)
    p, t = _valid(preds, target, num_classes)
    p = torch.where((p >= 0) & (p < num_classes), p, num_classes)
    counts = torch.bincount(t * (num_classes + 1) + p, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def _overlap_update(preds: Tensor, target: Tensor, num_classes: int, max_pred_ids: int) -> Tensor:
    """Overlap counts between predicted ids and classes, for Hungarian matching.

    Args:
        preds: (...) integer predicted ids in `[0, max_pred_ids)`; negative ids mark missing predictions.
        target: (...) integer ground truth, same shape; values outside `[0, num_classes)` are skipped.
        num_classes: C.
        max_pred_ids: P, the bound on predicted ids.

    Returns:
        (P + 1, C) int64 counts; row P counts valid pixels with a negative (missing) prediction.

    Raises:
        ValueError: if a predicted id on a valid pixel is `>= max_pred_ids`.
    """
    _check_inputs(preds, target)
    p, t = _valid(preds, target, num_classes)
    if p.numel() and int(p.max()) >= max_pred_ids:
        raise ValueError(
            f"Expected predicted ids to be in [0, {max_pred_ids}) for Hungarian matching, but got id "
            f"{int(p.max())}. Raise `max_pred_ids` (or relabel the predictions to consecutive ids)."
        )
    p = torch.where(p < 0, max_pred_ids, p)
    counts = torch.bincount(p * num_classes + t, minlength=(max_pred_ids + 1) * num_classes)
    return counts.reshape(max_pred_ids + 1, num_classes)


def _hungarian_confmat(overlap: Tensor) -> Tensor:
    """Match predicted ids to classes and turn an overlap table into a confusion matrix.

    Args:
        overlap: (P + 1, C) int64 counts from `_overlap_update` (row P: missing predictions).

    Returns:
        (C, C + 1) int64 confusion matrix on `overlap`'s device; unmatched ids go to column C.
    """
    num_ids, num_classes = overlap.shape[0] - 1, overlap.shape[1]
    table = overlap[:num_ids].cpu().numpy()
    column = np.full(num_ids, num_classes, dtype=np.int64)  # unassigned -> "no usable prediction"
    used = np.flatnonzero(table.sum(axis=1))  # ids that occur on valid pixels
    if used.size:
        rows, cols = linear_sum_assignment(table[used], maximize=True)
        kept = table[used[rows], cols] > 0  # drop empty pairs: ties between them are arbitrary
        column[used[rows[kept]]] = cols[kept]
    confmat = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    np.add.at(confmat.T, column, table)  # confmat[:, column[p]] += table[p]
    confmat[:, num_classes] += overlap[num_ids].cpu().numpy()
    return torch.from_numpy(confmat).to(overlap.device)


def _iou_compute(confmat: Tensor) -> dict[str, Tensor]:
    """mIoU, pixel accuracy and per-class IoU from a (C, C + 1) confusion matrix.

    Returns:
        `mIoU` (scalar), `pixel_acc` (scalar) and `per_class_iou` (C,), float64; NaN where undefined
        (per-class IoU of a class absent from the ground truth; everything when no pixel is valid).
    """
    cm = confmat.double()
    num_classes = cm.shape[0]
    tp = cm.diagonal()
    gt = cm.sum(dim=1)  # TP + FN, including the "no usable prediction" column
    predicted = cm[:, :num_classes].sum(dim=0)  # TP + FP
    present = gt > 0
    iou = torch.where(present, tp / (gt + predicted - tp).clamp_min(1), torch.nan)
    total = gt.sum()
    nan = torch.tensor(torch.nan, dtype=cm.dtype, device=cm.device)
    return {
        "mIoU": iou[present].mean() if bool(present.any()) else nan,
        "pixel_acc": tp.sum() / total if bool(total > 0) else nan,
        "per_class_iou": iou,
    }


def segmentation_iou(
    preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> dict[str, Tensor]:
    """VSPW mIoU of one set of label maps (functional form of `SegmentationIoU`).

    Args:
        preds: (N, H, W) or any shape, integer predicted class ids.
        target: same shape, integer ground truth; `ignore_index` and values outside `[0, C)` are skipped.
        num_classes: C.
        ignore_index: the ignore label (it must lie outside `[0, C)`).

    Returns:
        Dict with `mIoU`, `pixel_acc` and `per_class_iou` (C,), float64.
    """
    _check_num_classes(num_classes)
    _check_ignore(ignore_index, num_classes)
    return _iou_compute(_confmat_update(preds, target, num_classes))


def hungarian_iou(
    preds: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    max_pred_ids: int = 256,
) -> dict[str, Tensor]:
    """mIoU after one Hungarian matching of predicted ids to classes over all of `preds`.

    Args:
        preds: (N, H, W) or any shape, integer predicted ids in `[0, max_pred_ids)` (negative: missing).
        target: same shape, integer ground truth; `ignore_index` and values outside `[0, C)` are skipped.
        num_classes: C.
        ignore_index: the ignore label (it must lie outside `[0, C)`).
        max_pred_ids: bound on predicted ids.

    Returns:
        Dict with `mIoU`, `pixel_acc` and `per_class_iou` (C,), float64.
    """
    _check_num_classes(num_classes)
    _check_ignore(ignore_index, num_classes)
    _check_max_pred_ids(max_pred_ids)
    return _iou_compute(_hungarian_confmat(_overlap_update(preds, target, num_classes, max_pred_ids)))


def _check_ignore(ignore_index: int, num_classes: int) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
        raise ValueError(
            f"Expected `ignore_index` to be an int outside [0, {num_classes}), but got {ignore_index!r}."
        )


def _check_max_pred_ids(max_pred_ids: int) -> None:
    if not isinstance(max_pred_ids, int) or not 1 <= max_pred_ids <= 65536:
        raise ValueError(f"Expected `max_pred_ids` to be an int in [1, 65536], but got {max_pred_ids!r}.")


class SegmentationIoU(Metric):
    """Dataset-level mIoU, pixel accuracy and per-class IoU, exactly as the VSPW benchmark.

    State: `confmat` (C, C + 1) int64, sum-reduced, so the result under DDP equals a single process.
    `update` may be called with any batch of frames; `compute` returns a dict with `mIoU`,
    `pixel_acc` (scalars) and `per_class_iou` (C,), float64 (see the module docstring for the
    definitions and edge cases).

    Args:
        num_classes: C.
        ignore_index: the ignore label; ground truth outside `[0, C)` is skipped in any case.
        kwargs: passed to `torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        _check_ignore(ignore_index, num_classes)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        zeros = torch.zeros(num_classes, num_classes + 1, dtype=torch.long)
        self.add_state("confmat", default=zeros, dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add label maps.

        Args:
            preds: (T, H, W) (or any shape) integer predicted class ids.
            target: same shape, integer ground truth.
        """
        self.confmat += _confmat_update(preds, target, self.num_classes).to(self.confmat.device)

    def compute(self) -> dict[str, Tensor]:
        return _iou_compute(self.confmat)


class HungarianIoU(Metric):
    """mIoU of class-agnostic ids after Hungarian matching to classes, per video or over the split.

    - `matching="video"`: each `update` call must receive ONE whole video; its ids are matched at
      update time and only the resulting (C, C + 1) confusion matrix is kept (sum-reduced). Under DDP
      each video lives on one rank, so the result equals a single process.
    - `matching="dataset"`: a (max_pred_ids + 1, C) overlap table is accumulated (sum-reduced) and
      matched once at `compute`; `update` may receive any batch of frames.

    `compute` returns the same dict as `SegmentationIoU`.

    Args:
        num_classes: C.
        matching: "video" or "dataset".
        ignore_index: the ignore label; ground truth outside `[0, C)` is skipped in any case.
        max_pred_ids: predicted ids must be in `[0, max_pred_ids)` (negative ids mark missing
            predictions and count as wrong); a larger id raises a ValueError.
        kwargs: passed to `torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        matching: Matching = "video",
        ignore_index: int = IGNORE_INDEX,
        max_pred_ids: int = 256,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        _check_ignore(ignore_index, num_classes)
        _check_max_pred_ids(max_pred_ids)
        if matching not in ("video", "dataset"):
            raise ValueError(f"Expected `matching` to be 'video' or 'dataset', but got {matching!r}.")
        self.num_classes = num_classes
        self.matching = matching
        self.ignore_index = ignore_index
        self.max_pred_ids = max_pred_ids
        if matching == "video":
            zeros = torch.zeros(num_classes, num_classes + 1, dtype=torch.long)
            self.add_state("confmat", default=zeros, dist_reduce_fx="sum")
        else:
            zeros = torch.zeros(max_pred_ids + 1, num_classes, dtype=torch.long)
            self.add_state("overlap", default=zeros, dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one whole video (`matching="video"`) or any frames (`matching="dataset"`).

        Args:
            preds: (T, H, W) integer predicted ids.
            target: (T, H, W) integer ground truth.
        """
        overlap = _overlap_update(preds, target, self.num_classes, self.max_pred_ids)
        if self.matching == "video":
            self.confmat += _hungarian_confmat(overlap).to(self.confmat.device)
        else:
            self.overlap += overlap.to(self.overlap.device)

    def compute(self) -> dict[str, Tensor]:
        confmat = self.confmat if self.matching == "video" else _hungarian_confmat(self.overlap)
        return _iou_compute(confmat)
