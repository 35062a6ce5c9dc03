"""Scene context model: K-Means, KNN parity with scikit-learn, ground-truth labels, the memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from vss_lightning.pipeline.context import (
    SceneContextModel,
    first_frame_gt_labels,
    kmeans,
    linf_normalize,
    per_frame_kmeans,
    resize_gt_to_grid,
)
from vss_lightning.pipeline.knn import knn_predict

LABEL_SETS = [np.array([0, 1]), np.array([3, 7, 200]), np.array([4, 9]), np.array([0, 1, 2, 3, 255, 300])]


def sklearn_predict(memory: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int = 4) -> np.ndarray:
    # One OpenMP thread pins scikit-learn's tie handling to its single-heap (parallel_on_X) order.
    with threadpool_limits(1, user_api="openmp"):
        return KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(memory, labels).predict(queries)


def ours(memory: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int = 4, chunk: int = 4096):
    out = knn_predict(torch.from_numpy(memory), torch.from_numpy(labels), torch.from_numpy(queries), k, chunk)
    assert out.dtype == torch.int64
    return out.numpy()


def test_linf_normalize():
    x = torch.tensor([[2.0, -4.0, 1.0], [0.0, 0.0, 0.0], [-0.5, 0.25, 0.0]])
    expected = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [-1.0, 0.5, 0.0]])
    torch.testing.assert_close(linf_normalize(x), expected, rtol=0, atol=0)
    assert linf_normalize(torch.randn(2, 3, 4, 7)).abs().amax(-1).allclose(torch.ones(2, 3, 4))


@pytest.mark.parametrize("seed", range(24))
def test_knn_matches_sklearn_on_random_data(seed):
    """Continuous random data: few labels so 2-2 vote ties are common; float32 and float64."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if seed % 2 else np.float64
    n, c, m = int(rng.integers(4, 300)), int(rng.integers(1, 40)), int(rng.integers(1, 300))
    classes = LABEL_SETS[seed % len(LABEL_SETS)]
    memory = rng.normal(size=(n, c)).astype(dtype)
    queries = rng.normal(size=(m, c)).astype(dtype)
    labels = rng.choice(classes, n).astype(np.int64)
    chunk = int(rng.integers(1, 64))
    np.testing.assert_array_equal(
        ours(memory, labels, queries, chunk=chunk), sklearn_predict(memory, labels, queries)
    )


