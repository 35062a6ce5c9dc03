"""Correspondence-based refinement: parity with a naive loop, known shifts, jumps, collisions, ties."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from vss_lightning.pipeline.refine import correspondence_refine, track_cells


def naive_refine(features, coarse, weighting, jump_filter, max_jump=1):
    """The spec, one track and one cell at a time (mirrors the reference's loops)."""
    feats = features.double().numpy()
    b, h, w, c = feats.shape
    cells = h * w
    unit = feats.reshape(b, cells, c)
    unit = unit / np.linalg.norm(unit, axis=-1, keepdims=True)
    labels = coarse.numpy().reshape(b, cells)
    out = labels.copy()
    for p in range(cells):
        path = [p]
        for q in range(b - 1):
            src = unit[q, path[-1]]
            best, best_j = -np.inf, -1
            for j in range(cells):
                score = float(np.dot(src, unit[q + 1, j]))
                if weighting == "reference":
                    score = q / (q + 1) * score + 1 / (q + 1) * float(np.dot(src, unit[0, j]))
                if score > best:  # strict: the first maximum wins
                    best, best_j = score, j
            path.append(best_j)
        dropped = False
        for t in range(1, b):
            dy = path[t] // w - path[t - 1] // w
            dx = path[t] % w - path[t - 1] % w
            if jump_filter == "both" and (abs(dy) > max_jump or abs(dx) > max_jump):
                dropped = True
            if jump_filter == "reference" and (dy > max_jump or dx > max_jump):
                dropped = True
        if dropped:
            continue
        label = Counter(labels[t, path[t]] for t in range(b)).most_common(1)[0][0]  # tie: first met
        for t in range(b):
            out[t, path[t]] = label  # later (higher-index) tracks overwrite earlier ones
    return torch.from_numpy(out.reshape(b, h, w))


def drifting_features(seed: int, b: int = 4, h: int = 5, w: int = 5, c: int = 8) -> torch.Tensor:
    """A random field shifted by a random step in {-1, 0, 1}^2 per frame, plus noise: a mix of
    surviving tracks, jumps, collisions."""
    g = torch.Generator().manual_seed(seed)
    field = torch.randn(h, w, c, generator=g, dtype=torch.float64)
    frames, shift = [], [0, 0]
    for _ in range(b):
        frames.append(torch.roll(field, shifts=tuple(shift), dims=(0, 1)))
        shift = [s + int(d) for s, d in zip(shift, torch.randint(-1, 2, (2,), generator=g), strict=True)]
    noise = 0.4 * torch.randn(b, h, w, c, generator=g, dtype=torch.float64)
    return torch.stack(frames) + noise


@pytest.mark.parametrize(
    ("weighting", "jump_filter"),
    list(itertools.product(["reference", "uniform"], ["both", "reference", "none"])),
)
@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_loop(weighting, jump_filter, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    if seed % 2:
        features = torch.randn(4, 5, 5, 8, generator=g, dtype=torch.float64)  # unrelated frames
    else:
        features = drifting_features(seed)
    coarse = torch.randint(0, 3, (4, 5, 5), generator=g)  # 3 labels: majority ties happen
    got = correspondence_refine(features, coarse, weighting=weighting, jump_filter=jump_filter)
    assert got.dtype == torch.int64 and got.shape == coarse.shape
    torch.testing.assert_close(got, naive_refine(features, coarse, weighting, jump_filter), rtol=0, atol=0)
    # float32 input gives the same tracks here (no near-ties)
    got32 = correspondence_refine(features.float(), coarse, weighting=weighting, jump_filter=jump_filter)
    torch.testing.assert_close(got32, got, rtol=0, atol=0)


def test_reference_weighting_keeps_frame0_positions_in_frame1():
    features = torch.randn(5, 6, 7, 16, generator=torch.Generator().manual_seed(0))
    tracks = track_cells(features, "reference")
    assert tracks.shape == (5, 42)
    assert torch.equal(tracks[0], torch.arange(42)) and torch.equal(tracks[1], torch.arange(42))
    assert not torch.equal(track_cells(features, "uniform")[1], torch.arange(42))


@pytest.mark.parametrize("jump_filter", ["both", "none"])
def test_recovers_known_shift(jump_filter):
    """A circular shift by one cell per frame, uniform weighting: tracks follow it exactly; the coarse
    labels, corrupted at one point of every track, are restored wherever a surviving track passes."""
    b, h, w, c = 5, 6, 8, 32
    g = torch.Generator().manual_seed(3)
    field = torch.randn(h, w, c, generator=g)
    features = torch.stack([torch.roll(field, shifts=t, dims=1) for t in range(b)])
    truth0 = torch.randint(0, 4, (h, w), generator=g)
    truth = torch.stack([torch.roll(truth0, shifts=t, dims=1) for t in range(b)])
    tracks = track_cells(features, "uniform")
    ys, xs = torch.arange(h * w) // w, torch.arange(h * w) % w
    for t in range(b):
        assert torch.equal(tracks[t], ys * w + (xs + t) % w)
    coarse = truth.clone().reshape(b, h * w)
    bad_frame = torch.randint(0, b, (h * w,), generator=g)
    coarse[bad_frame, tracks[bad_frame, torch.arange(h * w)]] += 10  # one wrong point per track
    coarse = coarse.reshape(b, h, w)
    refined = correspondence_refine(features, coarse, weighting="uniform", jump_filter=jump_filter)
    if jump_filter == "none":
        assert torch.equal(refined, truth)
    else:  # tracks wrapping around the right border jump w - 1 cells: dropped, their cells stay coarse
        survivors = xs + b - 1 < w
        covered = torch.zeros(b, h * w, dtype=torch.bool)
        covered.scatter_(1, tracks[:, survivors], True)
        covered = covered.reshape(b, h, w)
        assert torch.equal(refined[covered], truth[covered])
        assert torch.equal(refined[~covered], coarse[~covered])


def swap_features(h: int, w: int, a: tuple[int, int], b: tuple[int, int]) -> torch.Tensor:
    """Two frames of one-hot cell features; in frame 1 cells `a` and `b` exchange their features."""
    eye = torch.eye(h * w)
    frame1 = eye.clone()
    ia, ib = a[0] * w + a[1], b[0] * w + b[1]
    frame1[[ia, ib]] = eye[[ib, ia]]
    return torch.stack([eye, frame1]).reshape(2, h, w, h * w)


@pytest.mark.parametrize(("a", "b"), [((2, 0), (2, 3)), ((0, 1), (3, 1)), ((0, 0), (3, 3))])
def test_jump_filter(a, b):
    """Track from `a` lands on `b` (a positive jump of 3 cells), track from `b` lands on `a` (negative)."""
    h, w = 4, 5
    features = swap_features(h, w, a, b)
    cells = torch.arange(h * w).reshape(h, w)
    coarse = torch.stack([cells, 100 + cells])  # a 2-point track's tie goes to its frame-0 label
    ia, ib = a[0] * w + a[1], b[0] * w + b[1]
    for jump_filter, a_kept, b_kept in (
        ("both", False, False),
        ("reference", False, True),
        ("none", True, True),
    ):
        out = correspondence_refine(features, coarse, weighting="uniform", jump_filter=jump_filter)[
            1
        ].reshape(-1)
        assert out[ib] == (ia if a_kept else 100 + ib), jump_filter
        assert out[ia] == (ib if b_kept else 100 + ia), jump_filter
        others = torch.ones(h * w, dtype=torch.bool)
        others[[ia, ib]] = False
        assert torch.equal(out[others], torch.arange(h * w)[others])  # unmoved tracks carry frame 0's labels
    for max_jump, kept in ((2, False), (3, True)):
        out = correspondence_refine(features, coarse, weighting="uniform", max_jump=max_jump)[1].reshape(-1)
        assert out[ib] == (ia if kept else 100 + ib)


def test_collision_highest_start_index_wins():
    """Tracks 0 and 1 both land on cell 1 of frame 1: track 1 decides; cell 0 of frame 1 is on no track."""
    h, w = 3, 3
    cells = h * w
    frame0 = torch.eye(cells, cells + 1)
    frame1 = frame0.clone()
    frame1[0] = torch.eye(cells + 1)[cells]  # unrelated to every frame-0 feature
    frame1[1] = frame0[0] + frame0[1]
    features = torch.stack([frame0, frame1]).reshape(2, h, w, cells + 1)
    tracks = track_cells(features, "uniform")
    assert tracks[1, 0] == 1 and tracks[1, 1] == 1
    coarse = torch.stack([torch.arange(cells), 50 + torch.arange(cells)]).reshape(2, h, w)
    out = correspondence_refine(features, coarse, weighting="uniform")
    assert out[1, 0, 1] == 1  # track 1 (label 1) beats track 0 (label 0)
    assert out[1, 0, 0] == 50  # on no track: keeps its coarse label
    assert torch.equal(out[0], coarse[0])


def test_majority_and_tie_to_first_met():
    b, h, w = 4, 1, 3
    features = torch.randn(1, h, w, 6, generator=torch.Generator().manual_seed(0)).expand(b, h, w, 6)
    # three static tracks with labels along time: [5, 3, 3, 5] -> 5, [3, 5, 5, 3] -> 3, [1, 2, 2, 2] -> 2
    coarse = torch.tensor([[5, 3, 1], [3, 5, 2], [3, 5, 2], [5, 3, 2]]).reshape(b, h, w)
    out = correspondence_refine(features, coarse)
    assert out.reshape(b, w).tolist() == [[5, 3, 2]] * b


def test_single_frame_and_errors():
    features = torch.randn(1, 3, 3, 4)
    coarse = torch.randint(0, 5, (1, 3, 3))
    out = correspondence_refine(features, coarse)
    assert torch.equal(out, coarse) and out is not coarse
    with pytest.raises(ValueError, match="Expected `coarse` to be a"):
        correspondence_refine(torch.randn(2, 3, 3, 4), torch.zeros(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="Expected `weighting`"):
        correspondence_refine(torch.randn(2, 3, 3, 4), torch.zeros(2, 3, 3, dtype=torch.int64), weighting="x")
    with pytest.raises(ValueError, match="Expected `jump_filter`"):
        correspondence_refine(
            torch.randn(2, 3, 3, 4), torch.zeros(2, 3, 3, dtype=torch.int64), jump_filter="x"
        )
