"""k-nearest-neighbour labels equal to scikit-learn's (the scene context model's classifier, §2).

`knn_predict` reproduces scikit-learn's `KNeighborsClassifier(n_neighbors=k, algorithm="brute")`
(uniform votes, Euclidean; "auto" picks brute force for features of more than 15 channels), ties
included, on the tensors' device. How scikit-learn (1.2 to 1.9) predicts there: `predict_proba` falls
back to `kneighbors`, i.e. `ArgKmin` with the Euclidean specialisation
(`sklearn/metrics/_pairwise_distances_reduction/_argkmin.pyx.tp`):

- squared distances are `|x|^2 + (-2 x.y) + |y|^2` in float64 (float32 data is upcast), clipped at 0;
- for each query the memory points are pushed, in index order, onto a fixed-size max-heap that rejects
  a point whose distance is `>=` the heap's current maximum (`sklearn/utils/_heap.pyx::heap_push`), so
  when several points share the k-th distance, which of them are kept depends on the heap's structure
  (neither "lowest index" nor "highest index" in general);
- a tied vote goes to the smallest label (`classes_[argmax(proba)]`).

Here the distances are the same float64 decomposition, from one matrix product per chunk of queries.
A query whose k-th and (k+1)-th distances are closer than the product's rounding error bound has its
distances to all memory points recomputed position-independently (duplicated points then tie exactly)
and its neighbours chosen by replaying that heap. So the result equals scikit-learn's whenever its
arithmetic is exact or no two distances are within rounding of each other at the k-th place. The
remaining differences, all about nearly equal distances at the k-th place:
- scikit-learn's own matrix product can round the distance of a duplicated point differently
  depending on where the point falls in its 256-point chunk (seen with scipy's OpenBLAS), so it may
  break a tie that is exact here; distinct points whose distances differ only in the last bits can
  likewise be ordered differently (torch's rounding is not scikit-learn's BLAS's);
- the replay is scikit-learn's `parallel_on_X` strategy, used when there are more queries than memory
  points or `n_queries > 1024 * n_openmp_threads` (the reference's first batch always qualifies);
  otherwise it uses `parallel_on_Y`, whose per-thread heaps (their number depends on the machine) may
  keep other points among those tied at the k-th distance.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

_EPS64 = float(np.finfo(np.float64).eps)
_EXACT_ELEMENTS = 1 << 22  # (queries x memory) distances recomputed at once for near-tied queries


def knn_predict(
    memory: Tensor, memory_labels: Tensor, queries: Tensor, k: int = 4, chunk_size: int = 4096
) -> Tensor:
    """k-nearest-neighbour labels equal to scikit-learn's `KNeighborsClassifier(k, algorithm="brute")`.

    Euclidean distance, uniform votes, a tied vote goes to the smallest label, equal distances are
    resolved as scikit-learn's heap does (see the module docstring). Computed in float64 on the queries'
    device, whatever the input dtype (as scikit-learn upcasts float32).

    Args:
        memory: (N, C) features of the labelled points.
        memory_labels: (N,) int labels, any non-negative values.
        queries: (M, C) features to classify.
        k: number of neighbours, 1 <= k <= N.
        chunk_size: queries per chunk; memory use is about chunk_size * N * 8 bytes.

    Returns:
        (M,) int64 predicted labels on the queries' device.
    """
    if memory.ndim != 2 or queries.ndim != 2 or memory.shape[1] != queries.shape[1]:
        raise ValueError(
            "Expected `memory` and `queries` to be (N, C) and (M, C) tensors with the same C, but got "
            f"{tuple(memory.shape)} and {tuple(queries.shape)}."
        )
    if memory_labels.shape != memory.shape[:1] or memory_labels.is_floating_point():
        raise ValueError(
            f"Expected `memory_labels` to be an ({memory.shape[0]},) integer tensor, but got "
            f"{memory_labels.dtype} of shape {tuple(memory_labels.shape)}."
        )
    n = memory.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"Expected `k` to be between 1 and the number of memory points ({n}), but got {k}.")
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` to be at least 1, but got {chunk_size}.")
    device = queries.device
    memory = memory.detach().to(device, torch.float64)
    queries = queries.detach().to(torch.float64)
    classes, label_ids = torch.unique(memory_labels.to(device), sorted=True, return_inverse=True)
    memory_sq = memory.square().sum(dim=1)  # (N,)
    out = torch.empty(queries.shape[0], dtype=torch.int64, device=device)
    for start in range(0, queries.shape[0], chunk_size):
        chunk = queries[start : start + chunk_size]
        neighbours = _nearest(chunk, memory, memory_sq, k)  # (m, k)
        votes = torch.zeros(chunk.shape[0], classes.numel(), dtype=torch.int64, device=device)
        votes.scatter_add_(1, label_ids[neighbours], torch.ones_like(neighbours))
        out[start : start + chunk.shape[0]] = classes[votes.argmax(dim=1)]  # first max = smallest label
    return out


def _nearest(queries: Tensor, memory: Tensor, memory_sq: Tensor, k: int) -> Tensor:
    """(m, k) indices of the k nearest memory points of each query, as scikit-learn selects them."""
    n, c = memory.shape
    if n == k:
        return torch.arange(n, device=memory.device).expand(queries.shape[0], n)
    query_sq = queries.square().sum(dim=1)  # (m,)
    # scikit-learn's order of operations: (|x|^2 + (-2 x.y)) + |y|^2, then max(0, .)
    dist = (queries @ memory.T).mul_(-2.0).add_(query_sq[:, None]).add_(memory_sq[None]).clamp_(min=0.0)
    values, indices = dist.topk(k + 1, dim=1, largest=False, sorted=True)  # (m, k + 1)
    del dist
    # A matrix product may round x.y differently for two identical points (different kernels at the
    # edges of its tiles), so a tie at the k-th distance can show as a gap up to twice its error bound.
    tol = 2.0 * (c + 2) * _EPS64 * (query_sq + memory_sq.max())
    ambiguous = (values[:, k] - values[:, k - 1]) <= 2.0 * tol
    neighbours = indices[:, :k]
    if bool(ambiguous.any()):
        neighbours = neighbours.clone()
        rows = ambiguous.nonzero().squeeze(1)
        for part in rows.split(max(1, _EXACT_ELEMENTS // n)):
            exact = _rowwise_sq_distances(queries[part], memory, memory_sq).cpu().numpy()
            picked = [_sklearn_heap_select(row, k) for row in exact]
            neighbours[part] = torch.tensor(picked, dtype=torch.int64, device=memory.device)
    return neighbours


def _rowwise_sq_distances(queries: Tensor, memory: Tensor, memory_sq: Tensor) -> Tensor:
    """(g, N) squared distances whose value depends only on the two points, never on their positions.

    The dot products are accumulated channel by channel with elementwise operations, so duplicated
    points get bit-identical distances (ties exactly where scikit-learn has them).
    """
    dot = torch.zeros(queries.shape[0], memory.shape[0], dtype=torch.float64, device=memory.device)
    for ch in range(memory.shape[1]):
        dot += queries[:, ch, None] * memory[None, :, ch]
    query_sq = queries.square().sum(dim=1)
    return dot.mul_(-2.0).add_(query_sq[:, None]).add_(memory_sq[None]).clamp_(min=0.0)


def _sklearn_heap_select(distances: np.ndarray, k: int) -> list[int]:
    """Replay `sklearn.utils._heap.heap_push` over the points in index order; return the kept indices."""
    values = [math.inf] * k
    kept = [0] * k
    for index, value in enumerate(distances.tolist()):
        if value >= values[0]:
            continue
        pos = 0
        while True:
            left = 2 * pos + 1
            right = left + 1
            if left >= k:
                break
            if right >= k:
                if values[left] > value:
                    child = left
                else:
                    break
            elif values[left] >= values[right]:
                if value < values[left]:
                    child = left
                else:
                    break
            elif value < values[right]:
                child = right
            else:
                break
            values[pos], kept[pos] = values[child], kept[child]
            pos = child
        values[pos], kept[pos] = value, index
    return kept
