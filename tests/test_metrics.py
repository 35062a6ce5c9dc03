"""Metrics against plain NumPy implementations of the same definitions, on seeded random label maps."""

from __future__ import annotations

import math
import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.optimize import linear_sum_assignment

from vss_lightning.metrics import (
    HungarianIoU,
    SegmentationIoU,
    VideoConsistency,
    VideoSegmentationMetrics,
    hungarian_iou,
    segmentation_iou,
    video_consistency,
)
from vss_lightning.metrics import consistency as consistency_module

IGNORE = 255


# ---------------------------------------------------------------------------------------------------
# Naive references (one loop per class / window, as the benchmarks write them)


def ref_iou(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int) -> dict:
    """mIoU over classes present in the GT; pixels with GT outside [0, C) skipped; any other pred wrong."""
    p = np.concatenate([x.ravel() for x in preds]).astype(np.int64)
    t = np.concatenate([x.ravel() for x in targets]).astype(np.int64)
    valid = (t >= 0) & (t < num_classes)
    per_class = np.full(num_classes, np.nan)
    for c in range(num_classes):
        gt_c = (t == c) & valid
        pred_c = (p == c) & valid
        if gt_c.sum() == 0:
            continue
        per_class[c] = (gt_c & pred_c).sum() / (gt_c | pred_c).sum()
    acc = ((p == t) & valid).sum() / valid.sum() if valid.sum() else np.nan
    miou = np.nanmean(per_class) if not np.isnan(per_class).all() else np.nan
    return {"mIoU": miou, "pixel_acc": acc, "per_class_iou": per_class}


def ref_matching(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int) -> dict[int, int]:
    """One Hungarian assignment (pred id -> class) over all given frames; zero-overlap pairs dropped."""
    p = np.concatenate([x.ravel() for x in preds]).astype(np.int64)
    t = np.concatenate([x.ravel() for x in targets]).astype(np.int64)
    valid = (t >= 0) & (t < num_classes)
    ids = np.unique(p[valid & (p >= 0)])
    overlap = np.zeros((len(ids), num_classes), dtype=np.int64)
    for k, i in enumerate(ids):
        for c in range(num_classes):
            overlap[k, c] = ((p == i) & (t == c) & valid).sum()
    if not len(ids):
        return {}
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    return {int(ids[r]): int(c) for r, c in zip(rows, cols, strict=True) if overlap[r, c] > 0}


