"""Two jobs on one output folder: every video is labelled exactly once, by one of them (video locks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shards import (  # noqa: F401 (one_thread: fixture)
    done_records,
    forked_cli,
    label_files,
    make_video,
    one_thread,
    predict_args,
    video_samples,
    write_shard,
)

from vss_lightning import cli

ROOT = Path(__file__).resolve().parents[1]
NUM_VIDEOS = 12


@pytest.mark.usefixtures("one_thread")
def test_two_jobs_on_one_folder_label_each_video_once_with_the_bytes_of_one_job(tmp_path):
    shards = tmp_path / "shards"
    for s in range(2):
        samples = [
            sample
            for i in range(s * NUM_VIDEOS // 2, (s + 1) * NUM_VIDEOS // 2)
            for sample in video_samples(make_video(f"c{i:02d}", 2, size=(64, 96), seed=i))
        ]
        write_shard(shards / f"c-{s:06d}.tar", samples)
    pattern = str(shards / "c-{000000..000001}.tar")
    shared = tmp_path / "shared"
    # Two whole jobs at once, each a forked child of this process (no interpreter start: they race
    # from the first video on).
    logs = [tmp_path / f"job{j}.log" for j in range(2)]
    jobs = [forked_cli(predict_args(pattern, shared), log) for log in logs]
    for job, log in zip(jobs, logs, strict=True):
        job.join(timeout=400)
        failed = json.loads((shared / "summary.json").read_text()).get("failed") if job.exitcode else None
        assert job.exitcode == 0, f"{log.read_text()[-3000:]}\nfailed: {failed}"
    # One uninterrupted job alone, in this process: the reference bytes.
    single = tmp_path / "single"
    cli.main(predict_args(pattern, single))  # one torch thread (`one_thread`)

    assert len(label_files(single)) == 2 * NUM_VIDEOS
    assert label_files(shared) == label_files(single)
    assert sorted(done_records(shared)) == [f"c{i:02d}" for i in range(NUM_VIDEOS)]
    runs = json.loads((shared / "summary.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0]["run_id"] != runs[1]["run_id"]  # neither job's summary was lost
    totals = [run["total"] for run in runs]
    assert sum(t["videos"] for t in totals) == NUM_VIDEOS  # each video computed by exactly one job
    for t in totals:
        assert t["failed"] == 0
        assert t["videos"] + t["skipped_videos"] + t["in_progress_elsewhere"] == NUM_VIDEOS
    assert not list(shared.glob("*.lock")) and not list(shared.rglob("*.tmp"))
    print("videos per job:", [t["videos"] for t in totals], "in progress elsewhere:",
          [t["in_progress_elsewhere"] for t in totals])  # fmt: skip
