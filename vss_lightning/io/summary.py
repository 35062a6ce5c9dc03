"""What a step hands to the writer (one result per sample) and the per-rank / merged run summary.

`ZeroShotVSS` returns one of `VideoLabels` (labels computed), `VideoSkipped` (output already
complete with the same settings) or `VideoFailed` (unreadable sample, or the pipeline raised) per
sample; the writer stores the labels and counts all three in a `RankSummary`. Each rank writes
`summary-rank<k>-<run id>.json`; `merge_summaries` adds them up into `summary.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vss_lightning.data.format import VideoMeta
from vss_lightning.pipeline.prototypes import VideoPrototypes

from .files import atomic_write, json_bytes, read_json
from .locks import FileLock

log = logging.getLogger(__name__)

# Per rank and run: two jobs sharing an output folder (per-video locks allow it) never overwrite each
# other's rank files. One small file per rank and run stays in the folder (summary.json lists runs).
SUMMARY_RANK = "summary-rank{rank}-{run}.json"
SUMMARY = "summary.json"
METRICS = "metrics.json"  # test/validate: the split's metrics (written by the writer, rank 0)


@dataclass
class VideoLabels:
    """Labels computed for one sample (a whole video, or one clip of it).

    Attributes:
        meta: the sample's metadata (video id, frame names, clip index, ...).
        labels: (T, H, W) label ids on the CPU, uint8 when every id is below 256, else int32.
        key: the sample's tar key.
        url: the shard it came from.
        seconds: wall-clock seconds of the pipeline on this sample.
        retried: True when the sample ran a second time with a halved memory budget after an OOM.
        stage_seconds: wall-clock seconds per pipeline stage (encode, features, context, cbr,
            modulation, resize) of the run that made the labels.
        ignored_fields: shard members of the sample outside the schema (never read).
        prototypes: with a video's last clip, its label prototypes (`pipeline.prototypes`), written
            next to the labels for a corpus vocabulary; None otherwise.
    """

    meta: VideoMeta
    labels: torch.Tensor
    key: str = ""
    url: str = ""
    seconds: float = 0.0
    retried: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    ignored_fields: int = 0
    prototypes: VideoPrototypes | None = None

    @property
    def frames(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class VideoSkipped:
    """A sample whose output is already complete with the same settings hash (not recomputed)."""

    meta: VideoMeta
    key: str = ""
    url: str = ""
    ignored_fields: int = 0

    @property
    def frames(self) -> int:
        return len(self.meta.frame_names)


@dataclass
class VideoFailed:
    """A sample that could not be read or segmented; the job went on without it.

    Attributes:
        video_id: the video id, None when the sample's metadata could not be read.
        key: the tar key ("" for a shard-level error).
        url: the shard.
        error: what went wrong (names the file or video and the fix).
        clip_index: the clip of the video, when known.
    """

    video_id: str | None
    key: str
    url: str
    error: str
    clip_index: int | None = None

    def record(self) -> dict[str, Any]:
        return {
            "video_id": self.video_id,
            "key": self.key,
            "shard": self.url,
            "clip_index": self.clip_index,
            "error": self.error,
        }


VideoResult = VideoLabels | VideoSkipped | VideoFailed


@dataclass
class RankSummary:
    """Counts of one rank over one run.

    Attributes:
        run_id: identifies the run (the same on every rank), so stale files of an earlier run are
            never merged.
        rank: global rank.
        world_size: number of ranks of the run.
        stage: "predict", "test" or "validate".
        settings_hash: the settings hash the labels were written with.
        videos: videos with labels written by this rank (a video split into clips counts once).
        clips: samples (videos or clips) with labels written.
        frames: frames with labels written.
        skipped_videos: videos whose output was already complete (not recomputed).
        skipped_frames: frames of those.
        recomputed: videos whose earlier output had another settings hash and was overwritten.
        retried_oom: samples that needed the halved memory budget.
        ignored_fields: shard members outside the sample schema (pickles, ...), never read; counted
            over written and skipped samples.
        in_progress_elsewhere: videos not computed because another live job (sharing `output_dir`)
            held their lock; neither complete nor failed here (that job writes them).
        failed: one record per failed sample (video id, key, shard, clip, error).
        seconds: wall-clock seconds from the start of the loop to the end.
        frames_per_second: `frames / seconds` (computed frames only).
        interrupted: True when the rank stopped on an exception or signal.
        finished_at: Unix time of the end.
    """

    run_id: str
    rank: int
    world_size: int
    stage: str
    settings_hash: str = ""
    videos: int = 0
    clips: int = 0
    frames: int = 0
    skipped_videos: int = 0
    skipped_frames: int = 0
    recomputed: int = 0
    retried_oom: int = 0
    ignored_fields: int = 0
    in_progress_elsewhere: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    frames_per_second: float = 0.0
    interrupted: bool = False
    finished_at: float = 0.0

    def __post_init__(self) -> None:
        self._start = time.perf_counter()
        self._written: set[str] = set()
        self._skipped: set[str] = set()
        self._elsewhere: set[str] = set()

    def add_elsewhere(self, video_id: str) -> None:
        """Count a video that another job is labelling (once per video)."""
        if video_id not in self._elsewhere:
            self._elsewhere.add(video_id)
            self.in_progress_elsewhere += 1

    def add(self, result: VideoResult) -> None:
        """Count one result."""
        self.ignored_fields += getattr(result, "ignored_fields", 0)
        if isinstance(result, VideoLabels):
            self.clips += 1
            self.frames += result.frames
            self.retried_oom += int(result.retried)
            if result.meta.video_id not in self._written:
                self._written.add(result.meta.video_id)
                self.videos += 1
        elif isinstance(result, VideoSkipped):
            self.skipped_frames += result.frames
            if result.meta.video_id not in self._skipped:
                self._skipped.add(result.meta.video_id)
                self.skipped_videos += 1
        else:
            self.failed.append(result.record())

    def finish(self, interrupted: bool = False) -> None:
        """Stamp the wall-clock time (call once at the end)."""
        self.seconds = time.perf_counter() - self._start
        self.frames_per_second = self.frames / self.seconds if self.seconds > 0 else 0.0
        self.interrupted = interrupted
        self.finished_at = time.time()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_summaries(ranks: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Add up the rank summaries of one run.

    Args:
        ranks: the `RankSummary.to_dict()` of the ranks found (any order).
        world_size: the run's number of ranks; ranks without a summary are listed in `missing_ranks`.

    Returns:
        {"total": {...}, "per_rank": [...], "missing_ranks": [...], ...}: totals of videos, clips,
        frames, skipped and failed, the slowest rank's seconds and the aggregate frames/s.
    """
    ranks = sorted(ranks, key=lambda r: r["rank"])
    keys = ("videos", "clips", "frames", "skipped_videos", "skipped_frames", "recomputed", "retried_oom",
            "ignored_fields", "in_progress_elsewhere")  # fmt: skip
    total: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in ranks) for k in keys}
    total["failed"] = sum(len(r["failed"]) for r in ranks)
    total["seconds"] = max((float(r["seconds"]) for r in ranks), default=0.0)
    total["frames_per_second"] = total["frames"] / total["seconds"] if total["seconds"] > 0 else 0.0
    found = {r["rank"] for r in ranks}
    first = ranks[0] if ranks else {}
    return {
        "run_id": first.get("run_id", ""),
        "stage": first.get("stage", ""),
        "settings_hash": first.get("settings_hash", ""),
        "world_size": world_size,
        "complete": len(found) == world_size and not any(r["interrupted"] for r in ranks),
        "missing_ranks": [k for k in range(world_size) if k not in found],
        "total": total,
        "failed": [dict(f, rank=r["rank"]) for r in ranks for f in r["failed"]],
        "per_rank": [
            {k: v for k, v in r.items() if k != "failed"} | {"failed": len(r["failed"])} for r in ranks
        ],
        "finished_at": max((float(r["finished_at"]) for r in ranks), default=0.0),
    }


