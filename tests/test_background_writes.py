"""Background writes (`io.background`): bounded, in order, exactly once, and the same bytes as synchronous."""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from shards import done_records, label_files, make_shards, one_thread, predict_args  # noqa: F401

from vss_lightning import cli
from vss_lightning.data.format import VideoMeta
from vss_lightning.io import png_store
from vss_lightning.io.background import BackgroundWrites, Pending, run_now
from vss_lightning.io.summary import VideoLabels
from vss_lightning.io.writer import PseudoLabelWriter

# Two shards: "a" whole, "b" in two clips of 4 + 1 frames, "c" whole.
LAYOUT = [[("a", 3), ("b", 5)], [("c", 2)]]
CLIP_FRAMES = 4


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vss-write")]


def _predict(tmp_path: Path, name: str, *extra: str) -> Path:
    """A smoke `predict` of the LAYOUT shards into `tmp_path/name`; returns the output folder."""
    shards = tmp_path / "shards"
    if not shards.exists():
        make_shards(shards, LAYOUT, clip_frames=CLIP_FRAMES)
    out = tmp_path / name
    cli.main(predict_args(str(shards / "test-{000000..000001}.tar"), out, *extra))
    return out


def _files(out: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob(pattern))}


# -- the pool ----------------------------------------------------------------------------------------
def test_the_pool_never_holds_more_than_its_capacity():
    pool = BackgroundWrites(workers=2, capacity=2)
    go, seen = threading.Event(), []

    def task(i: int) -> int:
        seen.append(pool.pending)
        go.wait()
        return i

    first = [pool.submit(task, i) for i in range(2)]  # the pool is full
    third: list = []
    blocked = threading.Thread(target=lambda: third.append(pool.submit(task, 2)))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and third == [] and pool.pending == 2  # submit waits for room
    go.set()
    blocked.join()
    assert [f.result() for f in [*first, *third]] == [0, 1, 2]
    # Many tasks: the bound holds throughout (a task heavier than the pool waits to run alone).
    futures = [pool.submit(task, i, weight=1 + i % 3) for i in range(40)]
    assert [f.result() for f in futures] == list(range(40))
    assert max(seen) <= 2 and pool.most_pending == 2 and pool.pending == 0
    pool.close()
    assert not _writer_threads()


def test_without_workers_tasks_run_at_once_and_errors_wait_in_the_future():
    pool = BackgroundWrites(workers=0)
    order = []
    ok = pool.submit(order.append, 1)
    assert ok.done() and order == [1] and not _writer_threads()

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    bad = pool.submit(full_disk)
    assert isinstance(bad.exception(), OSError)
    then, errors = [], []
    with pytest.raises(OSError, match="No space"):
        Pending([ok, bad], then.append, on_error=lambda: errors.append("cleaned")).finish()
    assert then == [] and errors == ["cleaned"]  # `then` (the DONE) never runs after a failed file
    Pending([ok, run_now(int)], then.append).finish()
    assert then == [[None, 0]]
    with pytest.raises(ValueError, match="Expected `workers` >= 0"):
        BackgroundWrites(workers=-1)
    with pytest.raises(ValueError, match="Expected `write_workers` to be at least 0"):
        PseudoLabelWriter("out", write_workers=-1)


