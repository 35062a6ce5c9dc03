"""Tiny WebDataset shards for tests, written in `tmp_path` with `webdataset.TarWriter`.

Frames are small synthetic videos (a smooth background with coloured rectangles moving over it) so
the tiny backbone runs fast; optional labels mark the rectangles. Helpers also make broken inputs
(corrupt JPEG, truncated tar, a sample without frames).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vss_lightning.data.format import VideoMeta, encode_png, encode_sample, sample_key

# (H, W): the tiny backbone's feature grid is 4 x 8; small frames keep the end-to-end tests quick.
SIZE = (64, 128)


@dataclass
class Video:
    """A synthetic video: `frames` (T, H, W, 3) uint8 and `labels` (T, H, W) uint8 (255 = unlabelled)."""

    video_id: str
    frames: np.ndarray
    labels: np.ndarray
    names: list[str] = field(default_factory=list)


def make_video(video_id: str, num_frames: int, size: tuple[int, int] = SIZE, seed: int = 0) -> Video:
    """Rectangles of 3 classes moving over a gradient, with their label maps."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 96)], -1).astype(np.float32)
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    labels = np.zeros((num_frames, h, w), np.uint8)
    boxes = [
        (rng.integers(0, h // 2), rng.integers(0, w // 2), rng.integers(1, 3), rng.integers(1, 4))
        for _ in range(3)
    ]
    colours = rng.integers(0, 256, size=(3, 3))
    for t in range(num_frames):
        img = base + rng.normal(0, 4, base.shape)
        for c, (y0, x0, dy, dx) in enumerate(boxes):
            y, x = (y0 + dy * t) % (h // 2), (x0 + dx * t) % (w // 2)
            img[y : y + h // 3, x : x + w // 3] = colours[c]
            labels[t, y : y + h // 3, x : x + w // 3] = c + 1
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    names = [f"{video_id}_f{t:04d}" for t in range(num_frames)]
    return Video(video_id, frames, labels, names)


def jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def video_samples(
    video: Video, clip_frames: int = 0, labelled: bool = False, num_classes: int | None = None
) -> list[dict]:
    """The shard samples (one per clip) of a video, built with `format.encode_sample`."""
    t = len(video.frames)
    step = clip_frames if clip_frames > 0 else t
    starts = list(range(0, t, step))
    out = []
    for k, start in enumerate(starts):
        idx = list(range(start, min(start + step, t)))
        meta = VideoMeta(
            video_id=video.video_id,
            frame_names=[video.names[i] for i in idx],
            sizes=[tuple(video.frames.shape[1:3])] * len(idx),
            labelled=list(range(len(idx))) if labelled else [],
            label_set=[1, 2, 3] if labelled else [],
            source="test",
            clip_index=k,
            num_clips=len(starts),
            frame_offset=start,
            num_classes=num_classes,
        )
        frames = [(jpeg(video.frames[i]), "jpg") for i in idx]
        labels = {j: encode_png(video.labels[i]) for j, i in enumerate(idx)} if labelled else None
        out.append(encode_sample(meta, frames, labels))
    return out


def write_shard(path: Path, samples: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            tar.write(s)
    return path


def make_shards(
    folder: Path,
    layout: list[list[tuple[str, int]]],
    clip_frames: int = 0,
    labelled: bool = False,
    prefix: str = "test",
) -> dict[str, Video]:
    """Write one shard per entry of `layout` (a list of (video id, frames) per shard).

    Returns:
        The videos by id.
    """
    videos = {}
    for s, entries in enumerate(layout):
        samples = []
        for vid, n in entries:
            videos[vid] = make_video(vid, n, seed=len(videos))
            samples += video_samples(videos[vid], clip_frames, labelled, num_classes=4 if labelled else None)
        write_shard(folder / f"{prefix}-{s:06d}.tar", samples)
    return videos


def corrupt_jpeg_sample(video_id: str, num_frames: int = 4) -> dict:
    """A sample whose second frame is not a decodable JPEG."""
    sample = video_samples(make_video(video_id, num_frames, seed=99))[0]
    sample["00001.jpg"] = sample["00001.jpg"][:40] + b"\x00garbage" * 20
    return sample


def empty_sample(video_id: str) -> dict:
    """A sample with metadata but no frames."""
    meta = VideoMeta(video_id=video_id, frame_names=[], sizes=[])
    return {"__key__": sample_key(video_id), "meta.json": meta.to_json()}


def truncate(path: Path, keep_fraction: float = 0.6) -> None:
    """Cut a tar file in the middle of a member."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction) // 512 * 512 + 100])


def label_files(out: Path) -> dict[str, bytes]:
    """All label PNGs under a png output folder, by relative path (previews excluded)."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.glob("*/*.png"))
        if not p.name.endswith(".preview.png")
    }


def done_records(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/DONE"))}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (much faster for tiny models on a busy machine,
    where OpenMP threads of several processes thrash); the previous count is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=False)
def one_thread():
    """`one_torch_thread` for a whole test."""
    with one_torch_thread():
        yield


def _forked_cli(args: list[str], log: str, new_session: bool) -> None:
    """The child of `forked_cli`: one torch thread, output to `log`, `cli.main(args)` (its SystemExit
    code becomes the exit code)."""
    if new_session:
        os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 (the child's life)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):  # made under the parent's output capture
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # not setStream: it flushes the old one, maybe closed
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(240, file=sys.stderr)  # a hung child says where, in its log
    from vss_lightning import cli

    cli.main(args)


def forked_cli(args: list[str], log: Path, new_session: bool = False) -> multiprocessing.process.BaseProcess:
    """Run `vss_lightning.cli.main(args)` in a forked child of this test process and return it (started).

    For tests that kill or race whole jobs: the child starts with everything already imported, so it
    skips the ~10-15 s a fresh interpreter spends importing torch, Lightning and diffusers on a 2-core
    machine (the scripts' own start is tested by the DDP tests, which run `vss-lightning`).
    `proc.kill()` is SIGKILL, `proc.terminate()` SIGTERM; `proc.exitcode` is the CLI's exit status.
    The child's output goes to `log`; with `new_session` it leads a process group of its own, so
    `os.killpg(proc.pid, ...)` reaches the processes it starts (DDP ranks, DataLoader workers).
    """
    target, call = _forked_cli, (list(args), str(log), new_session)
    proc = multiprocessing.get_context("fork").Process(target=target, args=call)
    proc.start()
    return proc


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: offline, one thread per process, W&B off."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::DeprecationWarning")  # fmt: skip
    env.update(extra)
    return env


# Uneven shards shared by the CLI and distributed tests: 3 videos (one in two clips), 1, 2 (one in
# two clips), 1; 23 frames in all.
UNEVEN = [[("u0", 3), ("u1", 2), ("u2", 6)], [("u3", 2)], [("u4", 3), ("u5", 5)], [("u6", 2)]]
CLIP_FRAMES = 4
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def predict_args(shards: str, out: Path, *extra: str) -> list[str]:
    """`predict` arguments of the smoke config (CPU, tiny backbone) without a progress bar."""
    return [
        "predict", "--config", str(CONFIGS / "smoke.yaml"), "--data.shards", shards, "--output_dir", str(out),
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


def uneven_pattern(folder: Path) -> str:
    """The brace pattern of the uneven shards in `folder`."""
    return str(folder / f"test-{{000000..{len(UNEVEN) - 1:06d}}}.tar")


def write_uneven_shards(folder: Path) -> str:
    """Write the uneven shards (`UNEVEN`, clips of `CLIP_FRAMES`) in `folder`; returns their pattern."""
    make_shards(folder, UNEVEN, clip_frames=CLIP_FRAMES)
    return uneven_pattern(folder)


def reference_run(basetemp: Path) -> tuple[dict[str, Video], str, Path]:
    """The uneven shards and their labels from one uninterrupted job (`cli.main` in this process, one
    torch thread).

    Made once per test session (cached under pytest's base temp folder) and shared by the CLI and
    distributed tests, which compare their outputs with it byte for byte.
    """
    root = basetemp / "uneven"
    shards, out = root / "shards", root / "single"
    pattern = write_uneven_shards(shards) if not shards.exists() else uneven_pattern(shards)
    flat = [video for shard in UNEVEN for video in shard]
    videos = {vid: make_video(vid, n, seed=i) for i, (vid, n) in enumerate(flat)}  # as make_shards made them
    if not (out / "summary.json").exists():
        from vss_lightning import cli

        with one_torch_thread():
            cli.main(predict_args(pattern, out))
    return videos, pattern, out
