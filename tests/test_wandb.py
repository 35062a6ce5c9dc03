"""W&B logging: the `configs/logger/wandb.yaml` overlay in offline mode (history, config, media), the
`WandbVideoLogger` with another logger, and runs with W&B not importable."""

from __future__ import annotations

import builtins
import csv
import json
import math
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from shards import CONFIGS, make_video, one_thread, predict_args, video_samples, write_shard  # noqa: F401 (fixture)

from vss_lightning import cli
from vss_lightning.callbacks import WandbVideoLogger
from vss_lightning.data.format import VideoMeta, VideoSample
from vss_lightning.io.summary import VideoFailed, VideoLabels, VideoSkipped
from vss_lightning.metrics import hungarian_iou, video_scores

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")

STAGES = ("encode", "features", "context", "cbr", "modulation", "resize")
SIZE = (64, 96)
VIDEOS = {"a": 2, "b": 3}  # frames; clips of 2 frames, so "b" comes in two clips


def _shards(root: Path) -> tuple[str, dict[str, np.ndarray]]:
    videos = [make_video(vid, n, size=SIZE, seed=i) for i, (vid, n) in enumerate(VIDEOS.items())]
    samples = [s for v in videos for s in video_samples(v, clip_frames=2, labelled=True, num_classes=4)]
    return str(write_shard(root / "shards" / "s.tar", samples)), {v.video_id: v.labels for v in videos}


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's `.wandb` file (LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header: CRC32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4), after the
    7-byte W&B file header. Stops at a chunk not yet completely written."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data, block, pos, buf, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and n == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if len(chunk) < n or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
    return records


def read_offline_run(save_dir: Path, timeout_s: float = 60.0) -> tuple[list[dict], dict]:
    """(history rows, config) of the one offline run under `save_dir/wandb/`.

    W&B's service may still be writing the file when `wandb.finish()` returns: read until the run's
    `exit` record is there.
    """
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history, config = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "config":
            config.update(
                {item.key: json.loads(item.value_json) for item in record.config.update if item.key}
            )
    return history, config


def _last(history: list[dict], key: str):
    return [row[key] for row in history if key in row][-1]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    yield
    import wandb

    wandb.finish()


def _run(args: list[str]) -> None:
    import wandb

    try:
        cli.main(args)
    finally:
        wandb.finish()  # flush the run (a CLI process does this at exit)


@pytest.mark.usefixtures("one_thread", "wandb_offline")
def test_predict_and_test_log_to_an_offline_wandb_run(tmp_path):
    shards, gts = _shards(tmp_path)
    extra = ["--config", str(CONFIGS / "logger" / "wandb.yaml"), "--write_previews", "true",
             "--trainer.callbacks.init_args.log_every_n_videos", "1"]  # fmt: skip
    out = tmp_path / "predict"
    _run(predict_args(shards, out, *extra, "--trainer.logger.init_args.tags", "[smoke]"))
    history, config = read_offline_run(out)  # save_dir "." -> the run beside the labels

    # The resolved config is the run's config.
    assert config["output_dir"] == str(out)
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert config["trainer"]["logger"]["init_args"]["tags"] == ["smoke"]
    assert config["model"]["segmenter"]["init_args"]["context"]["num_clusters"] == 4
    # Progress, rates and stage timings, one row per clip; totals at the end.
    rows = [r for r in history if "predict/frames" in r]
    assert [r["predict/frames"] for r in rows] == [2, 4, 5] and [r["predict/clips"] for r in rows] == [
        1,
        2,
        3,
    ]
    assert [r["predict/videos"] for r in rows] == [1, 1, 2]
    assert all(r["predict/failed"] == 0 and r["predict/frames_per_second"] > 0 for r in rows)
    assert all(r[f"predict/seconds/{s}"] >= 0 for r in rows for s in STAGES)
    assert sum(r["predict/video_seconds"] for r in rows) >= sum(
        r[f"predict/seconds/{s}"] for r in rows for s in STAGES
    )
    assert not any("predict/video_mIoU" in r for r in history)  # no ground truth in predict scores
    assert _last(history, "predict/summary/videos") == 2 and _last(history, "predict/summary/frames") == 5
    # Pictures: images with a prediction mask and an overlay clip per video; the per-video table.
    examples = [r for r in history if "predict/examples/filenames" in r]
    assert [r["predict/examples/captions"] for r in examples] == [
        ["a/a_f0000", "a/a_f0001"],
        ["b/b_f0000", "b/b_f0001"],
    ]
    assert all(
        set(m) == {"prediction", "ground_truth"} for r in examples for m in r["predict/examples/all_masks"]
    )
    files = out / "wandb" / "latest-run" / "files"
    for r in examples:
        for name in r["predict/examples/filenames"]:
            assert Image.open(files / name).size == (SIZE[1], SIZE[0])
    masks = [m[k]["path"] for r in examples for m in r["predict/examples/all_masks"] for k in m]
    assert len(masks) == 8 and all((files / p).is_file() for p in masks)  # 4 images x 2 masks
    assert len(list((files / "media" / "videos").rglob("overlay_videos_*"))) == 2
    (table,) = (files / "media" / "table").rglob("videos_table_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["video_id", "frames", "mIoU", "mVC8", "mVC16", "thumbnail"]
    assert [row[:5] for row in table["data"]] == [["a", 2, None, None, None], ["b", 3, None, None, None]]
    # Without W&B: previews beside the labels.
    assert len(list(out.glob("*/*.preview.png"))) == 5 and len(list(out.glob("*/preview.*"))) == 2

    # test: the evaluation metrics at the end, per-video scores in the table.
    out = tmp_path / "test"
    _run(["test", *predict_args(shards, out, *extra, "--model.num_classes", "4")[1:]])
    history, _ = read_offline_run(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert _last(history, "test/mIoU") == pytest.approx(metrics["mIoU"])
    assert _last(history, "test/videos") == 2 and _last(history, "test/frames") == 5
    (table,) = (out / "wandb" / "latest-run" / "files" / "media" / "table").rglob("videos_table_*.table.json")
    rows = {row[0]: row for row in json.loads(table.read_text())["data"]}
    for vid, gt in gts.items():  # Hungarian-matched mIoU of the video's written labels
        pred = np.stack([np.asarray(Image.open(p)) for p in sorted((out / vid).glob(f"{vid}_f*[0-9].png"))])
        ref = hungarian_iou(torch.from_numpy(pred).long(), torch.from_numpy(gt).long(), 4)["mIoU"]
        assert rows[vid][2] == pytest.approx(float(ref)) and rows[vid][3] is None  # too short for VC8
    assert _last(history, "test/video_mIoU") == pytest.approx(rows["b"][2])


def _block_wandb(monkeypatch) -> list[str]:
    """Make `import wandb` fail (as if not installed); returns the attempted imports."""
    attempts: list[str] = []
    real = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    return attempts


@pytest.mark.usefixtures("one_thread")
def test_predict_works_without_wandb(tmp_path, monkeypatch):
    shards, _ = _shards(tmp_path)
    attempts = _block_wandb(monkeypatch)
    out = tmp_path / "out"
    csv_logger = [
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path),
    ]
    cli.main(predict_args(
        shards, out, "--write_previews", "true", *csv_logger,
        "--trainer.callbacks", "vss_lightning.callbacks.WandbVideoLogger",
    ))  # fmt: skip
    assert attempts == []
    assert len(list(out.glob("*/DONE"))) == 2 and len(list(out.glob("*/*.preview.png"))) == 5
    (metrics,) = (tmp_path / "lightning_logs").rglob("metrics.csv")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["predict/frames"]) for r in rows if r.get("predict/frames")] == [2, 4, 5]
    (hparams,) = (tmp_path / "lightning_logs").rglob("hparams.yaml")  # the config went to the logger too
    assert "output_dir" in hparams.read_text()


