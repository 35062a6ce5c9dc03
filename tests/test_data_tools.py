"""data_tools converters on tiny synthetic copies of each layout, read back through the DataModule."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from data_tools import camvid, writer
from data_tools.__main__ import main, parse_size
from vss_lightning.data.datamodule import VideoShardDataModule
from vss_lightning.data.format import FailedSample, VideoSample

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


def rgb(path: Path, h: int = 6, w: int = 8, seed: int = 0, **save_kw) -> np.ndarray:
    """Write a random RGB image; returns its pixels."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **save_kw)
    return arr


def ids(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = arr.astype(np.uint8)
    img = Image.fromarray(arr) if mode == "L" else Image.frombytes("P", arr.shape[::-1], arr.tobytes())
    if mode == "P":
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path)


def convert(*args: str, out: Path) -> int:
    return main([*args, "--out", str(out / "x-%06d.tar"), "--quiet"])


def read_back(out: Path, num_workers: int = 0) -> list[VideoSample | FailedSample]:
    dm = VideoShardDataModule(str(out), num_workers=num_workers)
    dm.setup("predict")
    return list(dm.predict_dataloader())


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def pil(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def frames_np(sample: VideoSample) -> np.ndarray:
    return sample.frames.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3)


# ------------------------------------------------------------------------------------------ VSPW


