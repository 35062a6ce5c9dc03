"""Scoring of modulated units (docs/method.md section 4): difference maps, mask filter, running argmax.

Shared by every diffusion family: the final latents of a label's + and - units are decoded and
clamped to [-1, 1]; the difference map (L2 over RGB, Gaussian blur, divided by its max, optional
mask filter) of each label is resized to the frame's own size and compared per pixel there, and the
argmax is the label (`LabelVote`). `upsample_labels` is the "no modulation" baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps with reflect-101 borders (OpenCV's default)."""
    if kernel_size <= 1:
        return x
    if kernel_size % 2 == 0:
        raise ValueError(f"Expected `blur_kernel` to be odd, but got {kernel_size}.")
    r = kernel_size // 2
    coords = torch.arange(kernel_size, dtype=torch.float64, device=x.device) - r
    k = torch.exp(-(coords**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    y = x.unsqueeze(1)  # (N, 1, H, W)
    y = F.pad(y, (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.squeeze(1)


def difference_maps(plus: torch.Tensor, minus: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blurred, max-normalised L2 difference of the decoded images of + and - units.

    The decodes are clamped to the image range [-1, 1] first (as the reference clamps its decodes),
    so that a few out-of-range pixels of a VAE decode (fp16 outliers) can neither dominate a map
    nor, through the normalisation by its max, flatten the rest of it.

    Args:
        plus: (N, 3, H, W) decoded images of the + units.
        minus: (N, 3, H, W) decoded images of the - units.
        kernel_size: size of the Gaussian blur.
        sigma: sigma of the Gaussian blur.

    Returns:
        (N, H, W) float32 maps in [0, 1].
    """
    diff = plus.float().clamp(-1.0, 1.0) - minus.float().clamp(-1.0, 1.0)
    d = diff.pow(2).sum(1).sqrt()
    d = gaussian_blur(d, kernel_size, sigma)
    return d / (d.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) float maps -> (N, H, W), bilinear (half-pixel centres); unchanged at the same size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class LabelVote:
    """Per-pixel argmax over per-label maps that arrive a few at a time, at the output size.

    Each map is resized bilinearly to the output size (the frame's own resolution) before it is
    compared, so an edge between two labels lands where their maps cross at that resolution. Only
    the running best score and label per output pixel are kept: memory is (frames x H x W), however
    many labels there are. A tie keeps the label added first (callers add labels in ascending order,
    so ties go to the smaller label, as `argmax` does).

    Args:
        num_frames: frames of the batch.
        size: (H, W) output size.
        device: where the scores live.
    """

    def __init__(self, num_frames: int, size: tuple[int, int], device: torch.device | str) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.scores = torch.full((num_frames, *self.size), float("-inf"), device=device)
        self.best = torch.zeros((num_frames, *self.size), dtype=torch.long, device=device)

    def add(self, frames: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor) -> None:
        """Add maps (frames may repeat, e.g. two labels of one frame).

        Args:
            frames: (n,) frame index of each map.
            maps: (n, h, w) maps at any size.
            labels: (n,) label of each map.
        """
        up = resize_maps(maps.to(self.scores.device, torch.float32), self.size)  # (n, H, W)
        # one host read of the indices per call (not two per map: on a GPU each would be a sync)
        for i, (f, label) in enumerate(zip(frames.tolist(), labels.tolist(), strict=True)):
            better = up[i] > self.scores[f]
            self.scores[f] = torch.where(better, up[i], self.scores[f])
            self.best[f] = torch.where(better, label, self.best[f])


def filter_by_mask(d: torch.Tensor, masks: torch.Tensor, strength: float) -> torch.Tensor:
    """The mask filter: d * U(M) + s * d * (1 - U(M)), U a bilinear upsampling to the map's size.

    Args:
        d: (n, H, W) difference maps.
        masks: (n, h, w) float 0/1 coarse masks of the maps' labels.
        strength: s, the weight outside the mask.
    """
    smooth = resize_maps(masks.float(), tuple(d.shape[-2:]))
    return d * smooth + strength * d * (1 - smooth)


def upsample_labels(coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The "no modulation" baseline: bilinear upsampling of one-hot coarse masks, then argmax.

    One label at a time (a running argmax, ties to the smaller label), so memory stays at a few
    (B, H, W) maps whatever the number of labels.

    Args:
        coarse: (B, h, w) int64 labels.
        size: (H, W) output size (the frames' own resolution).

    Returns:
        (B, H, W) int64 labels.
    """
    b = coarse.shape[0]
    vote = LabelVote(b, size, coarse.device)
    frames = torch.arange(b)
    for label in coarse.unique().tolist():  # ascending
        vote.add(frames, (coarse == label).float(), torch.full((b,), label))
    return vote.best


def add_unit_votes(
    vote: LabelVote,
    images: torch.Tensor,
    frames: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    blur_kernel: int,
    blur_sigma: float,
    filter_strength: float | None,
) -> None:
    """Score n (frame, label) pairs from the decodes of their + and - units and add them to `vote`.

    Args:
        vote: the batch's running argmax.
        images: (2n, 3, H, W) decoded final latents: the n + units, then the n - units.
        frames: (n,) frame index of each pair.
        masks: (n, h, w) float 0/1 coarse mask of the pair's label in its frame.
        labels: (n,) the pairs' labels (added in ascending order, so a tie keeps the smaller label).
        blur_kernel: size of the Gaussian blur of the difference maps.
        blur_sigma: sigma of that blur.
        filter_strength: s of the mask filter, or None for no filter.
    """
    n = frames.numel()
    d = difference_maps(images[:n], images[n:], blur_kernel, blur_sigma)
    if filter_strength is not None:
        d = filter_by_mask(d, masks.to(d.device), filter_strength)
    vote.add(frames, d, labels)
