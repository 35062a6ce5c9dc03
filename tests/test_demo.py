"""The README's main command: the offline smoke mode, the real-backbone mode without the hub, any order."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
from PIL import Image

from vss_lightning.demo import main, render_clip


def _pngs(folder: Path) -> list[Path]:
    """The label PNGs (or frames) of a video folder, previews left out."""
    return sorted(p for p in folder.glob("*.png") if not p.name.endswith(".preview.png"))


def _total(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["total"]


def test_render_clip_makes_a_moving_scene(tmp_path):
    folder = render_clip(tmp_path, frames=3, size=(64, 96))
    frames = sorted((folder / "demo_clip").glob("*.png"))
    assert len(frames) == 3
    a, b = (np.asarray(Image.open(p)) for p in frames[:2])
    assert a.shape == (64, 96, 3) and not np.array_equal(a, b)


def test_render_clip_replaces_only_its_own_earlier_frames(tmp_path):
    render_clip(tmp_path, frames=5, size=(64, 96))
    video = tmp_path / "demo_clip"
    (video / "notes.txt").write_text("not the demo's")
    (video / "0001.png").write_bytes(b"not the demo's either")
    render_clip(tmp_path, frames=3, size=(32, 64))
    frames = [p for p in _pngs(video) if p.name != "0001.png"]
    assert [p.name for p in frames] == ["00000.png", "00001.png", "00002.png"]
    assert all(Image.open(p).size == (64, 32) for p in frames)
    assert (video / "notes.txt").read_text() == "not the demo's" and (video / "0001.png").exists()


def test_demo_main_then_smoke_then_smoke_again(tmp_path, monkeypatch, capsys):
    """Issue 20: `--smoke` after the main mode found the main mode's larger frames in its work folder."""
    monkeypatch.chdir(tmp_path)
    # The hub unreachable and its cache empty, so the main mode cannot find SD 2.1 even where it is cached.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    outputs = tmp_path / "outputs"

    # The main mode renders and converts its clip, then stops at the backbone: error and fix, no traceback.
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error, fix = err.strip().splitlines()[-2:]
    assert error.startswith("error: Expected to download `model_id` 'stabilityai/stable-diffusion-2-1-base'")
    assert fix.startswith("Fix: ") and fix.endswith("From the demo: `python -m vss_lightning.demo --smoke`.")
    main_frames = _pngs(outputs / "demo_work" / "frames" / "demo_clip")
    assert len(main_frames) == 16 and Image.open(main_frames[-1]).size == (512, 320)
    assert (outputs / "demo_work" / "shards" / "manifest.json").is_file()
    assert not (outputs / "demo" / "demo_clip").exists()

    # `--smoke` in that very work folder (the bug) replaces the frames and shards and labels its clip.
    assert main(["--smoke", "--work_dir", "outputs/demo_work"]) == 0
    out, finished = outputs / "demo_smoke", "labels, previews and summary.json are in outputs/demo_smoke/"
    assert capsys.readouterr().out.strip().endswith(finished)
    frames = _pngs(outputs / "demo_work" / "frames" / "demo_clip")
    assert len(frames) == 8 and all(Image.open(p).size == (320, 192) for p in frames)
    labels = _pngs(out / "demo_clip")
    assert [p.stem for p in labels] == [f"{i:05d}" for i in range(8)]
    assert all(Image.open(p).size == (320, 192) for p in labels)
    assert json.loads((out / "demo_clip" / "DONE").read_text())["frames"] == 8
    assert {k: _total(out)[k] for k in ("videos", "frames", "skipped_videos", "failed")} == {
        "videos": 1,
        "frames": 8,
        "skipped_videos": 0,
        "failed": 0,
    }
    written = {p.name: p.read_bytes() for p in labels}

    # `--smoke` with its own folders (twice in a row with the run above): the clip is labelled already,
    # the run says it skips it.
    assert main(["--smoke"]) == 0
    stdout = capsys.readouterr().out
    assert "1 video(s) already labelled in outputs/demo_smoke/ with these settings were skipped" in stdout
    assert stdout.strip().endswith(finished)
    total = _total(out)
    assert (total["videos"], total["skipped_videos"], total["failed"]) == (0, 1, 0)
    assert {p.name: p.read_bytes() for p in _pngs(out / "demo_clip")} == written
    assert len(_pngs(outputs / "demo_smoke_work" / "frames" / "demo_clip")) == 8
    assert sorted(p.name for p in outputs.iterdir()) == ["demo", "demo_smoke", "demo_smoke_work", "demo_work"]


def test_demo_names_a_missing_video(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--smoke", "--video", "missing.mp4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Expected `--video` to be a video file")
    assert "'missing.mp4', which does not exist" in err and "leave `--video` out" in err
    assert not (tmp_path / "outputs").exists()


def test_demo_names_an_unreadable_video(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    assert main(["--smoke", "--video", "broken.mp4"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error, fix = err.strip().splitlines()
    assert error.startswith("error: Expected broken.mp4 to be a readable video file")
    assert fix.startswith("The demo cannot read `--video` broken.mp4: re-encode it")
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["demo_video_smoke_work"]
