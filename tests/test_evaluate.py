"""`python -m vss_lightning.evaluate` end to end on tiny shards written in tmp_path."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from shards import SIZE

from vss_lightning.data.format import IGNORE_INDEX, VideoMeta, encode_png, encode_sample
from vss_lightning.evaluate import EvaluationError, evaluate
from vss_lightning.evaluate import main as evaluate_main
from vss_lightning.metrics import VideoSegmentationMetrics

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5  # class 4 never occurs in the GT


def make_videos(seed: int = 0) -> list[dict]:
    """Videos as arrays: all-frame GT (255 where unlabelled), which frames are labelled, predictions."""
    rng = np.random.default_rng(seed)
    videos = []
    specs = [
        ("vid_a", 20, (6, 8), 2),
        ("vid_b", 9, (5, 7), 1),
        ("vid_c", 4, (4, 4), 1),
        ("vid_d", 26, (6, 5), 1),
    ]
    for video_id, frames, (h, w), clips in specs:
        gt = np.empty((frames, h, w), dtype=np.int64)
        gt[0] = rng.integers(0, NUM_CLASSES - 1, size=(h, w))
        for f in range(1, frames):
            gt[f] = np.where(
                rng.random((h, w)) < 0.05, rng.integers(0, NUM_CLASSES - 1, size=(h, w)), gt[f - 1]
            )
        gt[:, rng.random((h, w)) < 0.1] = IGNORE_INDEX  # void regions
        gt[rng.random(gt.shape) < 0.01] = IGNORE_INDEX
        labelled = sorted(rng.choice(frames, size=max(1, frames * 3 // 4), replace=False).tolist())
        if video_id == "vid_c":
            labelled = []  # no label at all: not scored, not counted
        if video_id == "vid_a":
            gt[labelled[1]] = IGNORE_INDEX  # a label file that is all void still counts as labelled (VSPW)
        noise = (rng.random((1, h, w)) < 0.2) | (rng.random(gt.shape) < 0.02)  # mostly static errors
        pred = np.where(noise, rng.integers(0, NUM_CLASSES, size=gt.shape), np.where(gt == 255, 0, gt))
        if video_id == "vid_d":
            pred = pred + 300  # uint16 prediction ids (out of range for matching none: wrong)
        videos.append(dict(id=video_id, gt=gt, labelled=labelled, pred=pred, clips=clips))
    return videos


def write_shards(root: Path, videos: list[dict], meta_num_classes: int | None = NUM_CLASSES) -> str:
    """Write the videos (vid_a split into 2 clips, in 2 shards) and return a brace pattern.

    `meta_num_classes` is the `num_classes` each sample's metadata records (None: not recorded).
    """
    root.mkdir(parents=True, exist_ok=True)
    writers = [wds.TarWriter(str(root / f"val-{i:06d}.tar")) for i in range(2)]
    for v_index, v in enumerate(videos):
        frames, h, w = v["gt"].shape
        bounds = np.linspace(0, frames, v["clips"] + 1).astype(int)
        for clip in range(v["clips"]):
            lo, hi = int(bounds[clip]), int(bounds[clip + 1])
            meta = VideoMeta(
                video_id=v["id"],
                frame_names=[f"{i:05d}" for i in range(lo, hi)],
                sizes=[(h, w)] * (hi - lo),
                labelled=[i - lo for i in v["labelled"] if lo <= i < hi],
                label_set=sorted(int(c) for c in np.unique(v["gt"]) if c != IGNORE_INDEX),
                source="test",
                clip_index=clip,
                num_clips=v["clips"],
                frame_offset=lo,
                num_classes=meta_num_classes,
            )
            rgb = encode_png(np.zeros((h, w, 3), dtype=np.uint8))
            labels = {i - lo: encode_png(v["gt"][i].astype(np.uint8)) for i in v["labelled"] if lo <= i < hi}
            writers[(v_index + clip) % 2].write(encode_sample(meta, [(rgb, "png")] * (hi - lo), labels))
    for writer in writers:
        writer.close()
    return str(root / "val-{000000..000001}.tar")


def write_manifest(root: Path, num_classes: int | None = NUM_CLASSES) -> Path:
    """The manifest.json data_tools writes next to the shards (the fields evaluation reads)."""
    shards = []
    for path in sorted(root.glob("*.tar")):
        with tarfile.open(path) as tar:
            clips = len({m.name.split(".", 1)[0] for m in tar.getmembers()})
        shards.append({"name": path.name, "clips": clips})
    manifest = {"source": "test", "num_classes": num_classes, "class_names": None, "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


def write_predictions(root: Path, videos: list[dict]) -> None:
    for v in videos:
        (root / v["id"]).mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if v["pred"].max() > 255 else np.uint8
        for f in range(len(v["pred"])):  # every frame, as the labeller writes them
            Image.fromarray(v["pred"][f].astype(dtype)).save(root / v["id"] / f"{f:05d}.png")


def expected(videos: list[dict], matching: str = "none", wrong: tuple[str, int] | None = None) -> dict:
    """The in-process metrics on the labelled frames (optionally one frame predicted as missing)."""
    metrics = VideoSegmentationMetrics(NUM_CLASSES, matching=matching, max_pred_ids=512)
    for v in videos:
        if not v["labelled"]:
            continue
        pred = torch.from_numpy(v["pred"][v["labelled"]]).clone()
        if wrong and wrong[0] == v["id"]:
            pred[v["labelled"].index(wrong[1])] = -1
        gt = torch.from_numpy(v["gt"][v["labelled"]])
        metrics.update(pred, gt, torch.ones(len(v["labelled"]), dtype=torch.bool))
    return metrics.compute()


def assert_same(got: dict, want: dict) -> None:
    for key in ("mIoU", "pixel_acc", "mVC8", "mVC16"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert [math.nan if v is None else v for v in got["per_class_iou"]] == pytest.approx(
        want["per_class_iou"], abs=1e-12, nan_ok=True
    )
    assert (got["frames"], got["videos"]) == (want["frames"], want["videos"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m vss_lightning.evaluate ARGS`, run in this process (a new process would spend most of
    its time importing torch): exit status, stdout and stderr as a subprocess would give them."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            evaluate_main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                err.write(e.code)
    return subprocess.CompletedProcess(["evaluate", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture()
def dataset(tmp_path):
    videos = make_videos()
    pattern = write_shards(tmp_path / "shards", videos)
    write_predictions(tmp_path / "pred", videos)
    return videos, pattern, tmp_path / "pred"


def test_cli_scores_predictions(dataset, tmp_path):
    videos, pattern, pred = dataset
    out = tmp_path / "results" / "metrics.json"
    proc = run_cli("--pred", str(pred), "--gt", pattern, "--num_classes", str(NUM_CLASSES), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert got == json.loads(proc.stdout)
    assert set(got) == {"mIoU", "pixel_acc", "mVC8", "mVC16", "per_class_iou", "frames", "videos", "missing"}
    want = expected(videos)
    assert_same(got, want)
    assert got["per_class_iou"][NUM_CLASSES - 1] is None  # absent from the GT
    assert got["videos"] == 3 and got["frames"] == sum(len(v["labelled"]) for v in videos)
    assert 0 < got["mIoU"] < 1 and 0 < got["mVC16"] < 1 and got["missing"] == []


def test_cli_missing_prediction(dataset, tmp_path):
    videos, pattern, pred = dataset
    frame = videos[0]["labelled"][3]
    missing = pred / "vid_a" / f"{frame:05d}.png"
    missing.unlink()
    args = ("--pred", str(pred), "--gt", pattern, "--num_classes", str(NUM_CLASSES))
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "--missing as-wrong" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run_cli(*args, "--missing", "as-wrong")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["missing"] == [f"vid_a/{frame:05d}.png"]
    assert_same(got, expected(videos, wrong=("vid_a", frame)))
    assert got["mIoU"] < expected(videos)["mIoU"]


def test_perfect_and_permuted_predictions(dataset):
    videos, pattern, pred = dataset
    rng = np.random.default_rng(1)
    for v in videos:  # cluster ids: a different permutation per video
        perm = rng.permutation(40)
        v["pred"] = perm[np.where(v["gt"] == IGNORE_INDEX, 0, v["gt"])]
    write_predictions(pred, videos)
    got = evaluate(str(pred), pattern, NUM_CLASSES, matching="video", max_pred_ids=40)
    assert got["mIoU"] == 1.0 and got["pixel_acc"] == 1.0 and got["missing"] == []
    assert evaluate(str(pred), pattern, NUM_CLASSES, matching="none")["mIoU"] < 1.0
    for v in videos:
        v["pred"] = np.where(v["gt"] == IGNORE_INDEX, 0, v["gt"])
    write_predictions(pred, videos)
    got = evaluate(str(pred), pattern, NUM_CLASSES)
    assert got["mIoU"] == 1.0 and got["pixel_acc"] == 1.0


@pytest.mark.parametrize("matching", ["video", "dataset"])
def test_matching_equals_in_process(dataset, matching):
    videos, pattern, pred = dataset
    got = evaluate(str(pred), pattern, NUM_CLASSES, matching=matching, max_pred_ids=512)
    assert_same(got, expected(videos, matching))
    with pytest.raises(ValueError, match=r"Expected predicted ids to be in \[0, 256\).*max_pred_ids"):
        evaluate(str(pred), pattern, NUM_CLASSES, matching=matching)  # vid_d has ids >= 300


def test_glob_pattern_equals_brace_pattern(dataset, tmp_path):
    _, pattern, pred = dataset
    glob_pattern = str(tmp_path / "shards" / "val-*.tar")
    assert_same(evaluate(str(pred), glob_pattern, NUM_CLASSES), evaluate(str(pred), pattern, NUM_CLASSES))


def test_wrong_size_prediction(dataset):
    videos, pattern, pred = dataset
    frame = videos[1]["labelled"][0]
    path = pred / "vid_b" / f"{frame:05d}.png"
    Image.fromarray(np.zeros((3, 3), dtype=np.uint8)).save(path)
    with pytest.raises(EvaluationError, match=rf"{re.escape(str(path))}.*size 3x3, expected 5x7"):
        evaluate(str(pred), pattern, NUM_CLASSES)
    got = evaluate(str(pred), pattern, NUM_CLASSES, missing="as-wrong")
    assert got["missing"] == [f"vid_b/{frame:05d}.png"]
    assert_same(got, expected(videos, wrong=("vid_b", frame)))


def test_input_errors(dataset, tmp_path):
    videos, pattern, pred = dataset
    with pytest.raises(EvaluationError, match="pattern .*none-.* in `--gt` to match shard files"):
        evaluate(str(pred), str(tmp_path / "none-*.tar"), NUM_CLASSES)
    with pytest.raises(EvaluationError, match="named by `--gt` to exist, but .*val-000002.tar' does not"):
        evaluate(str(pred), str(tmp_path / "shards" / "val-{000000..000009}.tar"), NUM_CLASSES)
    with pytest.raises(
        EvaluationError, match=r"folder .* in `--gt` to hold the manifest.json.*shards/\*.tar' instead"
    ):
        evaluate(str(pred), str(tmp_path / "shards"), NUM_CLASSES)  # a folder without manifest.json
    with pytest.raises(EvaluationError, match=r"only clips \[[01]\] were found"):
        evaluate(str(pred), str(tmp_path / "shards" / "val-000000.tar"), NUM_CLASSES)
    with pytest.raises(
        EvaluationError, match="Expected `--num_classes` to match the shards.*--num_classes 5"
    ):
        evaluate(str(pred), pattern, 7)
    rgb = pred / "vid_b" / f"{videos[1]['labelled'][0]:05d}.png"
    Image.fromarray(np.zeros((5, 7, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(EvaluationError, match=rf"{re.escape(str(rgb))}.*single-channel.*'RGB'"):
        evaluate(str(pred), pattern, NUM_CLASSES, missing="as-wrong")


def test_folder_and_list_equal_the_pattern_and_num_classes_comes_from_the_manifest(dataset, tmp_path):
    videos, pattern, pred = dataset
    shards = tmp_path / "shards"
    write_manifest(shards)
    want = expected(videos)
    assert_same(evaluate(str(pred), str(shards)), want)  # folder, C from manifest.json
    assert_same(evaluate(str(pred), [str(p) for p in sorted(shards.glob("*.tar"))], NUM_CLASSES), want)
    glob_out, folder_out = tmp_path / "glob.json", tmp_path / "folder.json"
    glob_pattern = str(shards / "val-*.tar")
    proc = run_cli("--pred", str(pred), "--gt", glob_pattern, "--num_classes", str(NUM_CLASSES), "--out",
                   str(glob_out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("--pred", str(pred), "--gt", str(shards), "--out", str(folder_out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(folder_out.read_text()) == json.loads(glob_out.read_text())
    assert len(json.loads(folder_out.read_text())["per_class_iou"]) == NUM_CLASSES
    shard_files = [str(p) for p in sorted(shards.glob("*.tar"))]
    proc = run_cli("--pred", str(pred), "--gt", *shard_files)  # several `--gt` values
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(glob_out.read_text())


def test_num_classes_from_manifest_then_metadata_else_a_clear_error(tmp_path):
    videos = make_videos()
    write_predictions(tmp_path / "pred", videos)
    pred, want = str(tmp_path / "pred"), expected(videos)
    bare = tmp_path / "bare"  # the samples record no num_classes
    write_shards(bare, videos, meta_num_classes=None)
    proc = run_cli("--pred", pred, "--gt", str(bare / "*.tar"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Expected `--num_classes` to be given" in proc.stderr and "Pass `--num_classes C`" in proc.stderr
    assert_same(evaluate(pred, str(bare / "*.tar"), NUM_CLASSES), want)
    write_manifest(bare, NUM_CLASSES)
    got = evaluate(pred, str(bare))  # from the manifest only
    assert_same(got, want)
    assert len(got["per_class_iou"]) == NUM_CLASSES
    write_manifest(bare, NUM_CLASSES + 1)  # the manifest decides C when the samples do not record it
    assert len(evaluate(pred, str(bare))["per_class_iou"]) == NUM_CLASSES + 1
    meta = tmp_path / "meta"  # no manifest: the samples' metadata tells C
    write_shards(meta, videos)
    assert_same(evaluate(pred, str(meta / "*.tar")), want)


def test_num_classes_that_disagrees_with_the_manifest_is_an_error(dataset, tmp_path):
    _, pattern, pred = dataset
    manifest = write_manifest(tmp_path / "shards")
    for gt in (pattern, str(tmp_path / "shards")):
        with pytest.raises(
            EvaluationError,
            match=rf"`--num_classes` to match the shards' manifest.json \({re.escape(str(manifest))}: 5\), "
            r"but got 7. Pass `--num_classes 5`",
        ):
            evaluate(str(pred), gt, 7)
    proc = run_cli("--pred", str(pred), "--gt", str(tmp_path / "shards"), "--num_classes", "7")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "`--num_classes 5`" in proc.stderr
    write_manifest(tmp_path / "shards", NUM_CLASSES + 1)  # manifest and samples disagree
    with pytest.raises(EvaluationError, match="records num_classes=5. The shards disagree"):
        evaluate(str(pred), pattern)


def test_shard_cut_between_samples_is_caught_by_the_manifest(dataset, tmp_path):
    _, pattern, pred = dataset
    shards = tmp_path / "shards"
    write_manifest(shards)
    first = shards / "val-000000.tar"
    with tarfile.open(first) as tar:
        last_key = tar.getmembers()[-1].name.split(".", 1)[0]
        cut = next(m for m in tar.getmembers() if m.name.startswith(last_key)).offset
    first.write_bytes(first.read_bytes()[:cut])  # a valid, shorter tar: tar itself cannot tell
    with pytest.raises(EvaluationError, match=r"val-000000.tar' to hold \d+ samples as its manifest.json"):
        evaluate(str(pred), str(shards))


def test_ground_truth_ids_outside_num_classes_are_an_error(tmp_path):
    videos = make_videos()
    write_predictions(tmp_path / "pred", videos)
    bare = tmp_path / "bare"  # the samples record no num_classes, so `--num_classes 3` is not refused early
    write_shards(bare, videos, meta_num_classes=None)
    vid_a = videos[0]  # the first video with labelled frames; its GT has ids 0..3
    frame = next(i for i in vid_a["labelled"] if (vid_a["gt"][i] == 3).any())
    with pytest.raises(
        EvaluationError,
        match=rf"ground truth of frame '{frame:05d}' of video 'vid_a' \(.*val-00000[01].tar.*\) to hold "
        r"class ids in \[0, 3\) or the ignore index 255, but got ids \[3\] with `--num_classes` 3 \(given\). "
        r"Pass `--num_classes 4` if the dataset has that many classes, else fix the shards' labels.",
    ):
        evaluate(str(tmp_path / "pred"), str(bare / "*.tar"), 3)
    assert_same(evaluate(str(tmp_path / "pred"), str(bare / "*.tar"), NUM_CLASSES), expected(videos))


def test_cli_num_classes_below_two_and_unwritable_out(dataset, tmp_path):
    videos, pattern, pred = dataset
    proc = run_cli("--pred", str(pred), "--gt", pattern, "--num_classes", "1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: Expected `--num_classes` to be an int >= 2 (mIoU needs at least two classes), but got 1 "
        "(given). Pass the dataset's number of classes, e.g. `--num_classes 124`."
    ]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "metrics.json"  # its parent is a file: cannot be created
    proc = run_cli("--pred", str(pred), "--gt", pattern, "--num_classes", str(NUM_CLASSES), "--out", str(out))
    assert proc.returncode == 1
    assert_same(json.loads(proc.stdout), expected(videos))  # the metrics are shown first
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: Expected `--out` {str(out)!r} to be a writable file path, but writing")
    assert line.endswith("The metrics are printed above; pass another `--out`.")


@pytest.fixture(scope="module")
def predicted(local_labels) -> tuple[str, Path, Path]:
    """Labelled synthetic shards ("a" in two clips; "b", "c") and the smoke config's `predict` of them,
    as png folders and as label shards (conftest `local_labels`): (gt pattern, png folder, shards folder)."""
    assert list(local_labels.tars.glob("labels-rank*.tar")) and not list(local_labels.tars.glob("*/*.png"))
    return local_labels.shards, local_labels.png, local_labels.tars


def test_label_shards_score_as_the_same_labels_stored_as_png(predicted):
    gt, png, tars = predicted
    for matching in ("none", "video"):
        results = []
        for pred in (png, tars):
            proc = run_cli("--pred", str(pred), "--gt", gt, "--matching", matching)
            assert proc.returncode == 0, proc.stderr
            results.append(json.loads(proc.stdout))
        assert results[0] == results[1], matching  # every metric, per-class IoU and `missing`
        assert (results[0]["frames"], results[0]["videos"], results[0]["missing"]) == (12, 3, [])
        assert len(results[0]["per_class_iou"]) == 4


def _copy_tar_without(src: Path, dst: Path, drop: tuple[str, ...]) -> None:
    """Copy a tar, leaving out the members whose names start with one of `drop`."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            if not member.name.startswith(drop):
                tout.addfile(member, tin.extractfile(member))


