"""The pseudo-label writer: PNG and shard layouts, DONE files, resume index, path safety, summaries."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vss_lightning.data.format import VideoMeta
from vss_lightning.io.labels import label_array
from vss_lightning.io.locks import HOST, FileLock, process_exited, process_start
from vss_lightning.io.previews import preview_png
from vss_lightning.io.summary import (
    SUMMARY,
    RankSummary,
    VideoFailed,
    VideoLabels,
    VideoSkipped,
    atomic_write,
    json_bytes,
    merge_summaries,
    read_rank_summaries,
)
from vss_lightning.io.writer import PseudoLabelWriter


class _Strategy:
    def broadcast(self, obj, src=0):
        return obj


def _trainer(rank: int = 0, world_size: int = 1):
    return SimpleNamespace(
        global_rank=rank, world_size=world_size, is_global_zero=rank == 0, strategy=_Strategy(),
        received_sigterm=False,
    )  # fmt: skip


class _Module:
    """Stands in for ZeroShotVSS: only what the writer asks of it."""

    logger = None

    def __init__(self, settings_hash: str = "h1") -> None:
        self.hash = settings_hash

    def predict_step(self, batch, batch_idx):
        return batch

    def output_info(self):
        return {"settings_hash": self.hash, "label_mode": "cluster", "backbone": "test"}


def _writer(
    out: Path, settings_hash: str = "h1", rank: int = 0, world_size: int = 1, **kw
) -> PseudoLabelWriter:
    writer = PseudoLabelWriter(str(out), summary_timeout_s=0.0, **kw)
    writer.setup(_trainer(rank, world_size), _Module(settings_hash), "predict")
    writer.on_predict_start(None, None)
    return writer


def _meta(vid: str, n: int, clip: int = 0, num_clips: int = 1, offset: int = 0, size=(6, 10)) -> VideoMeta:
    names = [f"{vid}_{offset + i:05d}" for i in range(n)]
    return VideoMeta(vid, names, [size] * n, clip_index=clip, num_clips=num_clips, frame_offset=offset)


def _labels(n: int, size=(6, 10), high: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, *size), generator=g)


def _finish(writer: PseudoLabelWriter, rank: int = 0) -> None:
    writer.on_stage_end(_trainer(rank, writer.world_size), _Module(), "predict")


def test_png_layout_done_and_resume_index(tmp_path):
    writer = _writer(tmp_path)
    labels = _labels(3)
    meta = _meta("vid_a", 3)
    assert not writer.is_complete(meta)
    writer.handle(VideoLabels(meta, labels.to(torch.uint8), "k", "shard.tar"))
    for i, name in enumerate(meta.frame_names):
        img = Image.open(tmp_path / "vid_a" / f"{name}.png")
        assert img.mode == "L" and img.size == (10, 6)
        np.testing.assert_array_equal(np.asarray(img), labels[i].numpy())
    done = json.loads((tmp_path / "vid_a" / "DONE").read_text())
    assert done["frames"] == 3 and done["settings_hash"] == "h1" and done["dtype"] == "uint8"
    assert writer.is_complete(meta)
    assert not list(tmp_path.rglob("*.tmp"))
    # Another run with other settings: not complete, recomputed and counted as such.
    other = _writer(tmp_path, settings_hash="h2")
    assert not other.is_complete(meta)
    other.handle(VideoLabels(meta, labels, "k", "shard.tar"))
    assert other.summary.recomputed == 1
    assert json.loads((tmp_path / "vid_a" / "DONE").read_text())["settings_hash"] == "h2"


def test_uint16_when_ids_exceed_255(tmp_path):
    writer = _writer(tmp_path)
    labels = _labels(2, high=300)
    labels[0, 0, 0] = 299
    writer.handle(VideoLabels(_meta("big", 2), labels.to(torch.int32)))
    arr = np.asarray(Image.open(tmp_path / "big" / "big_00000.png"))
    assert arr.dtype == np.uint16 and arr[0, 0] == 299
    np.testing.assert_array_equal(arr, labels[0].numpy())
    assert label_array(torch.tensor([[[255]]])).dtype == np.uint8
    with pytest.raises(ValueError, match="Expected label ids"):
        label_array(torch.tensor([[[-1]]]))


def test_clips_get_done_after_the_last_clip(tmp_path):
    writer = _writer(tmp_path, write_previews=True)
    first, second = _meta("long", 4, 0, 2, 0), _meta("long", 2, 1, 2, 4)
    writer.handle(VideoLabels(first, _labels(4)))
    assert (tmp_path / "long" / "clip-0000.done").exists()
    assert not (tmp_path / "long" / "DONE").exists() and not writer.is_complete(first)
    writer.handle(VideoLabels(second, _labels(2)))
    done = json.loads((tmp_path / "long" / "DONE").read_text())
    assert done["frames"] == 6 and done["num_clips"] == 2
    assert not list((tmp_path / "long").glob("clip-*.done"))
    assert writer.is_complete(second)
    assert len(list((tmp_path / "long").glob("*.preview.png"))) == 6
    assert Image.open(tmp_path / "long" / "long_00000.preview.png").mode == "P"
    assert writer.summary.videos == 1 and writer.summary.clips == 2 and writer.summary.frames == 6


def test_unsafe_paths_are_failed_not_written(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    writer = _writer(out)
    (out / "linked").symlink_to(outside, target_is_directory=True)
    writer.handle(VideoLabels(_meta("linked", 1), _labels(1)))
    bad = VideoMeta("..", ["f"], [(6, 10)])
    writer.handle(VideoLabels(bad, _labels(1)))
    assert not list(outside.iterdir())
    assert [f["video_id"] for f in writer.summary.failed] == ["linked", ".."]
    assert "inside `output_dir`" in writer.summary.failed[0]["error"]


def _read_shards(out: Path) -> dict[str, dict]:
    urls = sorted(str(p) for p in out.glob("labels-rank*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_shards_whole_videos_rename_and_resume(tmp_path):
    writer = _writer(tmp_path, output_format="shards", videos_per_shard=2)
    labels = {v: _labels(3, seed=i) for i, v in enumerate(["a", "b", "c"])}
    for vid in ("a", "b"):
        writer.handle(VideoLabels(_meta(vid, 3), labels[vid]))
    assert (tmp_path / "labels-rank000-000000.tar").exists()  # closed after 2 videos
    assert (tmp_path / "labels-rank000-000000.index.json").exists()
    writer.handle(VideoLabels(_meta("c", 2, 0, 2), labels["c"][:2]))
    writer.handle(VideoLabels(_meta("c", 1, 1, 2, 2), labels["c"][2:]))
    assert (tmp_path / "labels-rank000-000001.tar.tmp").exists()
    _finish(writer)
    assert not list(tmp_path.glob("*.tmp"))
    samples = _read_shards(tmp_path)
    assert sorted(samples) == ["a__c0000", "b__c0000", "c__c0000", "c__c0001"]
    got = np.asarray(Image.open(io.BytesIO(samples["c__c0001"]["00000.label.png"])))
    np.testing.assert_array_equal(got, labels["c"][2].numpy())
    assert json.loads(samples["a__c0000"]["labels.json"])["settings_hash"] == "h1"
    # A rerun sees every video as complete and numbers its new tars after the old ones.
    again = _writer(tmp_path, output_format="shards")
    assert all(again.is_complete(_meta(v, 1)) for v in "abc") and again._shards.next_index == 2
    # A second job writing label shards into the same folder (as the same rank) is refused ...
    with pytest.raises(ValueError, match="Expected no other job to write label shards") as e:
        _writer(tmp_path, output_format="shards")
    assert f"pid {os.getpid()}" in str(e.value) and "labels-rank0.lock" in str(e.value)
    _finish(again)  # ... until the first one is done
    # Without the index file the tar itself is scanned.
    (tmp_path / "labels-rank000-000000.index.json").unlink()
    third = _writer(tmp_path, output_format="shards")
    assert third.is_complete(_meta("a", 1))
    _finish(third)
    with pytest.raises(ValueError, match="Shards cannot be overwritten in place"):
        _writer(tmp_path, settings_hash="h2", output_format="shards")
    assert not (tmp_path / "labels-rank0.lock").exists()  # the refused job left no lock behind


def test_shards_exception_keeps_finished_videos_and_drops_partial(tmp_path):
    stale = tmp_path / "labels-rank000-000007.tar.tmp"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"half a tar")  # left by a killed run of this rank
    writer = _writer(tmp_path, output_format="shards")
    assert not stale.exists()
    writer.handle(VideoLabels(_meta("a", 2), _labels(2)))
    writer.handle(VideoLabels(_meta("b", 2, 0, 3), _labels(2)))  # clip 0 of 3, never finished
    writer.on_exception(_trainer(), _Module(), RuntimeError("boom"))
    assert sorted(_read_shards(tmp_path)) == ["a__c0000"]
    (rank_file,) = tmp_path.glob("summary-rank0-*.json")
    rank = json.loads(rank_file.read_text())
    assert rank["interrupted"] and rank["videos"] == 2


def test_summary_counts_and_merge(tmp_path):
    w0 = _writer(tmp_path, world_size=2, rank=0)
    w1 = _writer(tmp_path, world_size=2, rank=1)
    w1.run_id = w0.run_id = "run"
    w0.summary.run_id = w1.summary.run_id = "run"
    w0.handle(VideoLabels(_meta("a", 3), _labels(3)))
    w0.handle(VideoSkipped(_meta("b", 4)))
    w1.handle(VideoFailed("c", "c__c0000", "s1.tar", "broken"))
    w1.handle(VideoFailed(None, "", "s2.tar", "truncated"))
    _finish(w0)
    assert not (tmp_path / SUMMARY).exists() or not json.loads((tmp_path / SUMMARY).read_text())["complete"]
    _finish(w1, rank=1)  # the last rank to finish writes the merged summary
    merged = json.loads((tmp_path / SUMMARY).read_text())
    assert merged["complete"] and merged["missing_ranks"] == []
    assert merged["total"]["videos"] == 1 and merged["total"]["frames"] == 3
    assert merged["total"]["skipped_videos"] == 1 and merged["total"]["skipped_frames"] == 4
    assert merged["total"]["failed"] == 2
    assert {(f["video_id"], f["shard"], f["rank"]) for f in merged["failed"]} == {
        ("c", "s1.tar", 1),
        (None, "s2.tar", 1),
    }
    # Files of another run are not merged.
    assert read_rank_summaries(tmp_path, "other-run", 2) == []
    partial = merge_summaries([RankSummary("r", 0, 3, "predict").to_dict()], 3)
    assert partial["missing_ranks"] == [1, 2] and not partial["complete"]


def test_atomic_write_and_json(tmp_path):
    atomic_write(tmp_path / "x.json", json_bytes({"a": float("nan"), "b": [1.0, float("inf")]}))
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None]}
    assert os.listdir(tmp_path) == ["x.json"]
    assert Image.open(io.BytesIO(preview_png(np.array([[0, 300]])))).mode == "P"


def test_ids_that_take_the_tools_names_fail_alone(tmp_path):
    writer = _writer(tmp_path)
    for vid in ("summary.json", "config-predict.yaml", "Metrics.JSON", "labels-rank0-000000.tar", "wandb"):
        meta = _meta(vid, 1)
        assert writer.is_complete(meta)  # refused: nothing is computed ...
        writer.handle(VideoSkipped(meta, "k", "s.tar"))  # ... and the step's skip is recorded as failed
    writer.handle(VideoLabels(_meta("metrics.json", 1), _labels(1), "k", "s.tar"))  # test/validate path
    writer.handle(VideoLabels(_meta("ok", 1), _labels(1), "k", "s.tar"))
    failed = writer.summary.failed
    assert [f["video_id"] for f in failed] == [
        "summary.json", "config-predict.yaml", "Metrics.JSON", "labels-rank0-000000.tar", "wandb",
        "metrics.json",
    ]  # fmt: skip
    assert all("names the tool keeps for its own files in `output_dir`" in f["error"] for f in failed)
    assert writer.summary.skipped_videos == 0 and writer.summary.videos == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no folder took a tool's name
    _finish(writer)
    assert json.loads((tmp_path / SUMMARY).read_text())["total"]["failed"] == 6


def test_a_frame_named_like_a_preview_fails_instead_of_losing_a_label(tmp_path):
    writer = _writer(tmp_path, write_previews=True)
    meta = VideoMeta("v", ["a", "a.preview"], [(6, 10)] * 2)
    writer.handle(VideoLabels(meta, _labels(2), "k", "s.tar"))
    [failed] = writer.summary.failed
    assert "free of the suffix '.preview'" in failed["error"]
    assert not (tmp_path / "v").exists() or not list((tmp_path / "v").iterdir())


def test_done_records_identity_and_a_different_video_with_the_same_id_fails(tmp_path):
    first = _meta("v", 3)
    writer = _writer(tmp_path)
    writer.handle(VideoLabels(first, _labels(3), "v__c0000", "one.tar"))
    done = json.loads((tmp_path / "v" / "DONE").read_text())
    assert done["video_id"] == "v" and done["frame_names"] == first.frame_names and done["frames"] == 3
    assert done["sources"] == ["one.tar"] and len(done["identity"]) == 1
    before = {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir()}
    # The same id again in this run (another shard, same frames): a reported duplicate, not a skip.
    assert writer.is_complete(first)
    writer.handle(VideoSkipped(first, "v__c0000", "two.tar"))
    [dup] = writer.summary.failed
    assert "to occur once in the shards, but 'two.tar'" in dup["error"] and "'one.tar'" in dup["error"]
    # A rerun: the same video is skipped as complete; another video with this id fails, unwritten.
    rerun = _writer(tmp_path)
    assert rerun.is_complete(first)
    rerun.handle(VideoSkipped(first, "v__c0000", "one.tar"))
    assert rerun.summary.skipped_videos == 1 and rerun.summary.failed == []
    other = VideoMeta("v", ["x0", "x1"], [(6, 10)] * 2)
    again = _writer(tmp_path)
    assert again.is_complete(other)  # refused before any computing
    again.handle(VideoSkipped(other, "v__c0000", "three.tar"))
    again.handle(VideoLabels(other, _labels(2), "v__c0000", "three.tar"))  # test/validate: no overwrite
    assert [f["video_id"] for f in again.summary.failed] == ["v", "v"]
    assert all("records another video with the id 'v' (3 frames from ['one.tar'])" in f["error"]
               for f in again.summary.failed)  # fmt: skip
    assert again.summary.skipped_videos == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir()} == before


def test_symlinks_under_output_dir_fail_their_video_only(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "DONE").write_text('{"settings_hash": "h1"}')
    writer = _writer(out)
    writer.handle(VideoLabels(_meta("dE", 2), _labels(2), "k", "s.tar"))
    before = {p.name: p.read_bytes() for p in (out / "dE").iterdir()}
    (out / "dD").symlink_to(out / "dE", target_is_directory=True)  # a link inside output_dir
    (out / "dL").mkdir()
    (out / "dL" / "DONE").symlink_to(outside / "DONE")  # DONE itself a link to outside
    (out / "dF").write_text("a file where a video folder goes")
    for vid in ("dD", "dL"):
        assert writer.is_complete(_meta(vid, 2))  # never raises, never follows the link
        writer.handle(VideoSkipped(_meta(vid, 2), "k", "s.tar"))
    writer.handle(VideoLabels(_meta("dD", 2), _labels(2, seed=1), "k", "s.tar"))
    writer.handle(VideoLabels(_meta("dF", 1), _labels(1), "k", "s.tar"))
    writer.handle(VideoLabels(_meta("dG", 1), _labels(1), "k", "s.tar"))  # the job goes on
    assert [f["video_id"] for f in writer.summary.failed] == ["dD", "dL", "dD", "dF"]
    links = [f["error"] for f in writer.summary.failed[:3]]
    assert all("but it is a symbolic link" in e and "links are never followed" in e for e in links)
    assert f"symbolic link (to {str(outside / 'DONE')!r})" in links[1]
    assert writer.summary.failed[3]["error"].endswith(
        "to be the folder of video 'dF', but it is a file. Remove it."
    )
    assert {p.name: p.read_bytes() for p in (out / "dE").iterdir()} == before  # dE untouched
    assert (out / "dG" / "DONE").exists() and writer.summary.videos == 2
    assert (outside / "DONE").read_text() == '{"settings_hash": "h1"}'


def _lock_record(path: Path, **record) -> None:
    path.write_text(json.dumps({"host": HOST, "pid": 1, "started": 0.0, "token": "x", **record}))


def test_video_lock_held_by_a_live_job_skips_the_video_and_a_stale_one_is_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        writer = _writer(tmp_path)
        # A live job (same host, running pid) holds "busy": not computed, not failed, not complete,
        # and its temporary files are left alone.
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / f".busy_00000.png.{live.pid}.tmp").write_bytes(b"theirs")
        _lock_record(tmp_path / "busy.lock", pid=live.pid, proc_start=process_start(live.pid))
        busy = _meta("busy", 2)
        assert writer.is_complete(busy)
        writer.handle(VideoSkipped(busy, "k", "s.tar"))
        assert (tmp_path / "busy" / f".busy_00000.png.{live.pid}.tmp").read_bytes() == b"theirs"
        assert not (tmp_path / "busy" / "DONE").exists()
        assert json.loads((tmp_path / "busy.lock").read_text())["pid"] == live.pid  # untouched
        # Stale locks: a dead pid on this host; a reused pid (another process start time); another
        # host's lock untouched for longer than lock_timeout_s. Each is taken over and released after DONE.
        _lock_record(tmp_path / "dead.lock", pid=dead.pid)
        _lock_record(tmp_path / "reused.lock", pid=live.pid, proc_start="1")
        _lock_record(tmp_path / "far.lock", host="other-host", pid=live.pid)
        old = time.time() - 7 * 3600
        os.utime(tmp_path / "far.lock", (old, old))
        (tmp_path / "dead").mkdir()
        (tmp_path / "dead" / f".dead_00000.png.{dead.pid}.tmp").write_bytes(b"left by a killed job")
        for vid in ("dead", "reused", "far"):
            meta = _meta(vid, 2)
            assert not writer.is_complete(meta)
            record = json.loads((tmp_path / f"{vid}.lock").read_text())
            assert (record["host"], record["pid"]) == (HOST, os.getpid())
            writer.handle(VideoLabels(meta, _labels(2), "k", "s.tar"))
            assert (tmp_path / vid / "DONE").exists() and not (tmp_path / f"{vid}.lock").exists()
        assert not list((tmp_path / "dead").glob("*.tmp"))  # the dead holder's leftovers are cleaned
        # Another host's recent lock is live: skipped.
        _lock_record(tmp_path / "near.lock", host="other-host", pid=live.pid)
        assert writer.is_complete(_meta("near", 2))
        writer.handle(VideoSkipped(_meta("near", 2), "k", "s.tar"))
        _finish(writer)
        total = json.loads((tmp_path / SUMMARY).read_text())["total"]
        assert (
            total["videos"],
            total["skipped_videos"],
            total["in_progress_elsewhere"],
            total["failed"],
        ) == (
            3,
            0,
            2,
            0,
        )
        assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["busy.lock", "near.lock"]
    finally:
        live.kill()
        live.wait()


def test_a_lock_of_an_exited_but_unreaped_process_is_stale(tmp_path):
    """A zombie (exited, not yet reaped: e.g. a DDP rank of a killed job, orphaned in a container whose
    init does not reap) still answers `os.kill(pid, 0)`; its lock is stale all the same."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for until the end
    try:
        deadline = time.monotonic() + 60
        while not process_exited(zombie.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_exited(zombie.pid) and not process_exited(os.getpid())
        os.kill(zombie.pid, 0)  # no ProcessLookupError: the pid is still taken
        writer = _writer(tmp_path)
        _lock_record(tmp_path / "z.lock", pid=zombie.pid, proc_start=process_start(zombie.pid))
        meta = _meta("z", 2)
        assert not writer.is_complete(meta)  # taken over
        assert json.loads((tmp_path / "z.lock").read_text())["pid"] == os.getpid()
        writer.handle(VideoLabels(meta, _labels(2), "k", "s.tar"))
        assert (tmp_path / "z" / "DONE").exists() and not (tmp_path / "z.lock").exists()
        _finish(writer)
    finally:
        zombie.wait()


def test_video_lock_is_held_across_clips_and_released_on_failure(tmp_path):
    writer = _writer(tmp_path)
    first, second = _meta("v", 2, clip=0, num_clips=2), _meta("v", 2, clip=1, num_clips=2, offset=2)
    assert not writer.is_complete(first)
    writer.handle(VideoLabels(first, _labels(2), "k0", "s.tar"))
    other = FileLock(tmp_path / "v.lock")  # another job on this host while clip 1 is outstanding
    assert other.acquire() == json.loads((tmp_path / "v.lock").read_text())
    assert not writer.is_complete(second)  # still ours
    writer.handle(VideoLabels(second, _labels(2), "k1", "s.tar"))
    assert (tmp_path / "v" / "DONE").exists() and not (tmp_path / "v.lock").exists()
    # A failed video releases its lock; so does the end of the stage.
    assert not writer.is_complete(_meta("bad", 2))
    writer.handle(VideoFailed("bad", "k", "s.tar", "broken", 0))
    assert not writer.is_complete(_meta("open", 2, num_clips=2))
    assert (tmp_path / "open.lock").exists()
    _finish(writer)
    assert not list(tmp_path.glob("*.lock"))
    # Two lock objects of one path: exactly one holds it; release never removes another's lock.
    a, b = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert a.acquire() is None and b.acquire() is not None
    b.release()
    assert (tmp_path / "x.lock").exists()
    a.release()
    assert b.acquire() is None


def test_frame_progress_inside_a_long_video_keeps_its_lock_fresh(tmp_path):
    """Another host judges a lock by its age: it is refreshed while the video's frames come, not
    only between clips (throttled to lock_timeout_s / 20)."""
    writer = _writer(tmp_path)
    assert not writer.is_complete(_meta("long", 2))  # takes the lock
    lock = tmp_path / "long.lock"
    os.utime(lock, (1000.0, 1000.0))  # as if untouched for a long time
    writer.on_frames("long", 1, 100)
    assert lock.stat().st_mtime > 1000.0 + 3600
    os.utime(lock, (1000.0, 1000.0))
    writer.on_frames("long", 2, 100)  # within the throttle interval: not touched again
    assert lock.stat().st_mtime == 1000.0
    writer.on_frames("other", 1, 10)  # a video this job does not hold: nothing happens
    assert not (tmp_path / "other.lock").exists()
    _finish(writer)
