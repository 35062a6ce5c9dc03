"""Scene context model: K-Means initialisation and an autoregressive KNN memory (docs/method.md §2, §8).

The first batch of a video is clustered with K-Means; the first frame's points, labelled with their
cluster id (or the majority ground-truth class of their cluster), form the memory of a KNN classifier
that labels every frame of the batch. After each batch the memory is replaced by that batch's features
and refined labels, so it never holds more than one batch whatever the video length.

The KNN classifier is `knn.knn_predict` (scikit-learn's `KNeighborsClassifier`, ties included).
K-Means runs in scikit-learn on the CPU, or on a GPU with `torch_kmeans` (the same algorithm and draws,
issue #19); see `kmeans`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor

from .knn import knn_predict
from .torch_kmeans import check_kmeans_arguments, torch_kmeans

KMeansBackend = Literal["auto", "sklearn", "torch"]
KMEANS_BACKENDS = ("auto", "sklearn", "torch")
# The parts of the segmenter's "context" stage it clocks (seconds): the K-Means initialisation of a
# video's first batch (or the per-frame K-Means of the baseline) and the KNN labels of every batch.
CONTEXT_CLOCKS = ("context_kmeans", "context_knn")


def linf_normalize(features: Tensor) -> Tensor:
    """Divide each feature vector by its largest absolute value (the reference's normalisation).

    Args:
        features: (..., C) features.

    Returns:
        (..., C) features with max-abs 1 per vector; an all-zero vector stays zero.
    """
    scale = features.abs().amax(dim=-1, keepdim=True)
    return features / torch.where(scale > 0, scale, torch.ones_like(scale))


def resolve_kmeans_backend(backend: str, device: torch.device) -> Literal["sklearn", "torch"]:
    """The K-Means implementation `backend` means for features on `device`.

    Args:
        backend: "sklearn", "torch", or "auto" ("torch" on a CUDA device, "sklearn" elsewhere).
        device: the features' device.

    Returns:
        "sklearn" or "torch".
    """
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"Expected the K-Means backend to be one of {KMEANS_BACKENDS}, but got {backend!r}.")
    if backend == "auto":
        return "torch" if device.type == "cuda" else "sklearn"
    return backend  # type: ignore[return-value]


def kmeans(
    features: Tensor,
    num_clusters: int,
    n_init: int = 10,
    max_iter: int = 300,
    seed: int = 0,
    backend: KMeansBackend = "auto",
) -> Tensor:
    """K-Means with scikit-learn's algorithm on float64 data (the reference's clustering).

    The "sklearn" backend runs scikit-learn's `KMeans` on the CPU; the "torch" backend runs
    `torch_kmeans` on the features' device, no host copy of the features, with the same clusters (the
    same ids) except where distances tie to the last bits (duplicate points, symmetric data).

    Args:
        features: (N, C) features.
        num_clusters: number of clusters K, 1 <= K <= N.
        n_init: K-Means restarts; the best inertia wins.
        max_iter: Lloyd iterations per restart.
        seed: `random_state`; the same seed gives the same clusters.
        backend: "sklearn", "torch", or "auto": "torch" for features on a CUDA device, "sklearn"
            otherwise (so CPU results do not depend on this argument).

    Returns:
        (N,) int64 cluster ids in [0, K) on `features.device`.
    """
    check_kmeans_arguments(features, num_clusters, n_init, max_iter)
    if resolve_kmeans_backend(backend, features.device) == "torch":
        return torch_kmeans(features, num_clusters, n_init=n_init, max_iter=max_iter, seed=seed).labels
    data = features.detach().to("cpu", torch.float64).numpy()
    model = KMeans(n_clusters=num_clusters, n_init=n_init, max_iter=max_iter, random_state=seed)
    labels = model.fit_predict(data)
    return torch.from_numpy(labels.astype(np.int64)).to(features.device)


def per_frame_kmeans(
    features: Tensor, num_clusters: int, n_init: int, seed: int, backend: KMeansBackend = "auto"
) -> Tensor:
    """The frame-by-frame baseline: K-Means on each frame independently (no context model).

    Cluster ids are not consistent across frames; that is what the baseline shows.

    Args:
        features: (B, h, w, C) L-inf-normalised features.
        num_clusters: K per frame.
        n_init: K-Means restarts.
        seed: K-Means seed (the same for every frame).
        backend: the K-Means backend (`kmeans`).

    Returns:
        (B, h, w) int64 cluster ids on `features.device`.
    """
    _check_grid_features(features)
    b, h, w, c = features.shape
    labels = [
        kmeans(frame.reshape(h * w, c), num_clusters, n_init=n_init, seed=seed, backend=backend)
        for frame in features
    ]
    return torch.stack(labels).reshape(b, h, w)


def resize_gt_to_grid(gt: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of a label map, picking the same pixels as PIL's `Image.resize(..., NEAREST)`.

    The reference resizes the ground truth with PIL; PIL samples source pixel
    `int(scale / 2 + i * scale)` with the position accumulated in float64, which differs from
    `torch.nn.functional.interpolate` in both "nearest" and (at rounding boundaries) "nearest-exact".

    Args:
        gt: (H, W) integer label map.
        size: (h, w) output size.

    Returns:
        (h, w) label map with `gt`'s dtype and device.
    """
    if gt.ndim != 2:
        raise ValueError(f"Expected `gt` to be an (H, W) label map, but got shape {tuple(gt.shape)}.")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"Expected `size` to be a positive (h, w), but got {size}.")
    rows = _pil_nearest_indices(gt.shape[0], size[0], gt.device)
    cols = _pil_nearest_indices(gt.shape[1], size[1], gt.device)
    return gt[rows][:, cols]