def test_missing_video_and_frame_in_label_shards_behave_as_missing_pngs(predicted, tmp_path):
    gt, png, tars = predicted
    png_out, tar_out = tmp_path / "png", tmp_path / "tars"
    shutil.copytree(png, png_out, ignore=shutil.ignore_patterns("b"))  # video "b" missing
    (png_out / "a" / "a_f0004.png").unlink()  # and the frame of the second clip of "a"
    tar_out.mkdir()
    [tar] = sorted(tars.glob("labels-rank*.tar"))
    _copy_tar_without(tar, tar_out / tar.name, ("b__", "a__c0001.00000.label.png"))
    size = f"{SIZE[0]}x{SIZE[1]}"
    for pred in (png_out, tar_out):
        with pytest.raises(
            EvaluationError,
            match=rf"Expected a prediction .* \({size}\) for labelled frame 'a_f0004' of video 'a', but it "
            r"is missing. Predict every labelled frame, or pass `--missing as-wrong`",
        ):
            evaluate(str(pred), gt)
    with pytest.raises(EvaluationError, match=rf"prediction in '{re.escape(str(tar_out / tar.name))}'"):
        evaluate(str(tar_out), gt)  # the message names the tar
    results = []
    for pred in (png_out, tar_out):
        proc = run_cli("--pred", str(pred), "--gt", gt, "--missing", "as-wrong")
        assert proc.returncode == 0, proc.stderr
        assert "'b_f0001' of video 'b' is missing; counted as wrong" in proc.stderr
        results.append(json.loads(proc.stdout))
    assert results[0] == results[1]
    assert results[0]["missing"] == ["a/a_f0004.png", "b/b_f0000.png", "b/b_f0001.png", "b/b_f0002.png"]
    assert (results[0]["frames"], results[0]["videos"]) == (12, 3)  # scored, as wrong
    shutil.rmtree(tar_out)
    tar_out.mkdir()
    _copy_tar_without(tar, tar_out / tar.name, ("b__",))  # only "b" missing: the error names it
    proc = run_cli("--pred", str(tar_out), "--gt", gt)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"prediction in the label shards {str(tar_out / 'labels-rank*.tar')!r} ({size})" in proc.stderr
    assert "frame 'b_f0000' of video 'b'" in proc.stderr