def _sample(vid: str, t: int, clip: int = 0, num_clips: int = 1, offset: int = 0, labelled: bool = True):
    names = [f"{vid}_{offset + i}" for i in range(t)]
    meta = VideoMeta(vid, names, [(6, 8)] * t, clip_index=clip, num_clips=num_clips, frame_offset=offset)
    g = torch.Generator().manual_seed(offset + 31 * len(vid))
    target = torch.randint(0, 3, (t, 6, 8), generator=g) if labelled else None
    pred = torch.randint(0, 4, (t, 6, 8), generator=g).to(torch.uint8)
    frames = torch.zeros((t, 3, 6, 8), dtype=torch.uint8)
    stages = {s: 0.01 for s in STAGES}
    return VideoLabels(meta, pred, seconds=0.1, stage_seconds=stages), VideoSample(meta, frames, target)


def test_callback_logs_to_any_logger_and_scores_videos_joined_over_clips(tmp_path, monkeypatch):
    attempts = _block_wandb(monkeypatch)  # metrics only: W&B is never imported without a WandbLogger
    logger = CSVLogger(str(tmp_path))
    module = SimpleNamespace(
        device=torch.device("cpu"), num_classes=3, matching="video", label_mode="cluster"
    )
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], lightning_module=module)
    callback = WandbVideoLogger(log_every_n_videos=2)
    callback.on_test_start(trainer, module)
    first, second = _sample("v", 3, 0, 2, 0), _sample("v", 2, 1, 2, 3)
    for res, batch in (first, second, _sample("w", 2)):
        callback.on_test_batch_end(trainer, module, res, batch, 0)
    callback.on_test_batch_end(trainer, module, VideoFailed("x", "k", "s.tar", "broken"), None, 0)
    callback.on_test_batch_end(trainer, module, VideoSkipped(_sample("y", 1)[0].meta), None, 0)
    callback.on_test_end(trainer, module)
    logger.save()
    assert attempts == []
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test/frames"]) for r in rows] == [3, 5, 7, 7, 7]
    assert [float(r["test/videos"]) for r in rows] == [0, 1, 2, 2, 2]
    assert float(rows[-1]["test/failed"]) == 1 and float(rows[-1]["test/skipped"]) == 1
    assert float(rows[0]["test/seconds/modulation"]) == pytest.approx(0.01)
    pred = torch.cat([first[0].labels, second[0].labels])
    target = torch.cat([first[1].labels, second[1].labels])
    ref = hungarian_iou(pred.long(), target, 3)["mIoU"]
    assert float(rows[1]["test/video_mIoU"]) == pytest.approx(float(ref))  # the clips joined
    assert [r["video_id"] for r in callback.rows] == ["v", "w"] and callback.rows[0]["frames"] == 5
    assert callback.failures[0]["video_id"] == "x"


def test_video_scores_edge_cases():
    target = torch.full((3, 4, 4), 255)
    pred = torch.zeros((3, 4, 4), dtype=torch.long)
    assert video_scores(pred, target, 2) == {"mIoU": None, "mVC8": None, "mVC16": None}  # nothing labelled
    target[:] = 1
    scores = video_scores(pred, target, 2, matching="none")
    assert scores["mIoU"] == 0.0 and scores["mVC8"] is None
    target = torch.zeros((9, 2, 2), dtype=torch.long)
    scores = video_scores(torch.zeros_like(target), target, None)
    assert scores["mIoU"] is None and scores["mVC8"] == 1.0 and not math.isnan(scores["mVC8"])
    with pytest.raises(ValueError, match="Expected `max_logged_videos` to be an int >= 0"):
        WandbVideoLogger(max_logged_videos=-1)