def apply_matching(pred: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.full(pred.shape, -1, dtype=np.int64)  # unassigned: matches no class
    for i, c in mapping.items():
        out[pred == i] = c
    return out


def ref_hungarian(preds, targets, num_classes, matching: str) -> dict:
    if matching == "video":
        mapped = [
            apply_matching(p, ref_matching([p], [t], num_classes))
            for p, t in zip(preds, targets, strict=True)
        ]
    else:
        mapping = ref_matching(preds, targets, num_classes)
        mapped = [apply_matching(p, mapping) for p in preds]
    return ref_iou(mapped, targets, num_classes)


def ref_vc_accs(pred: np.ndarray, target: np.ndarray, n: int) -> list[float]:
    """VSPW VC_perclip.get_common on the labelled frames (any pixel != 255) of one video."""
    keep = (target != IGNORE).reshape(len(target), -1).any(axis=1)
    gts, prs = list(target[keep]), list(pred[keep])
    if len(gts) <= n:
        return []
    accs = []
    for i in range(len(gts) - n):
        global_common = np.ones(gts[0].shape, dtype=bool)
        pred_common = np.ones(gts[0].shape, dtype=bool)
        for j in range(1, n):
            global_common &= gts[i] == gts[i + j]
            pred_common &= prs[i] == prs[i + j]
        with np.errstate(invalid="ignore", divide="ignore"):
            accs.append((pred_common & global_common).sum() / global_common.sum())
    return accs


def ref_mvc(preds, targets, n: int) -> float:
    accs = [a for p, t in zip(preds, targets, strict=True) for a in ref_vc_accs(p, t, n)]
    accs = np.array(accs, dtype=np.float64)
    return float(np.nanmean(accs)) if (~np.isnan(accs)).any() else math.nan


# ---------------------------------------------------------------------------------------------------
# Random videos


def random_video(rng: np.random.Generator, num_classes: int, num_pred: int, frames: int, h: int, w: int):
    """Temporally coherent GT and prediction with ignore pixels, unlabelled frames and out-of-range GT.

    The last class never occurs in the GT (but may be predicted); each video also lacks another class.
    """
    present = rng.choice(num_classes - 1, size=max(1, num_classes - 2), replace=False)
    values = np.concatenate([present, present, [IGNORE, num_classes + 1]])  # GT outside [0, C): skipped
    t = np.empty((frames, h, w), dtype=np.int64)
    p = np.empty((frames, h, w), dtype=np.int64)
    t[0] = rng.choice(values, size=(h, w))
    p[0] = rng.integers(0, num_pred, size=(h, w))
    for f in range(1, frames):
        t[f] = np.where(rng.random((h, w)) < 0.03, rng.choice(values, size=(h, w)), t[f - 1])
        p[f] = np.where(rng.random((h, w)) < 0.05, rng.integers(0, num_pred, size=(h, w)), p[f - 1])
    t[rng.random(frames) < 0.2] = IGNORE  # unlabelled frames
    return p, t


def random_split(seed: int, num_classes: int = 6, num_pred: int = 8, videos: int = 6):
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(videos):
        frames = int(rng.integers(1, 30))  # many shorter than 8 and 16
        h, w = (int(x) for x in rng.integers(2, 12, size=2))
        p, t = random_video(rng, num_classes, num_pred, frames, h, w)
        preds.append(p)
        targets.append(t)
    return preds, targets


def labelled_only(arrays_p, arrays_t):
    out_p, out_t = [], []
    for p, t in zip(arrays_p, arrays_t, strict=True):
        keep = (t != IGNORE).reshape(len(t), -1).any(axis=1)
        out_p.append(p[keep])
        out_t.append(t[keep])
    return out_p, out_t


def assert_iou_equal(got: dict, want: dict) -> None:
    assert float(got["mIoU"]) == pytest.approx(want["mIoU"], abs=1e-12, nan_ok=True)
    assert float(got["pixel_acc"]) == pytest.approx(want["pixel_acc"], abs=1e-12, nan_ok=True)
    np.testing.assert_allclose(np.asarray(got["per_class_iou"], dtype=np.float64), want["per_class_iou"])


T = torch.from_numpy

# ---------------------------------------------------------------------------------------------------
# mIoU


@pytest.mark.parametrize("seed", range(6))
def test_segmentation_iou_matches_numpy(seed):
    num_classes = 6
    preds, targets = random_split(seed, num_classes, num_pred=num_classes + 2)  # some preds out of range
    metric = SegmentationIoU(num_classes)
    for p, t in zip(preds, targets, strict=True):
        metric.update(T(p), T(t))
    assert_iou_equal(metric.compute(), ref_iou(preds, targets, num_classes))
    assert_iou_equal(
        segmentation_iou(T(preds[0]), T(targets[0]), num_classes), ref_iou(preds[:1], targets[:1], 6)
    )


def test_segmentation_iou_golden_edge_cases():
    # GT: class 0 x3, class 1 x1, ignore x1, out-of-range GT 7 x1. Class 2 never in GT but predicted.
    target = torch.tensor([[0, 0, 0, 1, IGNORE, 7]])
    preds = torch.tensor([[0, 9, 2, 1, 0, 0]])  # 9: out of range -> FN of class 0; 2: FP of absent class 2
    got = segmentation_iou(preds, target, num_classes=3)
    assert got["per_class_iou"][0] == pytest.approx(1 / 3)  # TP 1, FN 2 (9 and 2), FP 0
    assert got["per_class_iou"][1] == pytest.approx(1.0)
    assert math.isnan(got["per_class_iou"][2])  # absent from GT: not part of the mean
    assert got["mIoU"] == pytest.approx((1 / 3 + 1) / 2)
    assert got["pixel_acc"] == pytest.approx(2 / 4)
    empty = segmentation_iou(preds, torch.full_like(target, IGNORE), num_classes=3)
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["pixel_acc"])