def test_vspw_keeps_jpeg_bytes_and_remaps_labels(tmp_path: Path) -> None:
    root = tmp_path / "VSPW"
    raw = np.array([[0, 1, 5, 124], [255, 2, 2, 0]] * 3, dtype=np.uint8)  # (6, 4)
    for v, n in (("v1", 3), ("v2", 2), ("v3", 2)):
        for i in range(n):
            rgb(root / "data" / v / "origin" / f"{i:08d}.jpg", 6, 4, seed=i, quality=90)
            if v != "v3":  # v3 has no masks (like the test split)
                ids(root / "data" / v / "mask" / f"{i:08d}.png", raw, mode="P")
    (root / "train.txt").write_text("v2\n")
    (root / "val.txt").write_text("v1\nv3\n")
    out = tmp_path / "out"
    assert convert("vspw", "--root", str(root), "--split", "val", out=out) == 0
    got = read_back(out)
    assert [s.video_id for s in got] == ["v1", "v3"]
    v1, v3 = got
    assert v1.meta.num_classes == 124 and v1.meta.source == "vspw" and v1.meta.labelled == [0, 1, 2]
    assert v1.meta.frame_names == ["00000000", "00000001", "00000002"]
    tar = members(out / "x-000000.tar")
    for s in got:
        for i, name in enumerate(s.meta.frame_names):
            src = root / "data" / s.video_id / "origin" / f"{name}.jpg"
            assert tar[f"{s.key}.{i:05d}.jpg"] == src.read_bytes()  # stored, not re-encoded
            np.testing.assert_array_equal(frames_np(s)[i], pil(src))
    expected = np.where((raw == 0) | (raw == 255), 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(v1.labels[0].numpy(), expected)
    assert v1.meta.label_set == sorted(set(np.unique(v1.labels.numpy()).tolist()) - {255})
    assert v3.labels is None and v3.meta.labelled == []


def test_vspw_rejects_values_outside_its_label_range(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "VSPW"
    rgb(root / "data" / "v" / "origin" / "0.jpg", 2, 2)
    ids(root / "data" / "v" / "mask" / "0.png", np.full((2, 2), 200))
    (root / "val.txt").write_text("v\n")
    assert convert("vspw", "--root", str(root), "--split", "val", out=tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "0.png" in err and "[200]" in err


# ------------------------------------------------------------------------------------ Cityscapes


def _cityscapes(root: Path, snippets: dict[tuple[str, str], list[int]], label: np.ndarray) -> None:
    for (city, seq), annotated in snippets.items():
        for f in annotated:
            for n in range(f - 19, f + 11):
                rgb(
                    root / "leftImg8bit_sequence" / "val" / city / f"{city}_{seq}_{n:06d}_leftImg8bit.png",
                    4,
                    6,
                    n,
                )
            gt = root / "gtFine" / "val" / city
            ids(gt / f"{city}_{seq}_{f:06d}_gtFine_labelIds.png", label)
            ids(gt / f"{city}_{seq}_{f:06d}_gtFine_color.png", label)  # other gtFine products: unused


def test_cityscapes_sequence_snippets_around_annotated_frames(tmp_path: Path) -> None:
    label = np.array([[0, 7, 26, 33, 9, 24]] * 4)  # unlabelled, road, car, bicycle, parking, person
    # two snippets of one city sequence share <seq> with different frame numbers
    _cityscapes(tmp_path, {("aachen", "000000"): [19, 119], ("bochum", "000003"): [19]}, label)
    out = tmp_path / "out"
    assert convert("cityscapes", "--root", str(tmp_path), "--split", "val", out=out) == 0
    got = read_back(out)
    assert [s.video_id for s in got] == [
        "aachen_000000_000019",
        "aachen_000000_000119",
        "bochum_000003_000019",
    ]
    for s in got:
        f = int(s.video_id[-6:])
        city, seq = s.video_id.split("_")[:2]
        assert s.meta.frame_names == [f"{city}_{seq}_{n:06d}_leftImg8bit" for n in range(f - 19, f + 11)]
        assert s.meta.labelled == [19] and s.meta.num_classes == 19
        np.testing.assert_array_equal(s.labels[19].numpy(), [[255, 0, 13, 18, 255, 11]] * 4)
        assert (s.labels[:19] == 255).all() and (s.labels[20:] == 255).all()
        src = tmp_path / "leftImg8bit_sequence" / "val" / city / f"{s.meta.frame_names[5]}.png"
        np.testing.assert_array_equal(frames_np(s)[5], pil(src))
    assert manifest(out)["ignored_files"] == []


def test_cityscapes_missing_snippet_frame_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _cityscapes(tmp_path, {("aachen", "000000"): [19, 119]}, np.full((4, 6), 7))
    gone = tmp_path / "leftImg8bit_sequence" / "val" / "aachen" / "aachen_000000_000105_leftImg8bit.png"
    gone.unlink()
    out = tmp_path / "out"
    assert convert("cityscapes", "--root", str(tmp_path), "--split", "val", out=out) == 1
    assert gone.name in capsys.readouterr().err
    assert (
        convert("cityscapes", "--root", str(tmp_path), "--split", "val", "--on-error", "skip", out=out) == 0
    )
    assert [s.video_id for s in read_back(out)] == ["aachen_000000_000019"]
    skipped = manifest(out)["skipped"]
    assert skipped[0]["item"] == "aachen_000000_000119" and gone.name in skipped[0]["reason"]
    assert len(skipped) == 3  # the snippet, and its leftover frames (two runs around the gap) are listed


def test_cityscapes_plain_layout_one_frame_per_annotated_image(tmp_path: Path) -> None:
    for f in (294, 576):
        rgb(
            tmp_path / "leftImg8bit" / "val" / "frankfurt" / f"frankfurt_000000_{f:06d}_leftImg8bit.png",
            4,
            6,
            f,
        )
        ids(tmp_path / "gtFine" / "val" / "frankfurt" / f"frankfurt_000000_{f:06d}_gtFine_labelIds.png",
            np.full((4, 6), 23))  # fmt: skip
    out = tmp_path / "out"
    assert convert("cityscapes", "--root", str(tmp_path), "--split", "val", out=out) == 0
    got = read_back(out)
    assert [(s.video_id, s.frames.shape[0]) for s in got] == [("frankfurt_000000_000294", 1),
                                                              ("frankfurt_000000_000576", 1)]  # fmt: skip
    assert all((s.labels == 10).all() for s in got)  # sky


# ---------------------------------------------------------------------------------------- CamVid


def test_camvid_segnet_layout_groups_sequences_in_frame_order(tmp_path: Path) -> None:
    label = np.array([[0, 3, 10, 11]] * 2)
    for name in ("0001TP_f10", "0001TP_f9", "Seq05VD_f00030", "Seq05VD_f00000"):
        rgb(tmp_path / "test" / f"{name}.png", 2, 4, seed=len(name))
        ids(tmp_path / "testannot" / f"{name}.png", label)
    rgb(tmp_path / "train" / "0016E5_00001.png", 2, 4)
    out = tmp_path / "out"
    assert convert("camvid", "--root", str(tmp_path), "--split", "test", out=out) == 0
    got = read_back(out)
    assert [(s.video_id, s.meta.frame_names) for s in got] == [
        ("0001TP", ["0001TP_f9", "0001TP_f10"]),
        ("Seq05VD", ["Seq05VD_f00000", "Seq05VD_f00030"]),
    ]
    tar = members(out / "x-000000.tar")
    for s in got:
        for i, name in enumerate(s.meta.frame_names):
            assert tar[f"{s.key}.{i:05d}.png"] == (tmp_path / "test" / f"{name}.png").read_bytes()
        np.testing.assert_array_equal(s.labels.numpy(), [[[0, 3, 10, 255]] * 2] * 2)
        assert s.meta.class_names == camvid.CLASSES_11


def test_camvid_original_colour_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    colours = {
        (128, 64, 128): 17,
        (0, 0, 0): 255,
        (64, 192, 0): 30,
        (64, 128, 64): 0,
    }  # Road Void Wall Animal
    label = np.array([list(colours)], dtype=np.uint8)  # (1, 4, 3)
    (tmp_path / "LabeledApproved_full").mkdir()
    for name in ("0006R0_f00930", "0006R0_f00960"):
        rgb(tmp_path / "701_StillsRaw_full" / f"{name}.png", 1, 4)
        Image.fromarray(label).save(tmp_path / "LabeledApproved_full" / f"{name}_L.png")
    out = tmp_path / "out"
    assert convert("camvid", "--root", str(tmp_path), out=out) == 0
    (s,) = read_back(out)
    assert s.meta.num_classes == 31 and len(camvid.COLORS_32) == 32 and s.meta.class_names[30] == "Wall"
    np.testing.assert_array_equal(s.labels.numpy(), [[list(colours.values())]] * 2)
    bad = label.copy()
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(tmp_path / "LabeledApproved_full" / "0006R0_f00960_L.png")
    assert convert("camvid", "--root", str(tmp_path), "--overwrite", out=out) == 1
    err = capsys.readouterr().err
    assert "0006R0_f00960_L.png" in err and "(1, 2, 3)" in err


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid frames not present at {CAMVID}")
def test_camvid_real_sequence_round_trip_is_pixel_identical(tmp_path: Path) -> None:
    # The first 45 frames of the real sequence (its layout, in tmp_path): two clips of 40 and 5.
    root = tmp_path / "camvid"
    for kind in ("images", "labels"):
        (root / "0006R0" / kind).mkdir(parents=True)
        for path in sorted((CAMVID / "0006R0" / kind).glob("*.png"))[:45]:
            shutil.copyfile(path, root / "0006R0" / kind / path.name)
    out = tmp_path / "out"
    assert convert("camvid", "--root", str(root), "--max-frames-per-clip", "40", out=out) == 0
    got = read_back(out, num_workers=2)
    assert all(isinstance(s, VideoSample) for s in got)
    images = sorted((root / "0006R0" / "images").glob("*.png"))
    assert len(images) == 45
    assert [n for s in got for n in s.meta.frame_names] == [p.stem for p in images]  # frame order
    assert [s.meta.clip_index for s in got] == [0, 1] and got[0].meta.num_clips == 2
    frames = np.concatenate([frames_np(s) for s in got])
    labels = np.concatenate([s.labels.numpy() for s in got])
    tar = members(out / "x-000000.tar")
    for t, p in enumerate(images):
        s = got[t // 40]
        assert tar[f"{s.key}.{t % 40:05d}.png"] == p.read_bytes()  # PNG stored byte-identical
        np.testing.assert_array_equal(frames[t], pil(p))
        src = np.asarray(Image.open(CAMVID / "0006R0" / "labels" / p.name)).astype(np.int64)
        np.testing.assert_array_equal(labels[t], np.where(src == 11, 255, src))
    m = manifest(out)
    assert (m["videos"], m["clips"], m["frames"], m["labelled_frames"]) == (1, 2, 45, 45)


def test_camvid_flat_layout_from_a_sequence_folder(tmp_path: Path) -> None:
    seq = tmp_path / "0006R0"
    for name in ("0006R0_f00960", "0006R0_f00930"):
        rgb(seq / "images" / f"{name}.png", 2, 2)
        ids(seq / "labels" / f"{name}.png", np.array([[11, 0], [10, 255]]))
    out = tmp_path / "out"
    assert convert("camvid", "--root", str(seq), out=out) == 0
    (s,) = read_back(out)
    assert s.video_id == "0006R0" and s.meta.frame_names == ["0006R0_f00930", "0006R0_f00960"]
    np.testing.assert_array_equal(s.labels[0].numpy(), [[255, 0], [10, 255]])


def test_empty_source_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "src").mkdir()
    assert convert("frames", "--root", str(tmp_path / "src"), out=tmp_path / "out") == 1
    assert "one folder of frames per video" in capsys.readouterr().err
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "x.txt").write_text("")
    assert convert("video", "--root", str(tmp_path / "v"), out=tmp_path / "out") == 1
    assert "at least one video" in capsys.readouterr().err


# ------------------------------------------------------------------------------- frames and video


def test_frames_folders_with_labels(tmp_path: Path) -> None:
    src, lab = tmp_path / "src", tmp_path / "lab"
    for i, name in enumerate(("1", "2", "10")):
        rgb(src / "walk" / f"{name}.jpg", 6, 8, seed=i, quality=80)
    ids(lab / "walk" / "2.png", np.arange(48).reshape(6, 8))
    rgb(src / "swim" / "a.png", 4, 4)
    rgb(src / "swim" / "b.bmp", 4, 4, seed=7)  # not a stored format: re-encoded as PNG (lossless)
    (src / "swim" / "notes.txt").write_text("not a frame")
    out = tmp_path / "out"
    assert convert("frames", "--root", str(src), "--labels", str(lab), out=out) == 0
    swim, walk = read_back(out)
    assert walk.meta.frame_names == ["1", "2", "10"] and walk.meta.labelled == [1]
    for i, name in enumerate(walk.meta.frame_names):
        np.testing.assert_array_equal(frames_np(walk)[i], pil(src / "walk" / f"{name}.jpg"))
    np.testing.assert_array_equal(walk.labels[1].numpy(), np.arange(48).reshape(6, 8))
    assert (walk.labels[0] == 255).all() and swim.labels is None
    np.testing.assert_array_equal(frames_np(swim)[1], pil(src / "swim" / "b.bmp"))
    assert manifest(out)["ignored_files"] == [str(src / "swim" / "notes.txt")]


def _mp4(path: Path, n: int = 30, fps: int = 30) -> list[np.ndarray]:
    """A tiny mpeg4 video; returns its frames as PyAV decodes them."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(n):
            img = np.zeros((24, 32, 3), np.uint8)
            img[:, : i + 1] = (255, 128, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_video_files_fps_subsampling(tmp_path: Path) -> None:
    decoded = _mp4(tmp_path / "clip.mp4")
    assert len(decoded) == 30
    out = tmp_path / "out"
    assert convert("video", "--root", str(tmp_path / "clip.mp4"), "--fps", "10", "--image-format", "png",
                   out=out) == 0  # fmt: skip
    (s,) = read_back(out)
    assert s.video_id == "clip" and s.meta.frame_names == [f"{i:06d}" for i in range(0, 30, 3)]
    for t, name in enumerate(s.meta.frame_names):  # PNG is lossless: exactly the decoded frames
        np.testing.assert_array_equal(frames_np(s)[t], decoded[int(name)])
    assert convert("video", "--root", str(tmp_path), "--overwrite", out=out) == 0
    (s,) = read_back(out)
    assert s.frames.shape == (30, 3, 24, 32) and all(n.endswith(".jpg") for n in members(out / "x-000000.tar")
                                                     if not n.endswith("meta.json"))  # fmt: skip
    assert not list(out.glob(".extract-*"))  # scratch frames removed


# ------------------------------------------------------------------------------ clips and shards


def _videos(root: Path, lengths: dict[str, int], h: int = 4, w: int = 4) -> None:
    for v, n in lengths.items():
        for i in range(n):
            rgb(root / v / f"{i:03d}.png", h, w, seed=i + 100 * len(v))


def test_clips_stay_consecutive_in_one_shard(tmp_path: Path) -> None:
    _videos(tmp_path / "src", {"a": 7, "bb": 2, "ccc": 5})
    out = tmp_path / "out"
    assert convert("frames", "--root", str(tmp_path / "src"), "--max-frames-per-clip", "3",
                   "--max-videos-per-shard", "2", out=out) == 0  # fmt: skip
    m = manifest(out)
    assert [(s["video_ids"], s["clips"], s["frames"]) for s in m["shards"]] == [
        (["a", "bb"], 4, 9), (["ccc"], 2, 5)
    ]  # fmt: skip
    with tarfile.open(out / "x-000000.tar") as tar:
        keys = list(dict.fromkeys(n.split(".")[0] for n in tar.getnames()))
    assert keys == ["a__c0000", "a__c0001", "a__c0002", "bb__c0000"]
    got = read_back(out, num_workers=2)
    a = [s for s in got if s.video_id == "a"]
    assert [(s.meta.clip_index, s.meta.num_clips, s.meta.frame_offset, s.frames.shape[0]) for s in a] == [
        (0, 3, 0, 3), (1, 3, 3, 3), (2, 3, 6, 1)
    ]  # fmt: skip
    whole = np.concatenate([frames_np(s) for s in a])
    for i in range(7):
        np.testing.assert_array_equal(whole[i], pil(tmp_path / "src" / "a" / f"{i:03d}.png"))
    # a shard size below one video: each video gets its own shard, its clips still together
    assert convert("frames", "--root", str(tmp_path / "src"), "--max-frames-per-clip", "3", "--shard-size",
                   "1K", "--overwrite", out=out) == 0  # fmt: skip
    assert [s["video_ids"] for s in manifest(out)["shards"]] == [["a"], ["bb"], ["ccc"]]


def test_shard_size_is_respected(tmp_path: Path) -> None:
    _videos(tmp_path / "src", {f"v{i}": 3 for i in range(6)}, h=32, w=32)
    out = tmp_path / "out"
    limit = 30 * 1024
    assert convert("frames", "--root", str(tmp_path / "src"), "--shard-size", str(limit), out=out) == 0
    shards = manifest(out)["shards"]
    assert len(shards) > 1 and sum(s["videos"] for s in shards) == 6
    for s in shards:
        assert s["bytes"] == (out / s["name"]).stat().st_size <= limit
    assert [s.video_id for s in read_back(out)] == [f"v{i}" for i in range(6)]


def test_parse_size() -> None:
    assert parse_size("1000") == 1000 and parse_size("1.5K") == 1536 and parse_size("2G") == 2 * 2**30


# ------------------------------------------------------------------------------------- bad input


def _corrupt_jpeg(root: Path) -> str:
    path = root / "bad" / "001.jpg"
    rgb(path, 16, 16)
    path.write_bytes(path.read_bytes()[:200])
    return str(path)


def _wrong_label_size(root: Path) -> str:
    rgb(root / "bad" / "000.png", 4, 4)
    ids(root.parent / "lab" / "bad" / "000.png", np.zeros((3, 4)))
    return str(root.parent / "lab" / "bad" / "000.png")


def _corrupt_label(root: Path) -> str:
    rgb(root / "bad" / "000.png", 4, 4)
    path = root.parent / "lab" / "bad" / "000.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return str(path)


def _empty_video(root: Path) -> str:
    (root / "bad").mkdir(parents=True)
    return "'bad'"


def _invalid_name(root: Path) -> str:
    rgb(root / "bad\x07" / "000.png", 4, 4)
    return "'bad\\x07'"


@pytest.mark.parametrize(
    "make_bad", [_corrupt_jpeg, _corrupt_label, _wrong_label_size, _empty_video, _invalid_name]
)
def test_bad_input_fails_or_is_skipped_and_listed(tmp_path: Path, make_bad, capsys) -> None:
    src = tmp_path / "src"
    (tmp_path / "lab").mkdir()
    _videos(src, {"good": 2, "zgood": 1})
    named = make_bad(src)
    out = tmp_path / "out"
    args = ["frames", "--root", str(src), "--labels", str(tmp_path / "lab")]
    assert convert(*args, out=out) == 1
    assert named in capsys.readouterr().err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))
    assert convert(*args, "--on-error", "skip", out=out) == 0
    assert [s.video_id for s in read_back(out)] == ["good", "zgood"]
    (skipped,) = manifest(out)["skipped"]
    assert skipped["item"].startswith("bad") and named in skipped["reason"]


def test_failed_conversion_leaves_no_shard_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    _videos(tmp_path / "src", {"a": 1, "b": 1, "c": 1})
    calls = []

    def flaky(clip, *args):
        calls.append(clip.meta.video_id)
        if clip.meta.video_id == "b":
            raise KeyboardInterrupt  # e.g. Ctrl-C while the second shard is being written
        return real(clip, *args)

    real = writer.build_sample
    monkeypatch.setattr(writer, "build_sample", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert("frames", "--root", str(tmp_path / "src"), "--max-videos-per-shard", "1", out=out)
    assert sorted(p.name for p in out.iterdir()) == ["x-000000.tar"]  # complete; no .tmp, no manifest
    assert [
        s.video_id for s in VideoShardDataModule(str(out / "*.tar"), num_workers=0).predict_dataloader()
    ] == ["a"]


def test_existing_output_needs_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _videos(tmp_path / "src", {"a": 1})
    out = tmp_path / "out"
    assert convert("frames", "--root", str(tmp_path / "src"), out=out) == 0
    assert convert("frames", "--root", str(tmp_path / "src"), out=out) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert convert("frames", "--root", str(tmp_path / "src"), "--overwrite", out=out) == 0


def test_video_ids_that_collide_as_tar_keys_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _videos(tmp_path / "src", {"a.b": 1, "a_b": 1})
    assert convert("frames", "--root", str(tmp_path / "src"), out=tmp_path / "out") == 1
    assert "'a.b'" in capsys.readouterr().err
