"""Weighted spherical (cosine) K-Means, in memory and streaming over a corpus.

Points are unit vectors x_i with weights w_i (a prototype's cell count); the objective is
sum_i w_i (1 - cos(x_i, c_{a(i)})), centroids are the normalised weighted sums of their members.

A corpus of 100k videos x 20 prototypes x 640 channels is 5 GB in float32, so `fit_streaming`
never holds it: it initialises on a seeded reservoir sample (k-means++ with `n_init` restarts, then
Lloyd, all on the sample) and then refines the centroids with full Lloyd passes that read the corpus
chunk by chunk, keeping only (G, C) sums in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Chunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (x (n, C), w (n,))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by cosine (ties to the smaller index) and the cosine to it, for unit rows."""
    cos = x @ centroids.T  # (n, G)
    best, index = cos.max(1)
    return index, best


def _kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeding with the cosine distance 1 - cos."""
    first = int(torch.multinomial(w, 1, generator=gen))
    centroids = [x[first]]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        p = w * dist**2
        index = int(torch.multinomial(p, 1, generator=gen)) if p.sum() > 0 else int(torch.argmax(w))
        centroids.append(x[index])
        dist = torch.minimum(dist, (1 - x @ x[index]).clamp_min(0))
    return torch.stack(centroids)


def _update(x: torch.Tensor, w: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros((k, x.shape[1]), dtype=x.dtype)
    sums.index_add_(0, index, x * w[:, None])
    return sums


def _reseat_empty(
    sums: torch.Tensor, old: torch.Tensor, x: torch.Tensor, w: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """Centroids from sums; an empty cluster takes the worst-fitting point (highest w (1 - cos))."""
    empty = sums.norm(dim=1) == 0
    out = normalize(sums)
    if empty.any():
        cost = w * (1 - best)
        for g in empty.nonzero().flatten().tolist():
            i = int(torch.argmax(cost))
            out[g] = x[i]
            cost[i] = -1
    return out


def lloyd(
    x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, max_iter: int = 100, tol: float = 1e-7
) -> tuple[torch.Tensor, float]:
    """Lloyd iterations on unit rows `x` (n, C) with weights `w` (n,); returns centroids and inertia."""
    k = centroids.shape[0]
    for _ in range(max_iter):
        index, best = assign(x, centroids)
        new = _reseat_empty(_update(x, w, index, k), centroids, x, w, best)
        shift = float((new - centroids).norm(dim=1).max())
        centroids = new
        if shift <= tol:
            break
    index, best = assign(x, centroids)
    return centroids, float((w * (1 - best)).sum())


def fit(
    x: torch.Tensor, w: torch.Tensor, k: int, n_init: int = 4, seed: int = 0, max_iter: int = 100
) -> tuple[torch.Tensor, float]:
    """Weighted spherical K-Means of the rows of `x` (normalised here); the best of `n_init` restarts.

    Returns:
        (k, C) unit centroids and the weighted inertia sum w (1 - cos).
    """
    x = normalize(x.to(torch.float64))
    w = w.to(torch.float64)
    if k > x.shape[0]:
        raise ValueError(f"Expected at most {x.shape[0]} global classes (one per prototype), but got {k}.")
    gen = torch.Generator().manual_seed(seed)
    best: tuple[torch.Tensor, float] | None = None
    for _ in range(n_init):
        run = lloyd(x, w, _kmeans_pp(x, w, k, gen), max_iter)
        if best is None or run[1] < best[1]:
            best = run
    return best


def reservoir(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A uniform sample of at most `size` rows of a stream (Algorithm R, seeded) and the stream's length."""
    gen = torch.Generator().manual_seed(seed)
    xs: list[torch.Tensor] = []
    ws: list[torch.Tensor] = []
    seen = 0
    for x, w in chunks:
        for i in range(x.shape[0]):
            if seen < size:
                xs.append(x[i])
                ws.append(w[i])
            else:
                j = int(torch.randint(0, seen + 1, (1,), generator=gen))
                if j < size:
                    xs[j], ws[j] = x[i], w[i]
            seen += 1
    if not xs:
        return torch.zeros((0, 0)), torch.zeros(0), 0
    return torch.stack(xs), torch.stack(ws), seen


def fit_streaming(
    chunks: Chunks,
    k: int,
    sample_size: int = 200_000,
    n_init: int = 4,
    passes: int = 10,
    seed: int = 0,
    tol: float = 1e-7,
) -> tuple[torch.Tensor, float, int]:
    """Weighted spherical K-Means over a stream read `passes + 1` times, memory O(sample + k C).

    Args:
        chunks: returns a fresh iterable of (x (n, C), w (n,)) chunks each time it is called.
        k: number of clusters.
        sample_size: rows of the reservoir sample the initialisation runs on.
        n_init: k-means++ restarts on the sample.
        passes: most full Lloyd passes over the stream after the initialisation.
        seed: seed of the sample and the k-means++ draws.
        tol: stop when no centroid moves more than this (L2).

    Returns:
        (k, C) unit centroids, the weighted inertia over the whole stream, and the number of rows.
    """
    sample_x, sample_w, total = reservoir(chunks(), sample_size, seed)
    if total < k:
        raise ValueError(
            f"Expected at least {k} prototypes for {k} global classes, but the corpus holds {total}. "
            "Lower --num_classes or add videos."
        )
    centroids, _ = fit(sample_x, sample_w, k, n_init=n_init, seed=seed)
    inertia = float("nan")
    for _ in range(passes):
        sums = torch.zeros_like(centroids)
        inertia = 0.0
        worst = (-1.0, None)
        for x, w in chunks():
            x, w = normalize(x.to(torch.float64)), w.to(torch.float64)
            index, best = assign(x, centroids)
            sums.index_add_(0, index, x * w[:, None])
            inertia += float((w * (1 - best)).sum())
            cost = w * (1 - best)
            i = int(torch.argmax(cost))
            if float(cost[i]) > worst[0]:
                worst = (float(cost[i]), x[i].clone())
        new = normalize(sums)
        empty = sums.norm(dim=1) == 0
        if empty.any():  # reseat one empty cluster per pass on the worst-fitting point
            new[empty] = centroids[empty]
            new[int(empty.nonzero()[0])] = worst[1]
        shift = float((new - centroids).norm(dim=1).max())
        centroids = new
        if shift <= tol:
            break
    return centroids, inertia, total