def test_perfect_predictions_give_one():
    preds, targets = random_split(1)
    metrics = {
        m: VideoSegmentationMetrics(6, matching=m, vc_lengths=(2, 8)) for m in ("none", "video", "dataset")
    }
    for t in targets:
        for metric in metrics.values():
            metric.update(T(t), T(t))
    for out in metrics.values():
        assert out.compute()["mIoU"] == 1.0 and out.compute()["pixel_acc"] == 1.0
        assert out.compute()["mVC2"] == 1.0 and out.compute()["mVC8"] == 1.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("matching", ["video", "dataset"])
def test_hungarian_iou_matches_numpy(seed, matching):
    preds, targets = random_split(seed, num_classes=5, num_pred=int(3 + seed * 2))  # fewer and more ids
    metric = HungarianIoU(5, matching=matching, max_pred_ids=16)
    for p, t in zip(preds, targets, strict=True):
        metric.update(T(p), T(t))
    assert_iou_equal(metric.compute(), ref_hungarian(preds, targets, 5, matching))


def test_hungarian_iou_functional_and_missing_ids():
    preds, targets = random_split(3, num_classes=4, num_pred=6, videos=1)
    p = preds[0].copy()
    p[:, :1] = -1  # missing predictions: wrong for their GT class
    assert_iou_equal(
        hungarian_iou(T(p), T(targets[0]), 4, max_pred_ids=8), ref_hungarian([p], targets, 4, "video")
    )


@pytest.mark.parametrize("matching", ["video", "dataset"])
def test_permuted_ids_give_one_after_matching(matching):
    rng = np.random.default_rng(7)
    _, targets = random_split(7, num_classes=6)
    metric = HungarianIoU(6, matching=matching, max_pred_ids=40)
    perm = rng.permutation(40)
    for t in targets:
        if matching == "video":
            perm = rng.permutation(40)
        metric.update(T(np.where((t >= 0) & (t < 6), perm[np.clip(t, 0, 5)], 39)), T(t))
    out = metric.compute()
    assert out["mIoU"] == 1.0 and out["pixel_acc"] == 1.0


def test_unassigned_ids_count_as_wrong():
    target = torch.tensor([[0, 0, 0, 0, 1, 1]])
    preds = torch.tensor([[5, 5, 5, 3, 3, 3]])  # 5 -> class 0 (3 px), 3 -> class 1 (2 px, 1 px of class 0)
    got = hungarian_iou(preds, target, num_classes=2, max_pred_ids=8)
    assert got["per_class_iou"].tolist() == pytest.approx([3 / 4, 2 / 3])
    preds = torch.tensor([[5, 5, 5, 3, 4, 4]])  # one class left: 3 -> class 0 (1 px) loses to 5, 3 unassigned
    got = hungarian_iou(preds, torch.tensor([[0, 0, 0, 0, 0, 0]]), num_classes=2, max_pred_ids=8)
    assert got["per_class_iou"][0] == pytest.approx(3 / 6) and math.isnan(got["per_class_iou"][1])


def test_hungarian_iou_rejects_large_ids():
    metric = HungarianIoU(3, max_pred_ids=4)
    with pytest.raises(ValueError, match=r"Expected predicted ids to be in \[0, 4\).*got id 4.*max_pred_ids"):
        metric.update(torch.tensor([[4, 0]]), torch.tensor([[0, 1]]))
    metric.update(torch.tensor([[9, 0]]), torch.tensor([[IGNORE, 1]]))  # ids on ignored pixels are not scored