# -- the CLI: same bytes, failures, order --------------------------------------------------------------
def test_labels_are_the_same_bytes_with_and_without_workers(tmp_path, one_thread):  # noqa: F811
    sync = _predict(tmp_path, "sync", "--writer.write_workers", "0", "--write_previews", "true")
    pooled = _predict(
        tmp_path, "pooled", "--writer.write_workers", "3", "--writer.max_pending_writes", "2",
        "--write_previews", "true",
    )  # fmt: skip
    labels = label_files(sync)
    assert len(labels) == 10 and label_files(pooled) == labels
    assert done_records(pooled) == done_records(sync) and sorted(done_records(sync)) == ["a", "b", "c"]
    previews = _files(sync, "*/*.preview.png")
    assert len(previews) == 10 and _files(pooled, "*/*.preview.png") == previews
    assert len(list(pooled.glob("*/preview.*"))) == 3
    for out in (sync, pooled):
        assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]
        assert not list(out.glob("*.lock"))
        total = json.loads((out / "summary.json").read_text())["total"]
        assert (total["videos"], total["clips"], total["frames"], total["failed"]) == (3, 4, 10, 0)
    assert not _writer_threads()  # the pool is shut down at the end of the stage
    # Label shards: PNGs encoded in the pool, the tar members appended in order by one thread; their
    # label PNGs are the bytes the synchronous png run wrote.
    out = _predict(tmp_path, "shards", "--output_format", "shards", "--writer.write_workers", "3")
    urls = sorted(str(p) for p in out.glob("labels-rank*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["a__c0000", "b__c0000", "b__c0001", "c__c0000"]
    in_tars = {}
    for sample in samples:
        vid = sample["__key__"].split("__")[0]
        for i, name in enumerate(json.loads(sample["labels.json"])["frame_names"]):
            in_tars[f"{vid}/{name}.png"] = sample[f"{i:05d}.label.png"]
    assert in_tars == labels


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_failed_background_write_fails_its_video_alone(tmp_path, monkeypatch, one_thread, workers):  # noqa: F811
    write = png_store.write_png

    def full_disk_for_a(path: Path, label: np.ndarray) -> None:
        if path.name == "a_f0001.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, label)

    monkeypatch.setattr(png_store, "write_png", full_disk_for_a)
    with pytest.raises(SystemExit):  # some videos failed: the failure exit status
        _predict(tmp_path, "out", "--writer.write_workers", workers)
    out = tmp_path / "out"
    assert sorted(done_records(out)) == ["b", "c"]  # the job went on with the other videos
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"]["failed"] == 1 and summary["total"]["videos"] == 2
    [failed] = summary["failed"]
    path = out / "a" / "a_f0001.png"
    assert failed["video_id"] == "a" and failed["clip_index"] == 0
    assert failed["error"] == (
        f"Expected to read and write the output of video 'a' at {str(path)!r}, but got OSError: No space "
        "left on device. Free space, fix the permissions or remove the file."
    )
    assert not (out / "a" / "DONE").exists() and not (out / "a.lock").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_done_never_precedes_the_files_of_its_video(tmp_path, monkeypatch, one_thread):  # noqa: F811
    events: list[tuple[str, str, bool]] = []  # (kind, video, every label PNG of the video on disk)
    frames = dict(LAYOUT[0] + LAYOUT[1])
    write, atomic, start = png_store.write_png, png_store.atomic_write, png_store.PngStore.start
    # The last frame of "a" (of "b") is written only once the loop has started "b" ("c"): the writer
    # went on while the frame was pending, and DONE must still wait for it.
    started = {vid: threading.Event() for vid in frames}
    after = {"a_f0002.png": "b", "b_f0004.png": "c"}

    def start_recording(self, res: VideoLabels, *args, **kw):
        started[res.meta.video_id].set()
        return start(self, res, *args, **kw)

    def slow_png(path: Path, label: np.ndarray) -> None:
        if path.name in after:
            assert started[after[path.name]].wait(120)
            time.sleep(0.2)  # a DONE written too early would come now
        write(path, label)
        events.append(("png", path.parent.name, False))

    def recording_write(path: Path, data: bytes) -> None:
        vid = path.parent.name
        if path.name == "DONE":
            events.append(("DONE", vid, len(list(path.parent.glob("*.png"))) == frames[vid]))
        elif path.name.startswith("clip-"):
            events.append((path.name, vid, True))
        atomic(path, data)

    monkeypatch.setattr(png_store, "write_png", slow_png)
    monkeypatch.setattr(png_store, "atomic_write", recording_write)
    monkeypatch.setattr(png_store.PngStore, "start", start_recording)
    out = _predict(tmp_path, "out", "--writer.write_workers", "2")
    assert sorted(done_records(out)) == ["a", "b", "c"]
    for vid, n in frames.items():
        kinds = [(kind, ok) for kind, v, ok in events if v == vid]
        assert kinds[-1] == ("DONE", True)  # DONE last, with every label PNG of the video in place
        assert [k for k, _ in kinds].count("png") == n
    clip0 = [kind for kind, v, _ in events if v == "b"]
    assert clip0.index("clip-0000.done") == CLIP_FRAMES  # a clip's record after its own PNGs


# -- interruption ------------------------------------------------------------------------------------
class _Strategy:
    def broadcast(self, obj, src=0):
        return obj


class _Module:
    logger = None

    def output_info(self):
        return {"settings_hash": "h1", "label_mode": "cluster", "backbone": "test"}


def _unit_writer(out: Path, **kw) -> tuple[PseudoLabelWriter, SimpleNamespace]:
    trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, strategy=_Strategy(),
                              received_sigterm=False)  # fmt: skip
    writer = PseudoLabelWriter(str(out), summary_timeout_s=0.0, **kw)
    writer.setup(trainer, _Module(), "predict")
    writer.on_predict_start(trainer, _Module())
    return writer, trainer


def _clip(vid: str, n: int) -> VideoLabels:
    meta = VideoMeta(vid, [f"{vid}_{i:03d}" for i in range(n)], [(6, 10)] * n)
    return VideoLabels(meta, torch.randint(0, 4, (n, 6, 10), generator=torch.Generator().manual_seed(0)))


def _slow(monkeypatch, release: threading.Event | None = None) -> None:
    write = png_store.write_png

    def slow_png(path: Path, label: np.ndarray) -> None:
        if release is not None:
            release.wait()
        time.sleep(0.01)
        write(path, label)

    monkeypatch.setattr(png_store, "write_png", slow_png)


def test_an_exception_finishes_the_videos_handed_over_then_shuts_the_pool(tmp_path, monkeypatch):
    _slow(monkeypatch)
    writer, trainer = _unit_writer(tmp_path, write_workers=2, max_pending_writes=4)
    for vid in ("a", "b"):
        assert not writer.is_complete(_clip(vid, 1).meta)  # takes the lock, as the module does
        writer.on_stage_batch_end(trainer, _Module(), _clip(vid, 6), None, "predict")
    writer.on_exception(trainer, _Module(), RuntimeError("boom"))
    assert sorted(done_records(tmp_path)) == ["a", "b"] and len(label_files(tmp_path)) == 12
    (rank_file,) = tmp_path.glob("summary-rank0-*.json")
    rank = json.loads(rank_file.read_text())
    assert rank["interrupted"] and rank["videos"] == 2
    assert not _writer_threads() and not list(tmp_path.glob("*.lock"))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_sigterm_writes_the_current_video_before_stopping(tmp_path, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    _slow(monkeypatch)
    writer, trainer = _unit_writer(tmp_path, write_workers=2)
    trainer.received_sigterm = True
    with pytest.raises(SIGTERMException):
        writer.on_stage_batch_end(trainer, _Module(), _clip("a", 5), None, "predict")
    assert sorted(done_records(tmp_path)) == ["a"] and len(label_files(tmp_path)) == 5
    writer.on_exception(trainer, _Module(), SIGTERMException(143))
    assert not _writer_threads()


def test_a_stage_torn_down_unfinished_abandons_its_pending_video_without_done(tmp_path, monkeypatch):
    release = threading.Event()
    _slow(monkeypatch, release)
    writer, trainer = _unit_writer(tmp_path, write_workers=1, max_pending_writes=8)
    assert not writer.is_complete(_clip("a", 1).meta)
    writer.on_stage_batch_end(trainer, _Module(), _clip("a", 6), None, "predict")  # returns at once
    assert not (tmp_path / "a" / "DONE").exists() and writer._pool.pending == 6
    threading.Timer(0.1, release.set).start()  # the write in progress finishes; the queued ones are dropped
    writer.teardown(trainer, _Module(), "predict")
    assert not (tmp_path / "a" / "DONE").exists() and len(label_files(tmp_path)) < 6
    assert not _writer_threads() and not (tmp_path / "a.lock").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
