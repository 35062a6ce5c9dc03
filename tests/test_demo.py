"""The README's main command, in its offline smoke mode (the real-backbone mode needs the hub)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from vss_lightning.demo import main, render_clip


def test_render_clip_makes_a_moving_scene(tmp_path):
    folder = render_clip(tmp_path, frames=3, size=(64, 96))
    frames = sorted((folder / "demo_clip").glob("*.png"))
    assert len(frames) == 3
    a, b = (np.asarray(Image.open(p)) for p in frames[:2])
    assert a.shape == (64, 96, 3) and not np.array_equal(a, b)


def test_demo_smoke_labels_the_clip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main(["--smoke", "--work_dir", str(tmp_path / "work"), "--output_dir", str(out)]) == 0
    labels = sorted(p for p in (out / "demo_clip").glob("*.png") if not p.name.endswith(".preview.png"))
    assert [p.stem for p in labels] == [f"{i:05d}" for i in range(8)]
    assert all(Image.open(p).size == (320, 192) for p in labels)
    done = json.loads((out / "demo_clip" / "DONE").read_text())
    assert done["frames"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["videos"] == 1 and summary["total"]["failed"] == 0
