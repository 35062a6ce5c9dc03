"""Correspondence-based refinement, CBR (docs/method.md §3, §8).

Every cell of a batch's first frame starts a track (track p at cell p, row-major). The track is
chained frame by frame: its feature in frame q is matched, by cosine similarity over the whole of
frame q+1 (top 1), to a cell of frame q+1. With the reference weighting the similarity is blended with
the similarity to the first frame, `S = a * cos(src, F_{q+1}) + (1 - a) * cos(src, F_0)`,
`a = q / (q + 1)`, and the argmax index is taken as a cell of frame q+1. For q = 0 this is `cos(src, F_0)`
alone, whose argmax is the track's own cell: frame 1 keeps frame 0's positions. That is the
reference's behaviour (VidSeg_diffusion, `scripts/sampling/feature_extraction.py`,
`dense_feature_matching_iterative`) and the default; `weighting="uniform"` uses `a = 1` (pure chaining).

A track that moves more than `max_jump` cells in one step is dropped; each surviving track gives all
its points its majority coarse label (a tie goes to the label met first along the track); where
surviving tracks collide on a cell, the one with the highest start index decides; every other cell
keeps its coarse label.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def correspondence_refine(
    features: Tensor,
    coarse: Tensor,
    weighting: Literal["reference", "uniform"] = "reference",
    jump_filter: Literal["both", "reference", "none"] = "both",
    max_jump: int = 1,
) -> Tensor:
    """Refine a batch's coarse labels along feature correspondences.

    Args:
        features: (B, h, w, C) features used for matching (block-7 self-attention queries; any
            scale, cosine similarity is used). Similarities are computed in float64 whatever the
            dtype, so neither half precision nor TF32 matrix products
            (`torch.set_float32_matmul_precision("high")`) can change a match.
        coarse: (B, h, w) int64 coarse (KNN) labels.
        weighting: "reference" blends the similarity to frame q+1 with the similarity to frame 0 using
            `a = q / (q + 1)`; "uniform" matches to frame q+1 only.
        jump_filter: which steps drop a track: "both" when `|dy| > max_jump or |dx| > max_jump` (this
            project's default), "reference" when `dy > max_jump or dx > max_jump` only (the reference
            tests positive jumps only), "none" never.
        max_jump: the largest step, in cells, a surviving track may make.

    Returns:
        (B, h, w) int64 refined labels on `coarse.device`. For B = 1, a copy of `coarse`.
    """
    if features.ndim != 4:
        raise ValueError(
            f"Expected `features` to be a (B, h, w, C) tensor, but got shape {tuple(features.shape)}."
        )
    if coarse.shape != features.shape[:3] or coarse.is_floating_point():
        raise ValueError(
            f"Expected `coarse` to be a {tuple(features.shape[:3])} integer tensor, but got "
            f"{coarse.dtype} of shape {tuple(coarse.shape)}."
        )
    if weighting not in ("reference", "uniform"):
        raise ValueError(f"Expected `weighting` to be 'reference' or 'uniform', but got {weighting!r}.")
    if jump_filter not in ("both", "reference", "none"):
        raise ValueError(
            f"Expected `jump_filter` to be 'both', 'reference' or 'none', but got {jump_filter!r}."
        )
    if max_jump < 0:
        raise ValueError(f"Expected `max_jump` to be non-negative, but got {max_jump}.")
    b, h, w, _ = features.shape
    if b == 1:
        return coarse.clone()
    device = features.device
    tracks = track_cells(features, weighting)  # (B, P) cell index of every track in every frame
    keep = _surviving(tracks, w, jump_filter, max_jump)  # (P,)
    labels = coarse.to(device).reshape(b, h * w)  # (B, h*w)
    track_labels = _majority_first(labels.gather(1, tracks).T)  # (P,)
    # Winner of each cell: the highest start index among the surviving tracks on it (-1: none).
    start = torch.arange(h * w, device=device).expand(b, h * w)
    winner = torch.full((b, h * w), -1, dtype=torch.int64, device=device)
    winner.scatter_reduce_(1, tracks[:, keep], start[:, keep], reduce="amax")
    refined = torch.where(winner >= 0, track_labels[winner.clamp(min=0)], labels)
    return refined.reshape(b, h, w).to(coarse.device)


def track_cells(features: Tensor, weighting: Literal["reference", "uniform"] = "reference") -> Tensor:
    """Chain every cell of frame 0 through the batch by top-1 cosine matching.

    Args:
        features: (B, h, w, C) features (similarities in float64).
        weighting: "reference" or "uniform", as in `correspondence_refine`.

    Returns:
        (B, P) int64 row-major cell index of track p (started at cell p of frame 0) in each frame,
        P = h * w. Ties in the similarity go to the lowest cell index.
    """
    b, h, w, c = features.shape
    unit = F.normalize(features.reshape(b, h * w, c).to(torch.float64), dim=-1)  # (B, P, C)
    position = torch.arange(h * w, device=features.device)  # (P,)
    tracks = [position]
    for q in range(b - 1):
        src = unit[q, position]  # (P, C) the track's feature in frame q
        score = src @ unit[q + 1].T  # (P, h*w) cosine to frame q+1
        if weighting == "reference":
            # the reference's blend: q / (q + 1) * cos(src, F_{q+1}) + 1 / (q + 1) * cos(src, F_0)
            score = q / (q + 1) * score + 1 / (q + 1) * (src @ unit[0].T)
        position = score.argmax(dim=1)  # first maximum
        tracks.append(position)
    return torch.stack(tracks)


def _surviving(tracks: Tensor, width: int, jump_filter: str, max_jump: int) -> Tensor:
    """(P,) True for the tracks no step of which jumps more than `max_jump` cells."""
    if jump_filter == "none":
        return torch.ones(tracks.shape[1], dtype=torch.bool, device=tracks.device)
    dy = (tracks // width).diff(dim=0)  # (B - 1, P)
    dx = (tracks % width).diff(dim=0)
    if jump_filter == "both":
        dy, dx = dy.abs(), dx.abs()
    return ~((dy > max_jump) | (dx > max_jump)).any(dim=0)


def _majority_first(labels: Tensor) -> Tensor:
    """(P, B) labels along each track -> (P,) most frequent label, a tie to the one met first."""
    counts = (labels[:, :, None] == labels[:, None, :]).sum(dim=2)  # (P, B) count of each point's label
    # The first point whose label has the top count carries the first-met label among the tied ones.
    return labels.gather(1, counts.argmax(dim=1, keepdim=True)).squeeze(1)
