"""torch K-Means (issue #19): scikit-learn's labels, ids included, from the torch implementation.

The CPU path is what runs here; the same code runs on CUDA (`test_torch_kmeans_on_cuda`, marker `gpu`).

Where the two can legitimately differ: two choices that tie in exact arithmetic (two k-means++
candidates giving the same potential, e.g. two mutually nearest points away from every centre; a
point at the same distance from two centres; duplicate points once every distinct point is a centre)
are decided by the last bits of each implementation's rounding (BLAS summation order), and a different
choice can lead to another local optimum. Such ties need few points per cluster or exact duplicates;
the data here avoids them where labels are compared, and the tie-prone cases (K = N, K >= the number
of distinct points) compare what does not depend on the tie.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.cluster._kmeans import _kmeans_single_lloyd

from vss_lightning.pipeline import torch_kmeans as tk
from vss_lightning.pipeline.context import (
    SceneContextModel,
    kmeans,
    linf_normalize,
    per_frame_kmeans,
    resolve_kmeans_backend,
)
from vss_lightning.pipeline.torch_kmeans import torch_kmeans


def sklearn_fit(x: np.ndarray, k: int, n_init: int, seed: int, max_iter: int = 300) -> KMeans:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few distinct points
        return KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed).fit(x)


def ours(x: np.ndarray, k: int, n_init: int, seed: int, max_iter: int = 300) -> tk.KMeansResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_kmeans(torch.from_numpy(x), k, n_init=n_init, max_iter=max_iter, seed=seed)


def assert_same(x: np.ndarray, k: int, n_init: int, seed: int, max_iter: int = 300) -> tk.KMeansResult:
    """Same ids, centres and inertia as scikit-learn (centres and inertia to rounding)."""
    ref, got = sklearn_fit(x, k, n_init, seed, max_iter), ours(x, k, n_init, seed, max_iter)
    assert got.labels.dtype == torch.int64 and got.labels.shape == (len(x),)
    np.testing.assert_array_equal(got.labels.numpy(), ref.labels_)
    np.testing.assert_allclose(got.centers.numpy(), ref.cluster_centers_, rtol=1e-9, atol=1e-9)
    assert got.inertia == pytest.approx(ref.inertia_, rel=1e-9, abs=1e-12)
    assert got.n_iter == ref.n_iter_
    return got


def blobs(seed: int, n: int = 600, c: int = 16, k: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, c)) * 6
    return centres[rng.integers(0, k, n)] + rng.normal(size=(n, c))


def feature_like(seed: int, n: int, c: int) -> np.ndarray:
    """L-inf-normalised random features: overlapping, no cluster structure (the hard case for ties)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)) + 0.5 * rng.normal(size=(n, 1)) * rng.normal(size=(1, c))
    return linf_normalize(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("seed", range(4))
def test_matches_sklearn_on_blobs(seed):
    assert_same(blobs(seed), 6, n_init=3, seed=seed)
    assert_same(blobs(seed, k=4), 7, n_init=2, seed=seed + 10)  # more clusters than blobs


@pytest.mark.parametrize("seed", range(2))
def test_matches_sklearn_on_feature_like_data(seed):
    """The segmenter's shape: 14 frames of a 28 x 52 grid, K = 20 (fewer dims and iterations, for time)."""
    x = feature_like(seed, 14 * 28 * 52, 64)
    assert_same(x, 20, n_init=2, seed=seed, max_iter=8)


@pytest.mark.parametrize("seed", range(12))
def test_matches_sklearn_on_small_random_data(seed):
    """Converged runs of many shapes; several restarts, so the best-inertia choice is exercised."""
    rng = np.random.default_rng(1000 + seed)
    n, c = int(rng.integers(40, 400)), int(rng.integers(3, 24))
    k = int(rng.integers(1, n // 8 + 2))
    x = feature_like(seed, n, c) if seed % 2 else rng.normal(size=(n, c)) * rng.uniform(0.1, 10, c)
    assert_same(x, k, n_init=int(rng.integers(1, 6)), seed=seed)


@pytest.mark.parametrize("max_iter", [1, 2, 3])
def test_matches_sklearn_when_stopped_early(max_iter):
    """Not converged: the final assignment step with the last centres."""
    assert_same(feature_like(3, 500, 8), 9, n_init=3, seed=1, max_iter=max_iter)


def test_float32_and_other_inputs_are_clustered_in_float64():
    x = torch.from_numpy(feature_like(4, 300, 12)).float()
    got = torch_kmeans(x, 5, n_init=2, seed=3)
    assert got.centers.dtype == torch.float64
    ref = sklearn_fit(x.double().numpy(), 5, 2, 3)
    np.testing.assert_array_equal(got.labels.numpy(), ref.labels_)
    assert torch.equal(torch_kmeans(x.half(), 5, n_init=2, seed=3).labels, kmeans(x.half(), 5, 2, seed=3))


def test_one_cluster():
    x = feature_like(5, 200, 6)
    got = assert_same(x, 1, n_init=3, seed=0)
    assert int(got.labels.max()) == 0
    np.testing.assert_allclose(got.centers.numpy()[0], x.mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_as_many_clusters_as_points(seed):
    """K = N: every point is its own cluster in both. The ids follow the seeding order, where ties are
    frequent (two mutually nearest points give equal potentials), so only the partition is compared."""
    x = np.random.default_rng(seed).normal(size=(30, 5))
    ref, got = sklearn_fit(x, 30, 2, seed), ours(x, 30, 2, seed)
    assert sorted(got.labels.tolist()) == list(range(30)) == sorted(ref.labels_.tolist())
    assert got.inertia == ref.inertia_ == 0.0
    np.testing.assert_allclose(got.centers.numpy()[got.labels.numpy()], x, rtol=0, atol=1e-12)


def test_seeding_matches_sklearn_kmeans_plusplus():
    """The k-means++ seeds (indices) of one restart, with scikit-learn's draws."""
    for seed in range(5):
        x = feature_like(seed, 500, 10)
        for k in (1, 2, 7, 25):
            _, expected = kmeans_plusplus(x, k, random_state=seed)
            first, draws = tk._seeding_draws(len(x), k, 1, seed)
            t = torch.from_numpy(x)
            got = tk._kmeans_plusplus(t, (t * t).sum(1), first, draws)
            np.testing.assert_array_equal(got[0].numpy(), expected)


def test_duplicate_points():
    """Each of 40 distinct points 1-5 times. Fewer clusters than distinct points: the same labels. As
    many: a zero inertia in both (which duplicate seeds a cluster is a tie). More: both warn."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=(40, 6))
    x = np.repeat(base, rng.integers(1, 6, 40), axis=0)
    x = x[rng.permutation(len(x))]
    for seed in range(3):
        assert_same(x, 10, n_init=3, seed=seed)
    ref, got = sklearn_fit(x, 40, 2, 0), ours(x, 40, 2, 0)
    scale = float(((x - x.mean(0)) ** 2).sum())
    assert abs(got.inertia) <= 1e-12 * scale and abs(ref.inertia_) <= 1e-12 * scale
    assert len(set(got.labels.tolist())) == 40
    with pytest.warns(UserWarning, match="Expected K-Means to find 50 distinct clusters, but got 40"):
        got = torch_kmeans(torch.from_numpy(x), 50, n_init=2, seed=0)
    assert int(got.labels.min()) >= 0 and int(got.labels.max()) < 50


def test_all_points_equal():
    x = np.ones((20, 3))
    got = assert_same(x, 1, n_init=2, seed=0)
    assert got.inertia == 0.0
    with pytest.warns(UserWarning, match="distinct clusters"):
        got = torch_kmeans(torch.from_numpy(x), 4, n_init=2, seed=0)
    np.testing.assert_array_equal(got.centers.numpy(), np.ones((4, 3)))


@pytest.mark.parametrize("case", ["far", "duplicate", "sum_quirk"])
def test_lloyd_relocates_empty_clusters_like_sklearn(case):
    """Empty clusters (rare after k-means++, so forced with chosen initial centres): relocation to the
    farthest points (numpy's `argpartition` order), and the in-place averaging order that leaves a
    still-empty cluster before the largest one at that cluster's sum, after it at its mean; compared
    with scikit-learn's Lloyd run."""
    rng = np.random.default_rng(3)
    if case == "sum_quirk":  # every point on a centre: nothing to relocate, clusters 0 and 4 stay empty
        x = np.repeat(rng.normal(size=(3, 4)), [2, 3, 3], axis=0)
        x = x - x.mean(0)
        init = np.stack([x[0] + 100, x[2], x[0], x[5], x[5]])
    else:
        x = rng.normal(size=(80, 4))
        x = x - x.mean(0)
        extra = x[[5, 9]] if case == "duplicate" else np.full((2, 4), 50.0)  # lose every tie / too far
        init = np.concatenate([x[[5, 9, 17]], extra, x[[23]]])
    t = torch.from_numpy(x)
    for max_iter in (1, 2, 300):
        labels, inertia, centers, n_iter = _kmeans_single_lloyd(
            np.ascontiguousarray(x), np.ones(len(x)), init.copy(), max_iter=max_iter, tol=1e-8
        )
        got_labels, got_centers, got_inertia, got_iter = tk._lloyd(
            t, torch.from_numpy(init)[None], max_iter, 1e-8
        )
        np.testing.assert_array_equal(got_labels[0].numpy(), labels)
        np.testing.assert_allclose(got_centers[0].numpy(), centers, rtol=1e-10, atol=1e-10)
        assert float(got_inertia[0]) == pytest.approx(inertia, rel=1e-10, abs=1e-12)
        assert got_iter[0] == n_iter


def test_same_clustering_is_sklearns_one_way_test():
    a, b = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 1, 0, 0])
    assert tk._same_clustering(a, b, 3)  # 0->1, 1->0, 2->0: a function, enough for scikit-learn
    assert not tk._same_clustering(b, a, 3)
    assert not tk._same_clustering(torch.tensor([0, 0]), torch.tensor([0, 1]), 2)


def test_errors_match_context_kmeans():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    for k, n_init, pattern in [
        (0, 1, r"Expected `num_clusters` to be between 1 and the number of points \(50\), but got 0"),
        (51, 1, r"Expected `num_clusters` to be between 1 and the number of points \(50\), but got 51"),
        (3, 0, "Expected `n_init` to be at least 1, but got 0"),
    ]:
        for backend in ("sklearn", "torch"):
            with pytest.raises(ValueError, match=pattern):
                kmeans(x, k, n_init=n_init, backend=backend)
        with pytest.raises(ValueError, match=pattern):
            torch_kmeans(x, k, n_init=n_init)
    with pytest.raises(ValueError, match="Expected `max_iter` to be at least 1, but got 0"):
        torch_kmeans(x, 3, max_iter=0)
    with pytest.raises(ValueError, match=r"Expected `features` to be an \(N, C\) tensor"):
        torch_kmeans(x[None], 3)
    with pytest.raises(ValueError, match="Expected `features` to be finite"):
        torch_kmeans(torch.full((5, 2), float("nan")), 2)
    with pytest.raises(ValueError, match="Expected the K-Means backend to be one of"):
        kmeans(x, 3, backend="cuml")
    with pytest.raises(ValueError, match="Expected `kmeans_backend` to be one of"):
        SceneContextModel(kmeans_backend="gpu")


def test_backend_resolution():
    assert resolve_kmeans_backend("auto", torch.device("cpu")) == "sklearn"
    assert resolve_kmeans_backend("auto", torch.device("cuda", 0)) == "torch"
    assert resolve_kmeans_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_kmeans_backend("sklearn", torch.device("cuda")) == "sklearn"


def test_context_backends_agree_on_cpu():
    x = torch.from_numpy(feature_like(9, 400, 16)).float()
    expected = kmeans(x, 6, n_init=2, seed=2)  # auto on the CPU: scikit-learn
    torch.testing.assert_close(kmeans(x, 6, n_init=2, seed=2, backend="sklearn"), expected, rtol=0, atol=0)
    torch.testing.assert_close(kmeans(x, 6, n_init=2, seed=2, backend="torch"), expected, rtol=0, atol=0)
    frames = x[:240].reshape(2, 6, 20, 16)
    torch.testing.assert_close(
        per_frame_kmeans(frames, 4, 2, 0, backend="torch"), per_frame_kmeans(frames, 4, 2, 0), rtol=0, atol=0
    )


def test_scene_context_model_torch_backend_equals_default():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(5, 24, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 5, (6, 7, 9), generator=g)
    feats = linf_normalize(protos[ids] + 0.4 * torch.randn(6, 7, 9, 24, generator=g, dtype=torch.float64))
    out = {}
    for backend in ("auto", "torch"):
        model = SceneContextModel(num_clusters=5, kmeans_n_init=3, seed=1, kmeans_backend=backend)
        assert model.kmeans_backend == backend
        first = model.initialise(feats[:3])
        labels = model.predict(feats[3:])
        out[backend] = (first, labels)
    torch.testing.assert_close(out["torch"], out["auto"], rtol=0, atol=0)


@pytest.mark.gpu
def test_torch_kmeans_on_cuda():
    """The CUDA path (cuBLAS, GPU scans and one-hot sums) gives scikit-learn's labels too."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import time

    cases = [(feature_like(s, 14 * 28 * 52, 64), 20, 3, s, 300) for s in range(2)] + [
        (blobs(s), 6, 3, s, 300) for s in range(3)
    ]
    for x, k, n_init, seed, max_iter in cases:
        ref = sklearn_fit(x, k, n_init, seed, max_iter)
        cuda = torch.from_numpy(x).float().cuda()
        t0 = time.perf_counter()
        labels = kmeans(cuda, k, n_init=n_init, seed=seed)  # auto: torch on CUDA
        torch.cuda.synchronize()
        print(f"N={len(x)} C={x.shape[1]} K={k}: {time.perf_counter() - t0:.3f} s on CUDA")
        assert labels.device.type == "cuda" and labels.dtype == torch.int64
        got = torch_kmeans(cuda.double(), k, n_init=n_init, max_iter=max_iter, seed=seed)
        np.testing.assert_array_equal(labels.cpu().numpy(), got.labels.cpu().numpy())
        np.testing.assert_array_equal(got.labels.cpu().numpy(), ref.labels_)
        assert got.inertia == pytest.approx(ref.inertia_, rel=1e-9)
