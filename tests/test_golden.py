"""Golden label hashes: the smoke configs (SD and SVD) on real frames (swan, CamVid) through the CLI.

Each case writes one shard holding a short clip of real frames (downscaled so the case takes seconds),
runs `vss-lightning predict` in-process with the committed smoke config, and hashes every label PNG it
wrote. The hashes are pinned: a change that alters labels (a refactor that should not, or a method
change that should) fails here, so label changes are always deliberate. When a change is meant to
alter labels, rerun with `VSS_PRINT_GOLDEN=1 python -m pytest tests/test_golden.py -s`, paste the
printed hashes below and say why in the commit message.

The hashes were recorded on x86-64 (the CI machine kind) with CPU torch 2.13.0: the tiny random
backbones compute in float32, and the random-weight SVD amplifies rounding differences (a different
CPU's GEMM kernels can move a near-tie), so on another CPU architecture this test may need its own
recording; it never depends on run order, threads or time (the noise is seeded per video and batch).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CAMVID, SWAN
from PIL import Image
from shards import CONFIGS, Video, label_files, one_thread, video_samples, write_shard  # noqa: F401

from vss_lightning.cli import main

# (config, clip) -> sha256 of the sorted (relative path, PNG bytes) of every label written.
GOLDEN = {
    ("smoke.yaml", "swan"): "6c495b2a8211a2533e67d3e0b9374aa04b6bd481ca47103652d76e448db55a74",
    ("smoke.yaml", "camvid"): "dc2710cba7d54b80d271a3d5364cd7f72b714aad54ffe843d6ac39fd6676cdf4",
    ("smoke_svd.yaml", "swan"): "fa22783db4c3f19206d09245e2ae531ea6d2cdf9a15ebcaddc3c63d942bc5b23",
    ("smoke_svd.yaml", "camvid"): "1f4c7f959da0e9f3b3ee08ca9b5caccdf872d89bdefb364987ff04f82c5fab64",
}
# Batch size 4 in the smoke configs: 5 frames make two batches, the second overlapping the first
# (SD); the tiny SVD costs ~1.5 s per UNet call of its 8 blended modulation steps on 2 cores whatever
# the frame size, so its cases are one batch.
NUM_FRAMES = {"smoke.yaml": 5, "smoke_svd.yaml": 4}
# (H, W) of the shard's frames (the pipeline resizes them down to multiples of 64).
SIZES = {
    ("smoke.yaml", "swan"): (144, 256),
    ("smoke.yaml", "camvid"): (180, 240),
    ("smoke_svd.yaml", "swan"): (72, 128),
    ("smoke_svd.yaml", "camvid"): (96, 128),
}


def _clip(name: str, size: tuple[int, int], num_frames: int) -> Video:
    folder, pattern = (SWAN, "*.jpg") if name == "swan" else (CAMVID / "images", "*.png")
    if not folder.is_dir():
        pytest.skip(f"real data not present: {folder} (the shared data folder is only on project machines)")
    paths = sorted(folder.glob(pattern))[:num_frames]
    h, w = size
    frames = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)) for p in paths]
    )
    return Video(name, frames, np.zeros(frames.shape[:3], np.uint8), [p.stem for p in paths])


def _hash(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel, data in sorted(files.items()):
        digest.update(rel.encode() + b"\x00" + hashlib.sha256(data).digest())
    return digest.hexdigest()


# The default suite checks SVD on one clip (each SVD case costs ~10 s of its ~5 min); `-m slow` adds
# the other.
CASES = [
    pytest.param(*case, marks=pytest.mark.slow) if case == ("smoke_svd.yaml", "camvid") else case
    for case in sorted(GOLDEN)
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("config", "clip"), CASES)
def test_labels_match_the_golden_hashes(config: str, clip: str, tmp_path: Path) -> None:
    video = _clip(clip, SIZES[(config, clip)], NUM_FRAMES[config])
    shard = write_shard(tmp_path / "shards" / "golden-000000.tar", video_samples(video))
    out = tmp_path / "out"
    main([
        "predict", "--config", str(CONFIGS / config), "--data.shards", str(shard), "--output_dir", str(out),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    files = label_files(out)
    assert len(files) == NUM_FRAMES[config], sorted(files)
    got = _hash(files)
    if os.environ.get("VSS_PRINT_GOLDEN"):
        print(f"\n    ({config!r}, {clip!r}): {got!r},")
    assert got == GOLDEN[(config, clip)], (
        f"The labels of {config} on {clip} changed (hash {got}). If the change is deliberate, record the "
        "new hashes as this module's docstring says; if not, the change altered labels by mistake."
    )
