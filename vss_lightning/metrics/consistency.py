"""Video consistency mVC_n, exactly as VSPW's `VC_perclip.py`.

For a video whose labelled frames, in order, are `0 .. T-1` (unlabelled frames are dropped first):

- if `T <= n` the video has no window;
- otherwise for each window start `i` in `[0, T - n)` (VSPW's `range(len - n)`: the window starting at
  `T - n` is not counted), over the frames `i .. i + n - 1`:
  `gt_common` = pixels whose ground truth is equal in all n frames, `pred_common` = pixels whose
  prediction is equal in all n frames, and `acc_i = |gt_common & pred_common| / |gt_common|`
  (NaN when `gt_common` is empty);
- mVC_n = NaN-mean of `acc_i` over all windows of all videos.

It never compares predictions with ground-truth classes. As in VSPW, every pixel counts, the ignore
label being one more ground-truth value (VSPW compares raw masks, where 0 "others" and 255 "void"
are distinct values; our shards map both to 255). A negative predicted id marks a missing prediction
and is never consistent (VSPW's PNG predictions cannot be negative, so this changes nothing there).

A frame is labelled when at least one target pixel differs from `ignore_index` (shards store
unlabelled frames as all-`ignore_index` maps; VSPW counts a frame when its mask file exists, so a
mask that is entirely void is labelled in VSPW and not here unless `labelled` is passed explicitly).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from vss_lightning.data.format import IGNORE_INDEX

_CHUNK_ELEMENTS = 1 << 25  # pixels x frames processed at once, to bound memory on long videos


def labelled_frames(target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Which frames carry a label.

    Args:
        target: (T, H, W) ground truth.
        ignore_index: the value of unlabelled pixels.

    Returns:
        (T,) bool, True where at least one pixel differs from `ignore_index`.
    """
    return (target != ignore_index).flatten(1).any(dim=1)


def _check_video(preds: Tensor, target: Tensor, labelled: Tensor | None) -> None:
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"Expected `preds` and `target` to be tensors, but got {type(preds).__name__} and "
            f"{type(target).__name__}."
        )
    if target.ndim != 3 or preds.shape != target.shape:
        raise ValueError(
            f"Expected `preds` and `target` to be (T, H, W) label maps of one video with the same shape, "
            f"but got {tuple(preds.shape)} and {tuple(target.shape)}."
        )
    if labelled is not None and (labelled.dtype != torch.bool or labelled.shape != target.shape[:1]):
        raise ValueError(
            f"Expected `labelled` to be a ({target.shape[0]},) bool tensor, but got "
            f"{labelled.dtype} {tuple(labelled.shape)}."
        )


def _window_constant(breaks: Tensor, n: int, num_windows: int) -> Tensor:
    """Which pixels are unchanged over each window.

    Args:
        breaks: (T, P) bool, `breaks[t]` True where frame t differs from frame t - 1 (row 0 unused).
        n: window length.
        num_windows: number of windows, starting at 0 .. num_windows - 1.

    Returns:
        (num_windows, P) bool, True where no break occurs in frames `i + 1 .. i + n - 1`.
    """
    counts = torch.cumsum(breaks.to(torch.int32), dim=0)  # (T, P)
    return counts[n - 1 : n - 1 + num_windows] == counts[:num_windows]


def _vc_update(
    preds: Tensor, target: Tensor, n: int, labelled: Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-window consistencies of one video.

    Args:
        preds: (T, H, W) integer predictions of all frames of one video, in order.
        target: (T, H, W) integer ground truth.
        n: window length (>= 2).
        labelled: (T,) bool, which frames are labelled; default: `labelled_frames(target, ignore_index)`.
        ignore_index: the value of unlabelled pixels.

    Returns:
        `acc_sum` (float64 scalar), the sum of the non-NaN window accuracies, and `windows` (int64
        scalar), their number.
    """
    _check_video(preds, target, labelled)
    if labelled is None:
        labelled = labelled_frames(target, ignore_index)
    keep = labelled.to(target.device)
    preds, target = preds[keep].long(), target[keep].long()
    num_frames = target.shape[0]
    acc_sum = torch.zeros((), dtype=torch.float64, device=target.device)
    windows = torch.zeros((), dtype=torch.long, device=target.device)
    if num_frames <= n:
        return acc_sum, windows
    target = target.flatten(1)  # (T, P)
    preds = preds.flatten(1)
    num_windows = num_frames - n
    step = max(1, _CHUNK_ELEMENTS // max(1, target.shape[1]) - n)
    for start in range(0, num_windows, step):
        count = min(step, num_windows - start)
        frames = slice(start, start + count + n - 1)  # the frames of windows start .. start + count - 1
        g, p = target[frames], preds[frames]
        g_breaks = torch.ones_like(g, dtype=torch.bool)
        g_breaks[1:] = g[1:] != g[:-1]
        p_breaks = torch.ones_like(p, dtype=torch.bool)
        p_breaks[1:] = (p[1:] != p[:-1]) | (p[1:] < 0)
        gt_common = _window_constant(g_breaks, n, count)  # (count, P)
        both = gt_common & _window_constant(p_breaks, n, count)
        acc = both.sum(dim=1).double() / gt_common.sum(dim=1).double()  # (count,), NaN if 0 / 0
        finite = ~acc.isnan()
        acc_sum += acc[finite].sum()
        windows += finite.sum()
    return acc_sum, windows


def video_consistency(preds: Tensor, target: Tensor, n: int = 8, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """VC_n of one video (functional form of `VideoConsistency`).

    Args:
        preds: (T, H, W) integer predictions, all frames of one video in order.
        target: (T, H, W) integer ground truth; all-`ignore_index` frames are unlabelled and dropped.
        n: window length (>= 2).
        ignore_index: the value of unlabelled pixels.

    Returns:
        Float64 scalar: mean accuracy over the non-NaN windows, NaN if there is none.
    """
    _check_n(n)
    acc_sum, windows = _vc_update(preds, target, n, ignore_index=ignore_index)
    return acc_sum / windows


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"Expected `n` (frames per window) to be an int >= 2, but got {n!r}.")


class VideoConsistency(Metric):
    """mVC_n over a split: NaN-mean of the window accuracies of all videos (see the module docstring).

    Each `update` call must receive ONE whole video (windows never span two calls). States: `acc_sum`
    (float64) and `windows` (int64), both sum-reduced, so the NaN-mean over windows is exact under DDP.

    Args:
        n: window length (VSPW reports 8 and 16).
        ignore_index: the value of unlabelled pixels (a frame with only this value is unlabelled).
        kwargs: passed to `torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 8, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_n(n)
        self.n = n
        self.ignore_index = ignore_index
        self.add_state("acc_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("windows", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, labelled: Tensor | None = None) -> None:
        """Add one whole video.

        Args:
            preds: (T, H, W) integer predictions of every frame, in order.
            target: (T, H, W) integer ground truth.
            labelled: optional (T,) bool marking the labelled frames; default: frames with at least one
                pixel that is not `ignore_index`.
        """
        acc_sum, windows = _vc_update(preds, target, self.n, labelled, self.ignore_index)
        self.acc_sum += acc_sum.to(self.acc_sum.device)
        self.windows += windows.to(self.windows.device)

    def compute(self) -> Tensor:
        return self.acc_sum / self.windows
