"""K-Means in PyTorch on the features' device, giving scikit-learn's clusters (issue #19).

`torch_kmeans` follows scikit-learn's `KMeans(n_clusters=K, n_init=n_init, max_iter=max_iter,
random_state=seed, tol=tol)` with its defaults (greedy k-means++ seeding, the "lloyd" algorithm), step
by step, so that on float64 data it returns the same cluster ids, not only the same partition:

- the data is centred by its mean before fitting (the centres are moved back at the end), and the
  tolerance is `tol` times the mean per-feature variance of the (uncentred) data;
- every restart seeds with greedy k-means++: the first centre is `RandomState.choice(N, p=uniform)`,
  each further centre the best (lowest potential) of `2 + int(log(K))` candidates drawn by
  `RandomState.uniform(size=trials) * potential` searched in the cumulative sum of the squared
  distances to the closest centre. The restarts share one `numpy.random.RandomState(seed)` in order,
  so its draws are made here on the CPU, in scikit-learn's order (they do not depend on the data);
- Lloyd iterations assign each point to the centre of smallest `|c|^2 - 2 x.c` (the first on a tie),
  move each centre to its points' mean, relocate empty clusters to the points farthest from their
  centres (numpy's `argpartition` picks them, as in scikit-learn), and stop when the labels do not
  change (strict convergence) or the squared centre shift is at most the tolerance; a run that did
  not converge strictly gets a final assignment step;
- the restart with the smallest inertia wins; a later restart replaces the best one only if its
  inertia is strictly smaller and its clustering differs.

The heavy work, the (N, K) distances of the assignment step, the k-means++ candidate distances and the
cluster sums, runs in torch on the data's device, batched over the restarts (they are independent, so
batching does not change any result). The arithmetic is scikit-learn's formulas in float64, so the
labels agree unless two distances tie to the last few bits (exact duplicate points, symmetric data):
there the rounding of either implementation picks the winner (equal centres, which a matmul need
not round equally, are resolved exactly: the lowest id wins). The small random draws and the
convergence tests are the only host work: each Lloyd iteration synchronises a few times with the host
on scalars and flags, never copies the data (except the N distances when a cluster runs empty).

(Longer than 400 lines because reproducing scikit-learn's ids needs each of its steps, including the
empty-cluster relocation and the restart selection, written out; they are one algorithm.)
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# Elements of the largest temporary (distances, one-hot maps, gathered centres); bounds memory to
# 128 MiB in float64 whatever N, K and the number of restarts.
MAX_TEMPORARY_ELEMENTS = 1 << 24


class KMeansResult(NamedTuple):
    """The best restart of `torch_kmeans`.

    Attributes:
        labels: (N,) int64 cluster ids in [0, K) on the input's device.
        centers: (K, C) cluster centres in the compute dtype, on the input's device.
        inertia: sum of squared distances of the points to their centres.
        n_iter: Lloyd iterations of the best restart.
    """

    labels: Tensor
    centers: Tensor
    inertia: float
    n_iter: int


def check_kmeans_arguments(features: Tensor, num_clusters: int, n_init: int, max_iter: int) -> None:
    """Raise `ValueError` for arguments K-Means cannot use (shared by both K-Means backends).

    Args:
        features: (N, C) features.
        num_clusters: number of clusters K, 1 <= K <= N.
        n_init: restarts, at least 1.
        max_iter: Lloyd iterations per restart, at least 1.
    """
    if features.ndim != 2:
        raise ValueError(
            f"Expected `features` to be an (N, C) tensor, but got shape {tuple(features.shape)}."
        )
    n = features.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(
            f"Expected `num_clusters` to be between 1 and the number of points ({n}), but got "
            f"{num_clusters}. Lower the number of clusters or cluster more frames."
        )
    if n_init < 1:
        raise ValueError(f"Expected `n_init` to be at least 1, but got {n_init}.")
    if max_iter < 1:
        raise ValueError(f"Expected `max_iter` to be at least 1, but got {max_iter}.")


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA), float32 on devices without it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def torch_kmeans(
    features: Tensor,
    num_clusters: int,
    n_init: int = 10,
    max_iter: int = 300,
    seed: int = 0,
    tol: float = 1e-4,
) -> KMeansResult:
    """K-Means on the features' device, following scikit-learn's `KMeans` (module docstring).

    Args:
        features: (N, C) features of any float dtype; computed in float64 where the device has it.
        num_clusters: number of clusters K, 1 <= K <= N.
        n_init: restarts; the best inertia wins.
        max_iter: Lloyd iterations per restart.
        seed: `random_state`; the same seed gives scikit-learn's clusters for that seed.
        tol: relative tolerance on the centre shift (scaled by the mean per-feature variance).

    Returns:
        The best restart's labels, centres, inertia and iteration count.
    """
    check_kmeans_arguments(features, num_clusters, n_init, max_iter)
    x = features.detach().to(compute_dtype(features.device))
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            "Expected `features` to be finite, but got NaN or infinite values. Check the feature "
            "extraction (e.g. fp16 overflow)."
        )
    n = x.shape[0]
    mean = _column_sum(x) / n
    x = x - mean  # centred for accurate distances, as scikit-learn does
    # numpy's `var(axis=0)` then `mean`: the tolerance scale is the mean per-feature variance
    tolerance = float(np.mean((_column_sum(x * x) / n).cpu().numpy())) * tol if tol > 0 else 0.0
    x_sq = (x * x).sum(dim=1)  # (N,)

    first, draws = _seeding_draws(n, num_clusters, n_init, seed)
    seeds = _kmeans_plusplus(x, x_sq, first, draws)  # (R, K) point indices
    labels, centers, inertia, n_iter = _lloyd(x, x[seeds], max_iter, tolerance)

    best = _best_restart(labels, inertia.tolist(), num_clusters)
    distinct = int(torch.unique(labels[best]).numel())
    if distinct < num_clusters:  # scikit-learn warns too
        warnings.warn(
            f"Expected K-Means to find {num_clusters} distinct clusters, but got {distinct}: the data has "
            "fewer distinct points than clusters (duplicate points). Lower the number of clusters.",
            UserWarning,
            stacklevel=2,
        )
    return KMeansResult(
        labels=labels[best],
        centers=centers[best] + mean,
        inertia=float(inertia[best]),
        n_iter=n_iter[best],
    )


def _column_sum(x: Tensor) -> Tensor:
    """(C,) sum over the rows, adding them one after another as numpy's `sum(axis=0)` does.

    On the CPU this is numpy's result to the bit (a cumulative sum runs in order), so the centred data
    is scikit-learn's; that matters only where two choices tie to the last bits, but costs little.
    """
    rows = max(1, MAX_TEMPORARY_ELEMENTS // x.shape[1])
    total = torch.zeros_like(x[0])
    for start in range(0, x.shape[0], rows):
        total = torch.cat([total[None], x[start : start + rows]]).cumsum(dim=0)[-1]
    return total


def _seeding_draws(n: int, k: int, n_init: int, seed: int) -> tuple[Tensor, Tensor]:
    """scikit-learn's k-means++ random draws for every restart, in its order.

    Returns:
        (R,) int64 first centres and (R, K - 1, trials) float64 uniform draws in [0, 1).
    """
    trials = 2 + int(math.log(k))
    state = np.random.RandomState(seed)
    p = np.ones(n) / n  # the normalised unit sample weights
    first = np.empty(n_init, dtype=np.int64)
    draws = np.empty((n_init, k - 1, trials))
    for r in range(n_init):
        first[r] = state.choice(n, p=p)
        # one `uniform(size=trials)` per further centre; legacy `uniform` draws one double per value in
        # order, so a single (K - 1, trials) call gives the same numbers
        draws[r] = state.uniform(size=(k - 1, trials))
    return torch.from_numpy(first), torch.from_numpy(draws)


def _squared_distances(a: Tensor, x: Tensor, x_sq: Tensor) -> Tensor:
    """(M, N) squared distances `-2 a.x + |a|^2 + |x|^2`, clipped at 0 (scikit-learn's order)."""
    a_sq = (a * a).sum(dim=1, keepdim=True)
    d = torch.addmm(a_sq, a, x.T, alpha=-2.0)
    d += x_sq
    return d.clamp_(min=0)


def _kmeans_plusplus(x: Tensor, x_sq: Tensor, first: Tensor, draws: Tensor) -> Tensor:
    """Greedy k-means++ seeding of every restart, batched over the restarts.

    Args:
        x: (N, C) centred data.
        x_sq: (N,) squared norms of `x`.
        first: (R,) first centre of each restart.
        draws: (R, K - 1, trials) uniform draws.

    Returns:
        (R, K) int64 indices of the seeds in `x`.
    """
    n, device = x.shape[0], x.device
    n_init, k_minus_1, trials = draws.shape
    group = max(1, MAX_TEMPORARY_ELEMENTS // (max(trials, 1) * n))
    out = []
    for start in range(0, n_init, group):
        idx = first[start : start + group].to(device)
        u = draws[start : start + group].to(device, x.dtype)
        g = idx.shape[0]
        rows = torch.arange(g, device=device)
        closest = _squared_distances(x[idx], x, x_sq)  # (g, N)
        potential = closest.sum(dim=1)  # (g,)
        chosen = [idx]
        for c in range(k_minus_1):
            targets = u[:, c] * potential[:, None]  # (g, trials)
            candidates = torch.searchsorted(closest.cumsum(dim=1), targets).clamp_(max=n - 1)
            d = _squared_distances(x[candidates.reshape(-1)], x, x_sq).view(g, trials, n)
            d = torch.minimum(d, closest[:, None])
            potentials = d.sum(dim=2)  # (g, trials)
            best = potentials.argmin(dim=1)  # the first of equal potentials, as numpy's argmin
            potential = potentials[rows, best]
            closest = d[rows, best]
            chosen.append(candidates[rows, best])
        out.append(torch.stack(chosen, dim=1))
    return torch.cat(out)


def _assign(x: Tensor, centers: Tensor) -> Tensor:
    """Nearest centre of every point, for every restart (the E-step).

    Args:
        x: (N, C) data.
        centers: (R, K, C) centres.

    Returns:
        (R, N) int64 labels; on a tie the lowest centre id.
    """
    r, k, c = centers.shape
    flat = centers.reshape(r * k, c)
    c_sq = (flat * flat).sum(dim=1)
    c_sq = c_sq.masked_fill(_shadowed(centers), math.inf)[None]  # (1, R K)
    rows = max(1, MAX_TEMPORARY_ELEMENTS // (r * k))
    labels = []
    for start in range(0, x.shape[0], rows):
        d = torch.addmm(c_sq, x[start : start + rows], flat.T, alpha=-2.0)  # |c|^2 - 2 x.c
        labels.append(d.view(-1, r, k).argmin(dim=2))
    return torch.cat(labels).T.contiguous()


def _shadowed(centers: Tensor) -> Tensor:
    """(R K,) whether a centre equals a lower-numbered centre of its restart.

    A point's distances to equal centres are equal in exact arithmetic, and the lowest id wins; a
    matmul need not round equal columns equally (its kernels treat edge columns apart), so the
    copies are left out of the assignment instead.
    """
    r, k, c = centers.shape
    index = torch.arange(r * k, device=centers.device)
    restart = torch.div(index, k, rounding_mode="floor").to(centers.dtype)
    _, group = torch.unique(
        torch.cat([restart[:, None], centers.reshape(r * k, c)], dim=1), dim=0, return_inverse=True
    )
    first = torch.full_like(index, r * k).scatter_reduce_(0, group, index, reduce="amin")
    return first[group] != index


def _cluster_sums(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums of the points and point counts, for every restart.

    A one-hot matmul: deterministic on every device (CUDA's `index_add_` accumulates with atomics in
    an unspecified order) and, on the CPU, as fast as `index_add_` at these sizes.

    Args:
        x: (N, C) data.
        labels: (R, N) int64 labels.
        k: number of clusters.

    Returns:
        (R, K, C) sums and (R, K) counts in `x.dtype`.
    """
    r, n = labels.shape
    counts = torch.zeros(r, k, dtype=x.dtype, device=x.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=x.dtype))
    sums = torch.zeros(r, k, x.shape[1], dtype=x.dtype, device=x.device)
    rows = max(1, MAX_TEMPORARY_ELEMENTS // (r * k))
    ids = torch.arange(k, device=x.device)[None, :, None]
    for start in range(0, n, rows):
        one_hot = labels[:, None, start : start + rows] == ids  # (R, K, n)
        sums += one_hot.to(x.dtype) @ x[start : start + rows]
    return sums, counts


def _distances_to_own_centre(x: Tensor, centers: Tensor, labels: Tensor) -> Tensor:
    """(N,) squared distance of every point to its centre, summed directly (no expansion)."""
    rows = max(1, MAX_TEMPORARY_ELEMENTS // x.shape[1])
    out = [
        ((x[s : s + rows] - centers[labels[s : s + rows]]) ** 2).sum(dim=1)
        for s in range(0, x.shape[0], rows)
    ]
    return torch.cat(out)


def _relocate_empty_clusters(
    x: Tensor, centers_old: Tensor, sums: Tensor, counts: Tensor, labels: Tensor
) -> None:
    """Give each empty cluster one of the points farthest from their centres, in place.

    The points are numpy's `argpartition` choice (on the host: its order among the farthest points is
    its own), taken out of their clusters' sums. Nothing moves when every point sits on its centre.

    Args:
        x: (N, C) data.
        centers_old: (K, C) centres of the assignment step.
        sums: (K, C) cluster sums, updated in place.
        counts: (K,) cluster counts, updated in place.
        labels: (N,) labels of the assignment step.
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    distances = _distances_to_own_centre(x, centers_old, labels).cpu().numpy()
    if distances.max() == 0:
        return
    far = np.argpartition(distances, -len(empty))[: -len(empty) - 1 : -1].tolist()
    for new_id, point in zip(empty, far, strict=True):
        old_id = int(labels[point])
        sums[old_id] -= x[point]
        sums[new_id] = x[point]
        counts[new_id] = 1
        counts[old_id] -= 1


def _average(sums: Tensor, counts: Tensor) -> Tensor:
    """New centres from sums and counts, (R, K, C).

    A cluster still empty takes the largest cluster's centre, in scikit-learn's in-place order: an
    empty cluster before the largest one gets its (not yet divided) sum, one after it its mean.
    """
    means = sums * (1.0 / counts.clamp(min=1))[..., None]  # multiply by the reciprocal, as sklearn
    largest = counts.argmax(dim=1)  # (R,) the first of equal counts
    rows = torch.arange(sums.shape[0], device=sums.device)
    before = torch.arange(sums.shape[1], device=sums.device)[None] < largest[:, None]  # (R, K)
    fill = torch.where(before[..., None], sums[rows, largest][:, None], means[rows, largest][:, None])
    return torch.where((counts > 0)[..., None], means, fill)


def _inertia(x: Tensor, centers: Tensor, labels: Tensor) -> Tensor:
    """(R,) sum of squared distances of the points to their centres, per restart."""
    return torch.stack(
        [_distances_to_own_centre(x, c, lab).sum() for c, lab in zip(centers, labels, strict=True)]
    )


def _lloyd(
    x: Tensor, centers: Tensor, max_iter: int, tolerance: float
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Lloyd iterations of all restarts, batched over the restarts that have not converged.

    Args:
        x: (N, C) centred data.
        centers: (R, K, C) initial centres.
        max_iter: iterations per restart.
        tolerance: the (scaled) tolerance on the summed squared centre shift.

    Returns:
        (R, N) int64 labels, (R, K, C) centres, (R,) inertia and the iterations of every restart.
    """
    r, k, _ = centers.shape
    centers = centers.clone()
    labels = torch.full((r, x.shape[0]), -1, dtype=torch.int64, device=x.device)
    n_iter = [0] * r
    strict = [False] * r
    active = list(range(r))
    for it in range(max_iter):
        if not active:
            break
        act = torch.tensor(active, device=x.device)
        old = centers[act]  # (A, K, C)
        new_labels = _assign(x, old)  # (A, N)
        unchanged = (new_labels == labels[act]).all(dim=1)
        labels[act] = new_labels
        sums, counts = _cluster_sums(x, new_labels, k)
        for a in torch.nonzero((counts == 0).any(dim=1)).flatten().tolist():
            _relocate_empty_clusters(x, old[a], sums[a], counts[a], new_labels[a])
        new = _average(sums, counts)
        shift = ((new - old) ** 2).sum(dim=2).sqrt()  # per centre, then squared again as sklearn
        centers[act] = new
        flags = torch.stack([unchanged, (shift**2).sum(dim=1) <= tolerance]).tolist()
        still = []
        for i, restart in enumerate(active):
            n_iter[restart] = it + 1
            if flags[0][i]:
                strict[restart] = True
            elif not flags[1][i]:
                still.append(restart)
        active = still
    loose = [i for i in range(r) if not strict[i]]
    if loose:  # the labels of the final centres
        idx = torch.tensor(loose, device=x.device)
        labels[idx] = _assign(x, centers[idx])
    return labels, centers, _inertia(x, centers, labels), n_iter


def _same_clustering(a: Tensor, b: Tensor, k: int) -> bool:
    """Whether every cluster of `a` maps to a single cluster of `b` (scikit-learn's test)."""
    mapping = torch.full((k,), -1, dtype=torch.int64, device=a.device)
    mapping[a] = b
    return bool((mapping[a] == b).all())


def _best_restart(labels: Tensor, inertia: list[float], k: int) -> int:
    """The winning restart: a later one wins on a strictly lower inertia with a different clustering."""
    best = 0
    for i in range(1, len(inertia)):
        if inertia[i] < inertia[best] and not _same_clustering(labels[i], labels[best], k):
            best = i
    return best
