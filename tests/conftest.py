"""Shared fixtures: the tiny backbone, real data paths (skipped with a reason when absent); the
background jobs of the collected tests start when collection ends (`background.py`)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Tests never read or fill the user's CLI help cache (test_cli_errors tests the cache in its own folder).
os.environ["VSS_LIGHTNING_CACHE"] = "off"

# The project's shared data folder (beside the checkout); VSS_SHARED_DATA points elsewhere (e.g. a GPU box).
SHARED_DATA = Path(
    os.environ.get("VSS_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
SWAN = SHARED_DATA / "swan"
CAMVID = SHARED_DATA / "camvid" / "0006R0"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the fresh-interpreter jobs the selected tests declare, so that they run beside the tests."""
    import background

    if background.enabled() and not session.config.option.collectonly:
        background.start(background.jobs_of(session.items))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import background

    background.stop_all()


@pytest.fixture(autouse=True)
def _log_handlers_on_the_current_stderr():
    """Point stream handlers made under an earlier test's (now closed) output capture at this test's
    stderr. Lightning adds a `StreamHandler` at import, bound to whatever `sys.stderr` was then; in
    one pytest process that is a capture file closed after the test that imported it."""
    import logging
    import sys

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr
    yield


def _load_frames(paths: list[Path]) -> torch.Tensor:
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)


@pytest.fixture(scope="session")
def swan_frames() -> torch.Tensor:
    """The 14-frame DAVIS swan clip, (14, 3, 480, 854) uint8."""
    if not SWAN.is_dir():
        pytest.skip(f"real data not present: {SWAN} (the shared data folder is only on project machines)")
    return _load_frames(sorted(SWAN.glob("*.jpg")))


@pytest.fixture(scope="session")
def camvid_clip() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 30 frames of CamVid 0006R0 and their labels (void 11 -> 255)."""
    if not CAMVID.is_dir():
        pytest.skip(f"real data not present: {CAMVID} (the shared data folder is only on project machines)")
    images = sorted((CAMVID / "images").glob("*.png"))[:30]
    labels = np.stack([np.asarray(Image.open(CAMVID / "labels" / p.name)) for p in images]).astype(np.int64)
    labels[labels == 11] = 255
    return _load_frames(images), torch.from_numpy(labels)


@pytest.fixture(scope="session")
def tiny_backbone():
    from vss_lightning.pipeline.random_backbones import TinyStableDiffusion

    return TinyStableDiffusion(seed=0).load("cpu")


@pytest.fixture(scope="session")
def local_labels(tmp_path_factory) -> SimpleNamespace:
    """One labelled synthetic corpus ("a": 5 frames stored in two clips, "b": 3 and "c": 4 in one clip
    each, two shards) and its labels from the smoke config, once as png folders and once as label
    shards: what the vocabulary and evaluate end-to-end tests fit, apply, compare and score."""
    from shards import CLIP_FRAMES, make_shards, one_torch_thread, predict_args

    from vss_lightning.cli import main as cli_main

    root = tmp_path_factory.mktemp("local_labels")
    videos = make_shards(root / "shards", [[("a", 5), ("b", 3)], [("c", 4)]], clip_frames=CLIP_FRAMES,
                         labelled=True)  # fmt: skip
    shards, png, tars = str(root / "shards" / "*.tar"), root / "png", root / "tars"
    with one_torch_thread():
        cli_main(predict_args(shards, png))
        cli_main(predict_args(shards, tars, "--output_format", "shards"))
    return SimpleNamespace(videos=videos, shards=shards, png=png, tars=tars)