def test_constructor_errors():
    with pytest.raises(ValueError, match="Expected `num_classes` to be an int >= 2"):
        SegmentationIoU(0)
    for metric in (SegmentationIoU, HungarianIoU, VideoSegmentationMetrics):  # 1 was a TypeError in compute
        with pytest.raises(ValueError, match=r"Expected `num_classes` to be an int >= 2 .*but got 1\."):
            metric(1)
    with pytest.raises(ValueError, match="Expected `ignore_index` to be an int outside"):
        SegmentationIoU(5, ignore_index=3)
    with pytest.raises(ValueError, match="Expected `matching`"):
        VideoSegmentationMetrics(5, matching="global")
    with pytest.raises(ValueError, match="Expected `n` .* >= 2"):
        VideoConsistency(1)
    with pytest.raises(ValueError, match="same shape"):
        SegmentationIoU(5).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# mVC


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_video_consistency_matches_numpy(seed, n):
    preds, targets = random_split(100 + seed, videos=8)
    metric = VideoConsistency(n)
    for p, t in zip(preds, targets, strict=True):
        metric.update(T(p), T(t))
    assert float(metric.compute()) == pytest.approx(ref_mvc(preds, targets, n), abs=1e-12, nan_ok=True)
    p, t = preds[0], targets[0]
    want = ref_vc_accs(p, t, n)
    got = video_consistency(T(p), T(t), n)
    assert float(got) == pytest.approx(np.nanmean(want) if want else math.nan, abs=1e-12, nan_ok=True)


def test_video_consistency_counts_windows_like_vspw():
    # T = n + 1 labelled frames -> exactly one window (start 0); the window starting at T - n is not counted.
    target = torch.zeros(9, 2, 2, dtype=torch.long)
    preds = torch.zeros(9, 2, 2, dtype=torch.long)
    preds[8] = 1  # only the uncounted window (frames 1..8) sees a change
    metric = VideoConsistency(8)
    metric.update(preds, target)
    assert metric.windows == 1 and float(metric.compute()) == 1.0
    metric.update(torch.zeros(8, 2, 2, dtype=torch.long), torch.zeros(8, 2, 2, dtype=torch.long))  # T <= n
    assert metric.windows == 1
    preds[3, 0, 0] = -1  # a missing prediction is never consistent
    assert float(video_consistency(preds, target, 8)) == pytest.approx(3 / 4)


def test_video_consistency_chunks_give_the_same_result(monkeypatch):
    preds, targets = random_split(5, videos=4)
    want = [video_consistency(T(p), T(t), 3) for p, t in zip(preds, targets, strict=True)]
    monkeypatch.setattr(consistency_module, "_CHUNK_ELEMENTS", 7)
    got = [video_consistency(T(p), T(t), 3) for p, t in zip(preds, targets, strict=True)]
    torch.testing.assert_close(torch.stack(got), torch.stack(want), equal_nan=True)


def test_video_consistency_on_camvid_labels(camvid_clip):
    _, labels = camvid_clip
    labels = labels[:, ::4, ::4].contiguous()  # (30, 180, 240)
    preds = labels.roll(1, dims=2) % 5
    want = ref_mvc([preds.numpy()], [labels.numpy()], 8)
    assert float(video_consistency(preds, labels, 8)) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# The bundle the LightningModule uses


def expected_bundle(preds, targets, num_classes, matching) -> dict:
    lp, lt = labelled_only(preds, targets)
    ref = ref_iou(lp, lt, num_classes) if matching == "none" else ref_hungarian(lp, lt, num_classes, matching)
    ref["mVC8"] = ref_mvc(preds, targets, 8)
    ref["mVC16"] = ref_mvc(preds, targets, 16)
    ref["frames"] = sum(len(t) for t in lt)
    ref["videos"] = sum(len(t) > 0 for t in lt)
    return ref