def test_a_folder_with_png_videos_and_label_shards_is_an_error(predicted, tmp_path):
    gt, png, tars = predicted
    both = tmp_path / "both"
    shutil.copytree(tars, both)
    shutil.copytree(png / "a", both / "a")
    [tar] = sorted(both.glob("labels-rank*.tar"))
    proc = run_cli("--pred", str(both), "--gt", gt)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        f"error: Expected `--pred` {str(both)!r} to hold one kind of predictions, png video folders "
        f"(<video>/<frame>.png) or label shards (labels-rank*.tar), but it holds both: {str(both / 'a')!r} "
        f"and {str(tar)!r}. Move one kind to another folder and pass that folder as `--pred`."
    ) in proc.stderr
    shutil.rmtree(both / "a")
    shutil.copy(tar, both / "labels-rank001-000000.tar")  # one video in two tars
    with pytest.raises(EvaluationError, match="Expected video 'a' in one label shard of `--pred`, but both"):
        evaluate(str(both), gt)
    (both / "labels-rank001-000000.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(EvaluationError, match=r"shard .*labels-rank001-000000.tar' to be a readable tar"):
        evaluate(str(both), gt)


def test_only_unfinished_label_shards_is_a_clear_error(predicted, tmp_path):
    """A `--pred` holding only `.tar.tmp` label shards (a predict still running, or killed) says so, instead
    of reporting every frame's png as missing."""
    gt, _, tars = predicted
    running = tmp_path / "running"
    running.mkdir()
    [tar] = sorted(tars.glob("labels-rank*.tar"))[:1]
    shutil.copy(tar, running / (tar.name + ".tmp"))
    with pytest.raises(EvaluationError, match="only unfinished label shards .*Let it finish, or rerun it"):
        evaluate(str(running), gt)