def _pil_nearest_indices(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Source index of each output pixel in PIL's nearest resize (`ImagingScaleAffine`)."""
    scale = n_in / n_out
    position = scale * 0.5
    indices = []
    for _ in range(n_out):
        indices.append(min(int(position), n_in - 1))
        position += scale
    return torch.tensor(indices, dtype=torch.int64, device=device)


def first_frame_gt_labels(clusters: Tensor, gt: Tensor, ignore_index: int = 255) -> Tensor:
    """Give each cluster the majority ground-truth class of its pixels in frame 1.

    `ignore_index` pixels do not vote (the reference counts them; this project does not, docs/method.md §8).
    A cluster whose pixels are all `ignore_index` keeps no class. A tied vote goes to the smallest class.

    Args:
        clusters: (h, w) int64 cluster ids of frame 1 at the feature grid.
        gt: (h, w) int ground truth of frame 1 at the feature grid.
        ignore_index: the ground-truth value that does not vote.

    Returns:
        (h, w) int64 class ids, `ignore_index` on clusters without a class.
    """
    if clusters.ndim != 2 or gt.shape != clusters.shape:
        raise ValueError(
            "Expected `clusters` and `gt` to be (h, w) maps of the same shape, but got "
            f"{tuple(clusters.shape)} and {tuple(gt.shape)}. Resize the ground truth with "
            "`resize_gt_to_grid`."
        )
    gt = gt.to(clusters.device, torch.int64)
    cluster_ids, cluster_index = torch.unique(clusters.reshape(-1), return_inverse=True)
    valid = gt.reshape(-1) != ignore_index
    classes, class_index = torch.unique(gt.reshape(-1)[valid], sorted=True, return_inverse=True)
    if classes.numel() == 0:
        return torch.full_like(clusters, ignore_index, dtype=torch.int64)
    counts = torch.zeros(cluster_ids.numel(), classes.numel(), dtype=torch.int64, device=clusters.device)
    counts.index_put_(
        (cluster_index[valid], class_index), torch.ones_like(class_index), accumulate=True
    )  # (clusters, classes)
    winner = torch.where(counts.sum(dim=1) > 0, classes[counts.argmax(dim=1)], ignore_index)
    return winner[cluster_index].reshape(clusters.shape)


def _check_grid_features(features: Tensor) -> None:
    if features.ndim != 4:
        raise ValueError(
            f"Expected `features` to be a (B, h, w, C) tensor, but got shape {tuple(features.shape)}."
        )


class SceneContextModel:
    """Autoregressive KNN memory (docs/method.md §2).

    The memory holds the features and labels of the last batch (frame 1 of the first batch after
    `initialise`), never more, so its size is bounded by one batch. Points labelled `ignore_index`
    are never stored. Features are expected L-inf-normalised (`linf_normalize`).

    Args:
        num_clusters: K of the K-Means initialisation.
        knn_k: neighbours of the KNN classifier.
        kmeans_n_init: K-Means restarts.
        seed: K-Means seed.
        mode: "cluster" (labels are cluster ids) or "first_frame_gt" (each cluster takes the majority
            ground-truth class of frame 1; labels are class ids).
        ignore_index: the ground-truth value that carries no class.
        kmeans_backend: the K-Means backend (`kmeans`): "auto" (torch on CUDA features, scikit-learn
            otherwise), "sklearn" or "torch".
    """

    def __init__(
        self,
        num_clusters: int = 20,
        knn_k: int = 4,
        kmeans_n_init: int = 10,
        seed: int = 0,
        mode: Literal["cluster", "first_frame_gt"] = "cluster",
        ignore_index: int = 255,
        kmeans_backend: KMeansBackend = "auto",
    ) -> None:
        if num_clusters < 1:
            raise ValueError(f"Expected `num_clusters` to be at least 1, but got {num_clusters}.")
        if knn_k < 1:
            raise ValueError(f"Expected `knn_k` to be at least 1, but got {knn_k}.")
        if kmeans_n_init < 1:
            raise ValueError(f"Expected `kmeans_n_init` to be at least 1, but got {kmeans_n_init}.")
        if kmeans_backend not in KMEANS_BACKENDS:
            raise ValueError(
                f"Expected `kmeans_backend` to be one of {KMEANS_BACKENDS}, but got {kmeans_backend!r}."
            )
        if mode not in ("cluster", "first_frame_gt"):
            raise ValueError(f"Expected `mode` to be 'cluster' or 'first_frame_gt', but got {mode!r}.")
        if mode == "cluster" and 0 <= ignore_index < num_clusters:
            raise ValueError(
                f"Expected `num_clusters` to be at most `ignore_index` ({ignore_index}) in 'cluster' mode (a "
                f"cluster id equal to it would be dropped from the memory), but got {num_clusters}."
            )
        self.num_clusters = num_clusters
        self.knn_k = knn_k
        self.kmeans_n_init = kmeans_n_init
        self.seed = seed
        self.mode = mode
        self.ignore_index = ignore_index
        self.kmeans_backend = kmeans_backend
        self._memory: Tensor | None = None  # (N, C)
        self._memory_labels: Tensor | None = None  # (N,)

    @property
    def initialised(self) -> bool:
        """Whether the memory holds points (after `initialise` or `load_state_dict`)."""
        return self._memory is not None

    @property
    def memory(self) -> tuple[Tensor, Tensor]:
        """The memory: (N, C) features and (N,) int64 labels."""
        if self._memory is None or self._memory_labels is None:
            raise RuntimeError(self._uninitialised_message())
        return self._memory, self._memory_labels

    def initialise(self, features: Tensor, first_frame_gt: Tensor | None = None) -> Tensor:
        """Cluster the first batch and store frame 1's labelled points as the memory.

        Args:
            features: (B, h, w, C) L-inf-normalised features of the first batch.
            first_frame_gt: (h, w) ground truth of frame 1 at the feature grid (required in
                "first_frame_gt" mode, ignored in "cluster" mode). A map of another size is resized
                with `resize_gt_to_grid`.

        Returns:
            (h, w) int64 labels of frame 1 (`ignore_index` where no class).
        """
        _check_grid_features(features)
        b, h, w, c = features.shape
        clusters = kmeans(
            features.reshape(b * h * w, c),
            self.num_clusters,
            n_init=self.kmeans_n_init,
            seed=self.seed,
            backend=self.kmeans_backend,
        )[: h * w].reshape(h, w)  # K-Means on the whole batch, frame 1's assignments
        if self.mode == "cluster":
            labels = clusters
        else:
            if first_frame_gt is None:
                raise ValueError(
                    "Expected `first_frame_gt` to be frame 1's ground truth in 'first_frame_gt' mode, but "
                    "got None. Pass it, or use mode='cluster'."
                )
            if first_frame_gt.ndim != 2:
                raise ValueError(
                    "Expected `first_frame_gt` to be an (H, W) map, but got shape "
                    f"{tuple(first_frame_gt.shape)}."
                )
            gt = first_frame_gt.to(features.device, torch.int64)
            if gt.shape != (h, w):
                gt = resize_gt_to_grid(gt, (h, w))
            labels = first_frame_gt_labels(clusters, gt, self.ignore_index)
        if bool((labels == self.ignore_index).all()):
            raise ValueError(
                f"Expected frame 1's ground truth to have a valid class (not {self.ignore_index}) in at "
                "least one cluster, but got none. Use a labelled first frame or mode='cluster'."
            )
        self._store(features[0], labels)
        return labels

    def predict(self, features: Tensor) -> Tensor:
        """Label a batch with the KNN classifier fitted on the memory.

        Args:
            features: (B, h, w, C) L-inf-normalised features.

        Returns:
            (B, h, w) int64 coarse labels on `features.device`.
        """
        _check_grid_features(features)
        memory, labels = self.memory
        b, h, w, c = features.shape
        if c != memory.shape[1]:
            raise ValueError(f"Expected `features` to have {memory.shape[1]} channels, but got {c}.")
        pred = knn_predict(memory.to(features.device), labels, features.reshape(b * h * w, c), k=self.knn_k)
        return pred.reshape(b, h, w)

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Replace the memory by this batch's features and labels (`ignore_index` points left out).

        Args:
            features: (B, h, w, C) L-inf-normalised features.
            labels: (B, h, w) int labels (the refined coarse masks).
        """
        _check_grid_features(features)
        if labels.shape != features.shape[:3]:
            raise ValueError(
                f"Expected `labels` to have shape {tuple(features.shape[:3])}, but got {tuple(labels.shape)}."
            )
        self._store(features, labels)

    def _store(self, features: Tensor, labels: Tensor) -> None:
        flat = features.detach().reshape(-1, features.shape[-1])  # (N, C)
        flat_labels = labels.detach().reshape(-1).to(flat.device, torch.int64)
        keep = flat_labels != self.ignore_index
        if not bool(keep.any()):
            raise ValueError(
                f"Expected `labels` to have at least one point not equal to {self.ignore_index}, but got "
                "none."
            )
        self._memory = flat[keep].clone()
        self._memory_labels = flat_labels[keep].clone()

    def state_dict(self) -> dict[str, Any]:
        """The memory, to carry the context across clips of one video ({} before `initialise`)."""
        if self._memory is None:
            return {}
        return {"memory": self._memory, "memory_labels": self._memory_labels}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a memory saved by `state_dict` ({} resets to uninitialised)."""
        if not state_dict:
            self._memory = self._memory_labels = None
            return
        memory, labels = state_dict.get("memory"), state_dict.get("memory_labels")
        if not isinstance(memory, Tensor) or not isinstance(labels, Tensor) or memory.ndim != 2:
            raise ValueError(
                "Expected `state_dict` to hold an (N, C) 'memory' and (N,) 'memory_labels' tensor, but got "
                f"keys {sorted(state_dict)}."
            )
        if labels.shape != memory.shape[:1]:
            raise ValueError(
                f"Expected 'memory_labels' to have shape ({memory.shape[0]},), but got {tuple(labels.shape)}."
            )
        self._memory = memory
        self._memory_labels = labels.to(torch.int64)

    def _uninitialised_message(self) -> str:
        return (
            "Expected the scene context model to be initialised, but got an empty memory. Call "
            "`initialise` on the first batch (or `load_state_dict`) before `predict`."
        )
