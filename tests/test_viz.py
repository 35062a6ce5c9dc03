"""Palettes, overlays and overlay videos (`vss_lightning.viz`), and the writer's `write_previews`."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vss_lightning import viz
from vss_lightning.data.format import VideoMeta, VideoSample
from vss_lightning.io.summary import VideoLabels
from vss_lightning.io.writer import PseudoLabelWriter

needs_mp4 = pytest.mark.skipif(viz.video_format() != "mp4", reason="PyAV without an H.264/MPEG-4 encoder")


def _decode_mp4(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# -- palettes ---------------------------------------------------------------------------------------
def test_distinct_palette_is_fixed_distinct_and_prefix_stable():
    full = viz.distinct_palette(256)
    assert full.shape == (256, 3) and full.dtype == np.uint8
    assert len({tuple(c) for c in full.tolist()}) == 256  # distinct ids, distinct colours
    assert not ({(0, 0, 0), (255, 255, 255)} & {tuple(c) for c in full.tolist()})
    np.testing.assert_array_equal(viz.distinct_palette(10), full[:10])  # colour i does not depend on n
    lab = viz._srgb_to_lab(full[:20])
    dist = np.sqrt(((lab[:, None] - lab[None]) ** 2).sum(-1)) + np.eye(20) * 1e9
    assert dist.min() > 20  # the first colours (cluster ids 0..19) are far apart in CIELAB
    with pytest.raises(ValueError, match="Expected `n` to be an int in"):
        viz.distinct_palette(257)


def test_dataset_palettes():
    cs = viz.palette_for("cityscapes", 19, "first_frame_gt")
    assert cs[0].tolist() == [128, 64, 128] and cs[18].tolist() == [119, 11, 32]  # road, bicycle
    assert cs[255].tolist() == [0, 0, 0]  # ignore
    cv = viz.palette_for("camvid", 11, "gt")
    assert cv[0].tolist() == [128, 128, 128] and cv[3].tolist() == [128, 64, 128]  # sky, road
    vspw = viz.palette_for("vspw", 124, "first_frame_gt")
    np.testing.assert_array_equal(vspw[:124], viz.distinct_palette(124))
    assert len({tuple(c) for c in vspw[:124].tolist()}) == 124
    # Cluster ids are not classes: the dataset's colours are not used; unknown datasets neither.
    np.testing.assert_array_equal(viz.palette_for("cityscapes", 19, "cluster"), viz.distinct_palette(256))
    assert viz.dataset_palette("camvid", 31) is None and viz.dataset_palette("", None) is None


def test_same_id_same_colour_across_videos():
    rng = np.random.default_rng(0)
    a = rng.permutation(np.arange(3 * 8 * 9) % 40).reshape(3, 8, 9)  # ids 0..39, each present
    b = rng.permutation(np.arange(2 * 5 * 8) % 40 + 20).reshape(2, 5, 8)  # ids 20..59
    ca, cb = viz.colorize(a), viz.colorize(b)
    assert ca.shape == (3, 8, 9, 3) and ca.dtype == np.uint8
    for i in range(20, 40):  # ids present in both videos
        cols_a = {tuple(c) for c in ca[a == i].tolist()}
        cols_b = {tuple(c) for c in cb[b == i].tolist()}
        assert cols_a == cols_b and len(cols_a) == 1
    colours = {i: tuple(ca[a == i][0].tolist()) for i in np.unique(a).tolist()}
    assert len(set(colours.values())) == len(colours)
    with pytest.raises(ValueError, match="Expected non-negative label ids"):
        viz.colorize(np.array([[-1]]))


def test_overlay_blends_and_keeps_ignored_pixels():
    frame = np.full((4, 6, 3), 200, np.uint8)
    labels = np.zeros((4, 6), np.int64)
    labels[:, 3:] = 255
    np.testing.assert_array_equal(viz.overlay(frame, labels, alpha=0.0), frame)
    full = viz.overlay(frame, labels, alpha=1.0)
    np.testing.assert_array_equal(full[:, :3], viz.colorize(labels[:, :3]))
    half = viz.overlay(frame, labels, alpha=0.5, ignore_index=255)
    np.testing.assert_array_equal(half[:, 3:], frame[:, 3:])
    expected = np.round(0.5 * 200 + 0.5 * viz.distinct_palette(1)[0].astype(np.float32))
    np.testing.assert_array_equal(half[0, 0], expected.astype(np.uint8))
    with pytest.raises(ValueError, match="Expected `frame` to be"):
        viz.overlay(frame, labels[:2])


def test_resize_max_keeps_label_ids():
    labels = np.arange(12 * 20).reshape(12, 20).astype(np.int32) % 300
    small = viz.resize_max(labels, 10, nearest=True)
    assert small.shape == (6, 10) and set(np.unique(small)) <= set(np.unique(labels))
    assert viz.resize_max(labels, 50) is labels  # never enlarges


# -- videos ---------------------------------------------------------------------------------------
def _frames(t: int, h: int = 17, w: int = 23) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@needs_mp4
def test_mp4_written_through_a_temporary_name(tmp_path):
    writer = viz.VideoWriter(tmp_path / "v.mp4", fps=5)
    writer.write(_frames(3))
    assert not (tmp_path / "v.mp4").exists()  # not final until closed
    writer.write(_frames(2))
    assert writer.close() == tmp_path / "v.mp4"
    frames = _decode_mp4(tmp_path / "v.mp4")
    assert len(frames) == 5 and frames[0].shape == (18, 24, 3)  # padded to even sizes (yuv420p)
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_gif_and_abort(tmp_path):
    assert viz.write_video(tmp_path / "v.gif", _frames(4), fps=10) == tmp_path / "v.gif"
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 4 and gif.size == (23, 17)
    writer = viz.VideoWriter(tmp_path / "w.gif")
    writer.write(_frames(2))
    writer.abort()
    assert viz.write_video(tmp_path / "empty.gif", []) is None
    assert sorted(os.listdir(tmp_path)) == ["v.gif"]
    with pytest.raises(ValueError, match="Expected every frame"):
        viz.write_video(tmp_path / "x.gif", [_frames(1)[0], _frames(1, 5, 5)[0]])
    with pytest.raises(ValueError, match="Expected `path` to end in .mp4 or .gif"):
        viz.VideoWriter(tmp_path / "x.avi")
    assert sorted(os.listdir(tmp_path)) == ["v.gif"]


# -- the writer's previews --------------------------------------------------------------------------
class _Strategy:
    def broadcast(self, obj, src=0):
        return obj


def _writer(out: Path, label_mode: str = "cluster") -> PseudoLabelWriter:
    trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, strategy=_Strategy())
    module = SimpleNamespace(
        output_info=lambda: {"settings_hash": "h", "label_mode": label_mode},
        predict_step=lambda batch, i: batch,
    )
    writer = PseudoLabelWriter(str(out), write_previews=True, summary_timeout_s=0.0)
    writer.setup(trainer, module, "predict")
    writer.on_predict_start(None, None)
    return writer


def _clip(
    vid: str, t: int, clip: int = 0, num_clips: int = 1, offset: int = 0, size=(10, 14), high=6, **meta
):
    names = [f"{vid}_{offset + i:04d}" for i in range(t)]
    m = VideoMeta(vid, names, [size] * t, clip_index=clip, num_clips=num_clips, frame_offset=offset, **meta)
    g = torch.Generator().manual_seed(offset + 7 * len(vid))
    labels = torch.randint(0, high, (t, *size), generator=g)
    frames = torch.zeros((t, 3, *size), dtype=torch.uint8)  # black frames: overlay = alpha * colour
    return VideoLabels(m, labels), VideoSample(m, frames, None)


def test_previews_one_overlay_per_frame_and_one_video_per_video(tmp_path):
    writer = _writer(tmp_path)
    res, sample = _clip("one", 3)
    writer.handle(res, sample)
    parts = [_clip("split", 4, 0, 2, 0), _clip("split", 2, 1, 2, 4)]
    writer.handle(*parts[0])
    assert not list((tmp_path / "split").glob("preview.*"))  # the video is final at its last clip only
    writer.handle(*parts[1])
    for vid, t in (("one", 3), ("split", 6)):
        previews = sorted((tmp_path / vid).glob("*.preview.png"))
        assert len(previews) == t
        for p in previews:
            img = Image.open(p)
            assert img.mode == "RGB" and img.size == (14, 10)
        videos = list((tmp_path / vid).glob("preview.*"))
        assert [v.suffix for v in videos] == [f".{viz.video_format()}"]
        if videos[0].suffix == ".mp4":
            frames = _decode_mp4(videos[0])
            assert len(frames) == t and frames[0].shape == (10, 14, 3)
        else:
            assert Image.open(videos[0]).n_frames == t
        assert not [p for p in (tmp_path / vid).iterdir() if p.name.startswith(".")]  # no temporary files
        assert (tmp_path / vid / "DONE").exists()
    # The overlay of a black frame is alpha * colour: the same id has the same colour in both videos.
    expected = np.round(0.5 * viz.distinct_palette(6).astype(np.float32)).astype(np.uint8)
    for clip in (res, parts[0][0]):
        name = clip.meta.frame_names[0]
        img = np.asarray(Image.open(tmp_path / clip.meta.video_id / f"{name}.preview.png"))
        np.testing.assert_array_equal(img, expected[clip.labels[0].numpy()])


def test_previews_use_the_dataset_palette_for_class_ids(tmp_path):
    writer = _writer(tmp_path, label_mode="first_frame_gt")
    res, sample = _clip("cs", 1, high=19, source="cityscapes", num_classes=19)
    writer.handle(res, sample)
    img = np.asarray(Image.open(tmp_path / "cs" / "cs_0000.preview.png"))
    colours = np.round(0.5 * viz.CITYSCAPES_PALETTE.astype(np.float32)).astype(np.uint8)
    np.testing.assert_array_equal(img, colours[res.labels[0].numpy()])


def test_previews_without_frames_are_palette_pngs_and_clips_out_of_order_restart(tmp_path, caplog):
    writer = _writer(tmp_path)
    res, _ = _clip("nof", 2, 1, 2, 2)  # clip 1 without clip 0 on this rank, no frames at hand
    writer.handle(res)
    img = Image.open(tmp_path / "nof" / "nof_0002.preview.png")
    assert img.mode == "P" and img.size == (14, 10)
    assert "its overlay video starts at this clip" in caplog.text
    assert len(list((tmp_path / "nof").glob("preview.*"))) == 1
    # A video whose last clip never comes leaves no video and no temporary file behind.
    writer.handle(*_clip("cut", 2, 0, 2, 0))
    writer.on_stage_end(SimpleNamespace(), SimpleNamespace(logger=None), "predict")
    left = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert left == [
        "clip-0000.done",
        "cut_0000.png",
        "cut_0000.preview.png",
        "cut_0001.png",
        "cut_0001.preview.png",
    ]
