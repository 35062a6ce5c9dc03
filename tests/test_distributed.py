"""Multi-process pseudo-labelling on CPU (DDP over gloo): exactly once, same labels as one process,
resumable after SIGKILL; bad inputs are reported in summary.json and the job goes on."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds
from background import Command, register, result
from shards import (
    corrupt_jpeg_sample,
    done_records,
    empty_sample,
    forked_cli,
    label_files,
    make_video,
    one_thread,  # noqa: F401 (fixture)
    one_torch_thread,
    predict_args,
    reference_run,
    subprocess_env,
    truncate,
    video_samples,
    write_shard,
    write_uneven_shards,
)

from vss_lightning import cli

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.num_workers", "2")


def _ddp(shards: str, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "vss-lightning"), *predict_args(shards, out, *DDP)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uneven shards (4 shards: 3, 1, 2 and 1 videos) and their labels from one uninterrupted process."""
    videos, shards, out = reference_run(tmp_path_factory.getbasetemp())
    return videos, shards, label_files(out)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@register("ddp")
def _ddp_job(folder: Path) -> Command:
    """`vss-lightning predict` with two `ddp` ranks on the uneven shards (Lightning's launcher starts
    rank 1 as a second run of the script: two fresh interpreters, hence a background job)."""
    pattern = write_uneven_shards(folder / "shards")  # the bytes `reference_run` writes
    return Command(_ddp(pattern, folder / "out"), subprocess_env())


@pytest.mark.background_job("ddp")
def test_two_processes_label_every_video_once_with_the_same_bytes(reference):
    videos, _, single = reference
    done = result("ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.folder / "out"
    summary = _summary(out)
    assert summary["complete"] and summary["world_size"] == 2 and summary["missing_ranks"] == []
    per_rank = {r["rank"]: r for r in summary["per_rank"]}
    assert set(per_rank) == {0, 1} and all(r["run_id"] == summary["run_id"] for r in per_rank.values())
    # Each video once: the ranks' counts add up to exactly the input (a duplicate would exceed it).
    total = summary["total"]
    assert total["videos"] == len(videos) == sum(r["videos"] for r in per_rank.values())
    assert total["clips"] == 9 and total["frames"] == sum(len(v.frames) for v in videos.values())
    assert per_rank[0]["videos"] == 5 and per_rank[1]["videos"] == 2  # rank 0: shards 0, 2; rank 1: 1, 3
    assert total["failed"] == 0
    # Labels do not depend on the rank or the world size.
    assert label_files(out) == single
    assert len(done_records(out)) == len(videos)


def test_sigkill_midway_then_restart_completes_exactly(reference, tmp_path):
    """Two ranks (`ddp_fork`: the job is a forked child of this process and forks its ranks, so no
    interpreter starts; `ddp` itself is run by the test above) SIGKILLed with their DataLoader workers
    once a video is done, then a restart in one process completes the job exactly."""
    videos, shards, single = reference
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    fork_ddp = ("--trainer.strategy", "ddp_fork", "--trainer.devices", "2", "--data.num_workers", "2")
    proc = forked_cli(predict_args(shards, out, *fork_ddp), log, new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/DONE")) and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.is_alive(), log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and DataLoader worker
    proc.join()
    done_at_kill = len(list(out.glob("*/DONE")))
    assert 1 <= done_at_kill < len(videos), "the run should have been killed midway"
    # Restart with another world size (one process, here): labels do not depend on it.
    with one_torch_thread():
        cli.main(predict_args(shards, out))
    total = _summary(out)["total"]
    assert total["skipped_videos"] == done_at_kill
    assert total["videos"] + total["skipped_videos"] == len(videos)
    assert label_files(out) == single  # no missing and no extra frame, the same bytes
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.usefixtures("one_thread")
def test_bad_inputs_are_reported_and_the_good_videos_finish(tmp_path):
    folder = tmp_path / "shards"
    good = {v: make_video(v, 3, seed=i) for i, v in enumerate(["good1", "good2", "good3", "good4"])}
    write_shard(folder / "a-good.tar", video_samples(good["good1"]) + video_samples(good["good2"]))
    write_shard(folder / "b-corrupt.tar", [corrupt_jpeg_sample("badjpeg")] + video_samples(good["good3"]))
    lost = [make_video(v, 4, seed=9) for v in ("lost1", "lost2")]
    truncated = write_shard(
        folder / "c-truncated.tar", video_samples(good["good4"]) + sum(map(video_samples, lost), [])
    )
    truncate(truncated, keep_fraction=0.4)  # in the middle of lost1
    write_shard(folder / "d-empty.tar", [empty_sample("emptyvid")])
    write_shard(folder / "e-small.tar", video_samples(make_video("tiny", 2, size=(32, 32))))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # the job finishes the good videos, then says some failed
        cli.main(predict_args(str(folder / "*.tar"), out, "--output_format", "shards"))
    assert e.value.code == cli.EXIT_SOME_FAILED

    summary = _summary(out)
    failed = {(f["video_id"], Path(f["shard"]).name) for f in summary["failed"]}
    assert ("badjpeg", "b-corrupt.tar") in failed
    assert ("emptyvid", "d-empty.tar") in failed
    assert ("tiny", "e-small.tar") in failed
    assert any(shard == "c-truncated.tar" for _, shard in failed)
    errors = {f["video_id"]: f["error"] for f in summary["failed"]}
    assert "64x64" in errors["tiny"] and "'tiny'" in errors["tiny"]
    # The good videos are labelled, once each, in whole-video label shards.
    tars = sorted(str(p) for p in out.glob("labels-rank000-*.tar"))
    keys = [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)]
    assert sorted(keys) == sorted(f"{v}__c0000" for v in good)
    assert summary["total"]["videos"] == len(good)