def with_earlier_runs(merged: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The `summary.json` to write: this run's merged figures at the top level, and under `runs` every
    run's figures in `output_dir` so far, newest last (a rerun that skips finished videos must not
    erase the figures of the run that labelled them).

    Args:
        merged: this run's `merge_summaries` result.
        previous: the `summary.json` found in `output_dir` (None if none): its `runs` are kept, minus an
            entry of this same run (several ranks may write the merged file); a summary written before
            `runs` existed counts as one earlier run.
    """
    earlier: list[dict[str, Any]] = []
    if previous is not None:
        runs = previous.get("runs")
        if isinstance(runs, list):
            earlier = [r for r in runs if isinstance(r, dict)]
        elif "total" in previous:
            earlier = [previous]
    this = {k: v for k, v in merged.items() if k != "runs"}
    runs = [r for r in earlier if r.get("run_id") != this.get("run_id")] + [this]
    return {**this, "runs": runs}


def read_rank_summaries(output_dir: Path, run_id: str, world_size: int) -> list[dict[str, Any]]:
    """The rank summaries of run `run_id` present in `output_dir` (files of other runs are ignored)."""
    found = []
    for rank in range(world_size):
        path = output_dir / SUMMARY_RANK.format(rank=rank, run=run_id)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("run_id") == run_id:
            found.append(data)
    return found


def write_rank_summary(output_dir: Path, summary: RankSummary) -> dict[str, Any]:
    """Write `summary-rank<k>-<run id>.json`; returns it as written (plain JSON types), for `merge_run`."""
    data = json_bytes(summary.to_dict())
    atomic_write(output_dir / SUMMARY_RANK.format(rank=summary.rank, run=summary.run_id), data)
    return json.loads(data)


def merge_run(own: dict[str, Any], output_dir: Path, timeout_s: float, wait: bool) -> dict[str, Any] | None:
    """Merge the ranks' summaries of `own`'s run into `summary.json` once all of them are there.

    No collective: every rank writes its own file, then looks for the others; whichever rank sees
    all of them writes the merged file (several may, with the same content). With `wait` (rank 0) it
    also polls for up to `timeout_s`, then writes what it has with `missing_ranks` listed. A barrier
    would also work here, but it would fail with the process-group timeout when ranks finish far
    apart (uneven shards) and hang when a rank died; polling does neither. This rank's summary is
    `own` (as `write_rank_summary` wrote it), not re-read from its file.

    Returns:
        The merged summary, or None when not every rank's is there and `wait` is False.
    """
    rank, world_size = own["rank"], own["world_size"]
    deadline = time.monotonic() + (timeout_s if wait else 0.0)
    while True:
        found = read_rank_summaries(output_dir, own["run_id"], world_size)
        found = [r for r in found if r.get("rank") != rank] + [own]
        if len(found) == world_size or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if len(found) < world_size and not wait:
        return None
    merged = merge_summaries(found, world_size)
    if merged["missing_ranks"]:
        log.warning(
            f"No summary from ranks {merged['missing_ranks']} after {timeout_s:.0f} s; "
            f"{output_dir / SUMMARY} is partial (the last rank to finish rewrites it)."
        )
    lock = FileLock(output_dir / f"{SUMMARY}.lock", stale_after_s=60.0)  # jobs sharing output_dir
    if not lock.wait(timeout_s=30.0):
        log.warning(f"{lock.path} held for 30 s; writing {SUMMARY} without it.")
    try:
        previous = read_json(output_dir / SUMMARY)
        atomic_write(output_dir / SUMMARY, json_bytes(with_earlier_runs(merged, previous)))
    finally:
        lock.release()
    return merged