@pytest.mark.parametrize("seed", range(16))
def test_knn_matches_sklearn_with_equal_distances(seed):
    """Duplicated memory points, queries equal to memory points, lattice data: many exact distance ties.

    Values are multiples of 1/4 so every distance is exact in scikit-learn's arithmetic and in ours.
    """
    rng = np.random.default_rng(100 + seed)
    dtype = np.float32 if seed % 2 else np.float64
    n, c, m = int(rng.integers(8, 300)), int(rng.integers(1, 40)), int(rng.integers(1, 300))
    if seed % 4 < 2:
        base = rng.integers(-8, 9, size=(max(2, n // 5), c)) / 4
        memory = base[rng.integers(0, len(base), n)]
        queries = np.concatenate(
            [base[rng.integers(0, len(base), m // 2)], rng.integers(-8, 9, (m - m // 2, c)) / 4]
        )
    else:
        memory, queries = rng.integers(-2, 3, size=(n, c)), rng.integers(-2, 3, size=(m, c))
    memory, queries = memory.astype(dtype), queries.astype(dtype)
    labels = rng.choice(LABEL_SETS[seed % len(LABEL_SETS)], n).astype(np.int64)
    expected = sklearn_predict(memory, labels, queries)
    np.testing.assert_array_equal(ours(memory, labels, queries, chunk=int(rng.integers(1, 64))), expected)


def test_knn_tie_choice_is_sklearns_heap_not_lowest_index():
    """Equal distances at the k-th place: the kept points are those scikit-learn's heap keeps.

    Squared distances (1-D points, query at 0): 9, 4, 9, 0, 1, 9, 9. The 4th place is shared by points
    0, 2, 5 and 6; scikit-learn's heap keeps point 2: neither the lowest (0) nor the highest index (6).
    """
    memory = np.array([[3.0], [2.0], [3.0], [0.0], [1.0], [3.0], [3.0]])
    queries = np.zeros((1, 1))
    # kept {1, 2, 3, 4}: votes 1, 5, 5, 9 -> 5; {0, 1, 3, 4} or {1, 3, 4, 6} would vote 1
    labels = np.array([2, 1, 5, 5, 9, 3, 2])
    assert sklearn_predict(memory, labels, queries)[0] == 5
    assert ours(memory, labels, queries)[0] == 5
    # float32, several queries and a memory point duplicated many times
    memory = np.repeat(memory, 3, axis=0).astype(np.float32)
    labels = np.repeat(labels, 3)
    queries = np.array([[0.0], [3.0], [1.5], [2.5], [-1.0]], dtype=np.float32)
    np.testing.assert_array_equal(ours(memory, labels, queries), sklearn_predict(memory, labels, queries))


def test_knn_vote_tie_goes_to_smallest_label():
    memory = np.array([[1.0], [2.0], [3.0], [4.0], [10.0]])
    queries = np.zeros((1, 1))
    for labels in ([9, 2, 9, 2, 0], [2, 9, 2, 9, 0], [200, 7, 7, 200, 3]):
        labels = np.array(labels)
        expected = min(labels[:4])
        assert ours(memory, labels, queries)[0] == sklearn_predict(memory, labels, queries)[0] == expected


def test_knn_chunking_and_k():
    rng = np.random.default_rng(0)
    memory, queries = rng.normal(size=(50, 20)), rng.normal(size=(70, 20))
    labels = rng.integers(0, 3, 50)
    full = ours(memory, labels, queries, chunk=4096)
    np.testing.assert_array_equal(ours(memory, labels, queries, chunk=1), full)
    for k in (1, 3, 7, 50):
        np.testing.assert_array_equal(
            ours(memory, labels, queries, k=k), sklearn_predict(memory, labels, queries, k)
        )
    with pytest.raises(ValueError, match="Expected `k` to be between 1 and"):
        ours(memory, labels, queries, k=51)


def test_kmeans_deterministic_and_errors():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 5, n_init=3, seed=7)
    assert a.dtype == torch.int64 and a.shape == (200,) and set(a.tolist()) == set(range(5))
    torch.testing.assert_close(kmeans(x, 5, n_init=3, seed=7), a, rtol=0, atol=0)
    torch.testing.assert_close(kmeans(x.float(), 5, n_init=3, seed=7), a, rtol=0, atol=0)
    with pytest.raises(
        ValueError, match=r"Expected `num_clusters` to be between 1 and the number of points \(200\)"
    ):
        kmeans(x, 201)
    with pytest.raises(ValueError, match="Expected `num_clusters`"):
        kmeans(x, 0)


def test_per_frame_kmeans_is_kmeans_per_frame():
    feats = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    out = per_frame_kmeans(feats, 3, n_init=2, seed=0)
    assert out.shape == (3, 4, 5)
    for t in range(3):
        expected = kmeans(feats[t].reshape(20, 6), 3, n_init=2, seed=0).reshape(4, 5)
        torch.testing.assert_close(out[t], expected, rtol=0, atol=0)


def naive_first_frame_gt_labels(clusters: np.ndarray, gt: np.ndarray, ignore: int = 255) -> np.ndarray:
    out = np.full(clusters.shape, ignore, dtype=np.int64)
    for cid in np.unique(clusters):
        votes: dict[int, int] = {}
        for cl, g in zip(clusters.ravel(), gt.ravel(), strict=True):
            if cl == cid and g != ignore:
                votes[int(g)] = votes.get(int(g), 0) + 1
        if votes:
            best = max(votes.values())
            out[clusters == cid] = min(g for g, v in votes.items() if v == best)
    return out


@pytest.mark.parametrize("seed", range(10))
def test_first_frame_gt_labels_matches_naive(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(2, 12)), int(rng.integers(2, 12))
    clusters = rng.integers(0, int(rng.integers(1, 8)), size=(h, w))
    gt = rng.choice(np.array([0, 3, 17, 255, 255]), size=(h, w))
    got = first_frame_gt_labels(torch.from_numpy(clusters), torch.from_numpy(gt))
    np.testing.assert_array_equal(got.numpy(), naive_first_frame_gt_labels(clusters, gt))


def test_first_frame_gt_labels_ignore_and_ties():
    clusters = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    gt = torch.tensor([[255, 255, 7, 3], [5, 5, 255, 255]])
    out = first_frame_gt_labels(clusters, gt)
    # cluster 0: all ignore -> ignore; cluster 1: 7 vs 3 tie -> 3; cluster 2: 5 (255 does not vote)
    assert out.tolist() == [[255, 255, 3, 3], [5, 5, 5, 5]]


@pytest.mark.parametrize(
    ("size_in", "size_out"), [((480, 854), (28, 52)), ((360, 480), (20, 28)), ((37, 23), (9, 17))]
)
def test_resize_gt_to_grid_matches_pil(size_in, size_out):
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, size=size_in).astype(np.uint8)
    expected = np.asarray(Image.fromarray(gt).resize(size_out[::-1], Image.NEAREST))
    got = resize_gt_to_grid(torch.from_numpy(gt).long(), size_out)
    np.testing.assert_array_equal(got.numpy(), expected)


def moving_objects_video(frames: int = 9, h: int = 6, w: int = 14, c: int = 16):
    """Background plus three 2x2 objects moving right by one cell per frame; (T, h, w, C), (T, h, w) ids."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, c, generator=g) * 3  # background, object 1, 2, 3
    starts = {1: (0, 0), 2: (2, 2), 3: (4, 1)}
    ids = torch.zeros(frames, h, w, dtype=torch.int64)
    for t in range(frames):
        for obj, (y, x) in starts.items():
            ids[t, y : y + 2, x + t : x + t + 2] = obj
    feats = protos[ids] + 0.05 * torch.randn(frames, h, w, c, generator=g)
    return linf_normalize(feats), ids


def run_video(model: SceneContextModel, feats: torch.Tensor, batch: int = 3, gt=None) -> torch.Tensor:
    out = []
    for start in range(0, feats.shape[0], batch):
        clip = feats[start : start + batch]
        if not model.initialised:
            model.initialise(clip, gt)
        labels = model.predict(clip)
        model.update(clip, labels)
        assert model.memory[0].shape[0] == clip.shape[0] * clip.shape[1] * clip.shape[2]
        out.append(labels)
    return torch.cat(out)


def test_scene_context_keeps_identities_across_batches():
    feats, ids = moving_objects_video()
    model = SceneContextModel(num_clusters=4, knn_k=4, kmeans_n_init=3, seed=0)
    with pytest.raises(RuntimeError, match="Expected the scene context model to be initialised"):
        model.predict(feats[:3])
    labels = run_video(model, feats)
    per_object = []
    for obj in range(4):
        values = labels[ids == obj].unique()
        assert values.numel() == 1, f"object {obj} changed label: {values.tolist()}"
        per_object.append(int(values))
    assert len(set(per_object)) == 4


def test_scene_context_initialise_returns_frame1_clusters_and_memory():
    feats, ids = moving_objects_video()
    model = SceneContextModel(num_clusters=4, kmeans_n_init=3)
    frame1 = model.initialise(feats[:3])
    expected = kmeans(feats[:3].reshape(-1, feats.shape[-1]), 4, n_init=3, seed=0)[: 6 * 14].reshape(6, 14)
    torch.testing.assert_close(frame1, expected, rtol=0, atol=0)
    memory, memory_labels = model.memory
    torch.testing.assert_close(memory, feats[0].reshape(-1, feats.shape[-1]), rtol=0, atol=0)
    torch.testing.assert_close(memory_labels, frame1.reshape(-1), rtol=0, atol=0)


def test_scene_context_update_replaces_memory_and_state_dict_round_trip():
    feats, _ = moving_objects_video()
    model = SceneContextModel(num_clusters=4, kmeans_n_init=2)
    model.initialise(feats[:3])
    labels = model.predict(feats[:3])
    labels[0, 0, 0] = 255  # ignored points are not stored
    model.update(feats[3:6], labels)
    memory, memory_labels = model.memory
    assert memory.shape == (3 * 6 * 14 - 1, feats.shape[-1]) and memory_labels.shape == (3 * 6 * 14 - 1,)
    restored = SceneContextModel(num_clusters=4, kmeans_n_init=2)
    assert restored.state_dict() == {} and not restored.initialised
    restored.load_state_dict(model.state_dict())
    assert restored.initialised
    torch.testing.assert_close(restored.predict(feats[6:]), model.predict(feats[6:]), rtol=0, atol=0)


def test_scene_context_first_frame_gt_mode():
    feats, ids = moving_objects_video()
    classes = torch.tensor([0, 11, 12, 255])  # object 3 is unlabelled in the ground truth
    gt = classes[ids[0]]
    model = SceneContextModel(num_clusters=4, kmeans_n_init=3, mode="first_frame_gt")
    with pytest.raises(ValueError, match="Expected `first_frame_gt`"):
        model.initialise(feats[:3])
    frame1 = model.initialise(feats[:3], gt)
    assert torch.equal(frame1, gt)
    assert model.memory[0].shape[0] == int((gt != 255).sum())  # ignored points left out of the memory
    labels = model.predict(feats[:3])
    for obj, cls in ((0, 0), (1, 11), (2, 12)):
        assert labels[ids[:3] == obj].unique().tolist() == [cls]
    # a ground truth at full resolution is resized to the grid first (nearest, like PIL)
    big = gt.repeat_interleave(4, 0).repeat_interleave(4, 1)
    other = SceneContextModel(num_clusters=4, kmeans_n_init=3, mode="first_frame_gt")
    assert torch.equal(other.initialise(feats[:3], big), frame1)
    with pytest.raises(ValueError, match="Expected frame 1's ground truth to have a valid class"):
        other.initialise(feats[:3], torch.full_like(gt, 255))