def assert_bundle_equal(got: dict, want: dict) -> None:
    assert set(got) == {"mIoU", "pixel_acc", "per_class_iou", "mVC8", "mVC16", "frames", "videos"}
    assert_iou_equal(got, want)
    for key in ("mVC8", "mVC16"):
        assert got[key] == pytest.approx(want[key], abs=1e-12, nan_ok=True)
    assert (got["frames"], got["videos"]) == (want["frames"], want["videos"])


@pytest.mark.parametrize("matching", ["none", "video", "dataset"])
def test_video_segmentation_metrics_matches_numpy(matching):
    preds, targets = random_split(11, num_classes=6, num_pred=8, videos=10)
    if matching != "none":
        preds = [p + 3 for p in preds]  # ids 3..10: not class ids
    metrics = VideoSegmentationMetrics(6, matching=matching, max_pred_ids=16)
    for p, t in zip(preds, targets, strict=True):
        metrics.update(T(p), T(t))
    assert_bundle_equal(metrics.compute(), expected_bundle(preds, targets, 6, matching))
    metrics.reset()
    metrics.update(T(preds[0]), T(targets[0]))
    assert_bundle_equal(metrics.compute(), expected_bundle(preds[:1], targets[:1], 6, matching))


def test_video_segmentation_metrics_explicit_labelled():
    preds, targets = random_split(3, videos=1)
    p, t = preds[0], targets[0]
    labelled = torch.ones(len(t), dtype=torch.bool)  # all-ignore frames count as labelled now
    metrics = VideoSegmentationMetrics(6)
    metrics.update(T(p), T(t), labelled)
    got = metrics.compute()
    assert got["frames"] == len(t)
    want = ref_vc_accs_all(p, t, 8)
    assert not np.isnan(want).all()  # the data has scored windows
    assert got["mVC8"] == pytest.approx(np.nanmean(want) if want else math.nan, nan_ok=True)


def ref_vc_accs_all(pred, target, n):
    """`ref_vc_accs` with every frame labelled (unlabelled frames made distinguishable from 255 first)."""
    t = np.where(target == IGNORE, -7, target)
    return ref_vc_accs(pred, t, n)


# ---------------------------------------------------------------------------------------------------
# DDP: two gloo processes, each with part of the videos, equal a single process


def _ddp_worker(rank: int, world_size: int, init_file: str, out_file: str, seed: int) -> None:
    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        preds, targets = random_split(seed, num_classes=6, num_pred=8, videos=5)
        results = {}
        for matching in ("none", "video", "dataset"):
            metrics = VideoSegmentationMetrics(6, matching=matching, max_pred_ids=16)
            for i in range(rank, len(preds), world_size):  # videos 0, 2, 4 and 1, 3: uneven
                metrics.update(T(preds[i]), T(targets[i]))
            results[matching] = metrics.compute()
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_compute_equals_single_process(tmp_path):
    seed = 21
    args = (2, str(tmp_path / "init"), str(tmp_path / "out"), seed)
    fork = "fork" in multiprocessing.get_all_start_methods()  # CPU only: fork starts in a second
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork" if fork else "spawn")
    preds, targets = random_split(seed, num_classes=6, num_pred=8, videos=5)
    for rank in range(2):
        results = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        for matching, got in results.items():
            single = VideoSegmentationMetrics(6, matching=matching, max_pred_ids=16)
            for p, t in zip(preds, targets, strict=True):
                single.update(T(p), T(t))
            want = single.compute()
            assert got["frames"] == want["frames"] and got["videos"] == want["videos"]
            for key in ("mIoU", "pixel_acc", "mVC8", "mVC16"):
                assert got[key] == pytest.approx(want[key], abs=1e-12, nan_ok=True), (matching, key)
            # ratios of the same integer counts, in float64: equal up to the division's rounding.
            np.testing.assert_allclose(got["per_class_iou"], want["per_class_iou"], atol=1e-12)
            assert_bundle_equal(got, expected_bundle(preds, targets, 6, matching))
