"""The pseudo-label writer: labels to disk as they are computed, exactly once, resumable.

Output layout under `output_dir`:

- `png` (default): `<video_id>/<frame_name>.png` per frame and `DONE` per video (`io.png_store`,
  with the video locks that let several jobs share one `output_dir`); with `write_previews` also
  `<frame_name>.preview.png` and an overlay video `preview.mp4`/`.gif` (`io.previews`).
- `shards`: WebDataset tars `labels-rank<r>-<n>.tar` of whole videos, one sample per clip, written
  per rank, each next to an index `labels-rank<r>-<n>.index.json` (`io.label_shards`).
- `summary-rank<k>-<run id>.json` per rank and `summary.json` (merged, `io.summary`), `metrics.json` after
  test/validate (the module's `eval_results`, written by rank 0).

Every file is written under a temporary name and renamed (`io.files.atomic_write`), so a killed job
never leaves a label that looks complete; `DONE` (or a renamed tar) is the only mark of completion.
Encoding and writing the PNGs (labels, previews, and the PNGs of a label tar) runs in a bounded
pool of `write_workers` threads (`io.background`), off the loop's thread, so the accelerator does not
wait for it. Each sample's results are completed in the order the samples came, on the loop's thread:
a video's `DONE` (or its place in a tar) only once every file of it is written, and its counts in the
summary after that. A failed background write fails its video as a synchronous one does. The
summaries, `metrics.json` and the tars themselves are written in the loop's thread.

The writer registers `is_complete` with the module in `setup` (`set_completeness_check`): a rerun
skips a video whose output is complete with the same settings hash before computing it.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vss_lightning.data.format import SampleError, VideoMeta

from .background import BackgroundWrites, Pending
from .files import atomic_write, json_bytes, os_error_message
from .label_shards import LabelShardStore
from .locks import FileLock, describe
from .png_store import PngStore
from .stages import Stage, StageCallback
from .summary import (
    METRICS,
    SUMMARY,
    RankSummary,
    VideoFailed,
    VideoLabels,
    VideoResult,
    VideoSkipped,
    merge_run,
    write_rank_summary,
)

log = logging.getLogger(__name__)


@dataclass
class _Queued:
    """A step's result waiting for its files (`pending`) before it is completed and counted."""

    result: VideoResult
    video_id: str | None
    pending: Pending | None = None
    elsewhere: bool = False  # another job holds the video's lock: counted as in progress elsewhere

    def ready(self) -> bool:
        return self.pending is None or self.pending.ready()


class PseudoLabelWriter(StageCallback):
    """Writes the labels of each sample as soon as its step ends (nothing accumulates in memory).

    A plain callback of predict, test and validate; runs on every rank on that rank's own samples (no
    collective but one broadcast in `setup`). Counts every result into `summary-rank<k>-<run id>.json` and
    merges them into `summary.json` (`io.summary.merge_run`).

    Args:
        output_dir: the output folder (created if needed).
        output_format: "png" (one PNG per frame in a folder per video) or "shards" (WebDataset tars).
        write_previews: also write a colour overlay per frame (`<frame>.preview.png`) and, with
            "png", an overlay video per video (`preview.mp4`, or `preview.gif` without PyAV).
        videos_per_shard: with "shards", close a tar after this many videos.
        shard_max_bytes: with "shards", close a tar once it holds this many bytes of labels.
        summary_timeout_s: how long rank 0 waits at the end for the other ranks' summaries before it
            writes a partial `summary.json` (the last rank to finish writes the full one anyway).
        lock_timeout_s: with "png", a video lock of a job on another host that was not touched for
            this long is taken over as stale (on this host a lock is stale as soon as its process is
            gone). Set it above the longest time one clip takes.
        write_workers: threads that encode and write the PNGs while the next sample is computed; 0
            writes them in the loop's thread (synchronously, before the next sample).
        max_pending_writes: at most this many images are waiting to be written (or clips waiting
            for theirs); a step that would exceed it waits, so memory stays bounded.
    """

    def __init__(
        self,
        output_dir: str,
        output_format: Literal["png", "shards"] = "png",
        write_previews: bool = False,
        videos_per_shard: int = 100,
        shard_max_bytes: int = 1 << 30,
        summary_timeout_s: float = 600.0,
        lock_timeout_s: float = 6 * 3600.0,
        write_workers: int = 2,
        max_pending_writes: int = 128,
    ) -> None:
        super().__init__()
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise ValueError(f"Expected `output_dir` to be a folder path, but got {output_dir!r}.")
        if output_format not in ("png", "shards"):
            raise ValueError(f"Expected `output_format` to be 'png' or 'shards', but got {output_format!r}.")
        if videos_per_shard < 1 or shard_max_bytes < 1:
            raise ValueError(
                "Expected `videos_per_shard` and `shard_max_bytes` to be at least 1, but got "
                f"{videos_per_shard} and {shard_max_bytes}."
            )
        if write_workers < 0 or max_pending_writes < 1:
            raise ValueError(
                "Expected `write_workers` to be at least 0 and `max_pending_writes` at least 1, but got "
                f"{write_workers} and {max_pending_writes}."
            )
        self.output_dir = str(output_dir)
        self.output_format = output_format
        self.write_previews = write_previews
        self.videos_per_shard = videos_per_shard
        self.shard_max_bytes = shard_max_bytes
        self.summary_timeout_s = summary_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.write_workers = write_workers
        self.max_pending_writes = max_pending_writes
        self.root = Path(self.output_dir).expanduser().resolve()
        self.info: dict[str, Any] = {"settings_hash": ""}
        self.rank, self.world_size = 0, 1
        self.run_id = ""
        self.summary: RankSummary | None = None
        self.failed_videos = 0  # videos the last finished stage could not label (merged on rank 0)
        self._stage = "predict"
        self._png: PngStore | None = None
        self._shards: LabelShardStore | None = None
        self._shards_lock: FileLock | None = None  # with "shards": this job's hold on its rank's tars
        self._pool: BackgroundWrites | None = None  # made at the first write, closed with the stores
        self._queue: deque[_Queued] = deque()  # results in step order, completed from the left

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def settings_hash(self) -> str:
        return str(self.info.get("settings_hash", ""))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.root.mkdir(parents=True, exist_ok=True)
        info = getattr(pl_module, "output_info", None)
        self.info = dict(info()) if callable(info) else {"settings_hash": ""}
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        # The one collective of the writer: every rank reaches setup. Names this run's summaries.
        self.run_id = trainer.strategy.broadcast(uuid.uuid4().hex if trainer.is_global_zero else "", src=0)
        self._stage = stage
        self._release_stores()
        if self.output_format == "png":
            self._png = PngStore(self.root, self.info, self.lock_timeout_s, self.write_previews)
        else:
            self._open_shards()
        register = getattr(pl_module, "set_completeness_check", None)
        if callable(register):
            register(self.is_complete)
        listen = getattr(pl_module, "add_frame_listener", None)
        if callable(listen):  # frame progress inside a video keeps its lock fresh (other hosts)
            listen(self.on_frames)

    def on_frames(self, video_id: str, done: int, total: int) -> None:
        """Frames of `video_id` were labelled: refresh its lock (png output; throttled there)."""
        if self._png is not None:
            self._png.touch(video_id)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._pool is not None or self._queue:  # the stage neither ended nor failed: abandon
            self._release_stores()
        register = getattr(pl_module, "set_completeness_check", None)
        if callable(register):
            register(None)

    def _open_shards(self) -> None:
        # One job per rank and folder: a second job would write the same `labels-rank<r>-*` tars.
        lock = FileLock(self.root / f"labels-rank{self.rank}.lock", self.lock_timeout_s)
        holder = lock.acquire()
        if holder is not None:
            raise ValueError(
                f"Expected no other job to write label shards into {str(self.root)!r} as rank "
                f"{self.rank}, but {describe(holder)} holds {str(lock.path)!r}. Use another "
                "`--output_dir`, or wait for that job (the lock of a job that died is taken over)."
            )
        self._shards_lock = lock
        try:
            self._shards = LabelShardStore(
                self.root, self.rank, self.world_size, self.settings_hash, self.run_id,
                self.videos_per_shard, self.shard_max_bytes, self.info, self.write_previews,
            ).open()  # fmt: skip
        except BaseException:
            self._release_stores()
            raise

    def _start(self) -> None:
        self.summary = RankSummary(
            run_id=self.run_id,
            rank=self.rank,
            world_size=self.world_size,
            stage=self._stage,
            settings_hash=self.settings_hash,
        )

    def on_stage_start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        self._start()

    def on_stage_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, stage: Stage
    ) -> None:
        self.handle(outputs, batch, wait=False)
        if stage == "predict" and trainer.received_sigterm:
            # Lightning's predict loop ignores SIGTERM; stop after this sample (its output is complete).
            self.flush()
            log.warning(f"Rank {self.rank}: SIGTERM received; stopped after the current video or clip.")
            raise SIGTERMException(143)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Complete the samples whose files are being written (their output is whole), close the open
        tar (it holds whole videos only), release the video locks, record the counts.

        If completing them fails, the rest are abandoned: their files are finished or dropped, and
        they get no `DONE`.
        """
        try:
            self.flush()
        except Exception as e:  # the loop's exception is raised by Lightning; this one is only logged
            log.warning(f"Rank {self.rank}: labels being written when the job stopped were abandoned: {e}")
        if self._shards is not None:
            self._shards.unfinished()  # unfinished videos are not stored
        self._release_stores()
        if self.summary is None:
            return
        self.summary.finish(interrupted=True)
        merge_run(write_rank_summary(self.root, self.summary), self.root, self.summary_timeout_s, wait=False)
        self.summary = None

    def _release_stores(self) -> None:
        """Drop the unfinished overlay videos, release the video locks, close the open tar and release
        this job's hold on its rank's tars (after they are closed). Stops the writer threads first:
        the files being written are finished, those not started are dropped, and the samples still
        waiting for theirs are abandoned (no `DONE`)."""
        if self._pool is not None:
            self._pool.close(cancel=True)
            self._pool = None
        self._queue.clear()
        if self._png is not None:
            if self._png.previews is not None:
                self._png.previews.abort_all()
            self._png.release_all()
        if self._shards is not None:
            self._shards.close()
            self._shards = None
        if self._shards_lock is not None:
            self._shards_lock.release()
            self._shards_lock = None

    # -- the output index: asked by the module before it computes a sample -------------------------
    def is_complete(self, meta: VideoMeta) -> bool:
        """Whether the sample of `meta` needs no computing (`PngStore.is_complete`; with shards: a
        finished tar holds its video)."""
        if self._shards is not None:
            return self._shards.is_complete(meta.video_id)
        return self._png is not None and self._png.is_complete(meta)

    # -- writing ------------------------------------------------------------------------------------
    def handle(self, result: VideoResult, sample: Any = None, wait: bool = True) -> None:
        """Write one step's result (labels) and count it in the summary.

        Args:
            result: what the step returned.
            sample: the step's batch (a `VideoSample`); its frames make the overlay previews.
            wait: complete it (and every earlier one) before returning; otherwise its files are
                written in the background and it is completed by a later call or `flush`.
        """
        if not isinstance(result, (VideoLabels, VideoSkipped, VideoFailed)):
            raise TypeError(
                "Expected the step to return a VideoLabels, VideoSkipped or VideoFailed (use "
                f"vss_lightning.module.ZeroShotVSS), but got {type(result).__name__}."
            )
        if self.summary is None:
            self._start()
        self._queue.append(self._submit(result, sample))
        while len(self._queue) > self.max_pending_writes or (self._queue and self._queue[0].ready()):
            self._complete(self._queue.popleft())  # in step order; blocks only over the bound
        if wait:
            self.flush()

    def flush(self) -> None:
        """Complete every result handed over: wait for its files, then write its `DONE` and count it."""
        while self._queue:
            self._complete(self._queue.popleft())

    def _submit(self, result: VideoResult, sample: Any) -> _Queued:
        """Check a result and start writing its files; returns it queued for `_complete`."""
        png = self._png
        vid = result.video_id if isinstance(result, VideoFailed) else result.meta.video_id
        if isinstance(result, VideoSkipped) and png is not None and png.busy(result.meta):
            return _Queued(result, vid, elsewhere=True)  # another job holds its lock: neither done nor failed
        reason = png.refusal(result) if png is not None else None
        if reason is not None:
            log.warning(f"Video {vid!r} ({result.url}) not written: {reason}")
            result = VideoFailed(vid, result.key, result.url, reason, result.meta.clip_index)
        if not isinstance(result, VideoLabels):
            return _Queued(result, vid)
        if png is not None:  # the video's earlier clips first: this one cleans its folder, reads their DONE
            while any(q.video_id == vid for q in self._queue):
                self._complete(self._queue.popleft())
        try:
            if png is not None:
                holder = png.claim(vid)  # test/validate never ask `is_complete` first
                if holder is not None:
                    log.warning(f"Video {vid!r} not written: in progress elsewhere ({holder}).")
                    return _Queued(result, vid, elsewhere=True)
                return _Queued(result, vid, png.start(result, sample, self._writes()))
            return _Queued(result, vid, self._shards.start(result, sample, pool=self._writes()))
        except (SampleError, ValueError, OSError) as e:  # unsafe names or paths, unstorable ids, disk
            return _Queued(self._failed(result, e), vid)

    def _complete(self, queued: _Queued) -> None:
        """Wait for a result's files, write its `DONE` (or add it to the tar), count it, and release
        its video's lock at its last clip or failure."""
        result, vid, png = queued.result, queued.video_id, self._png
        if queued.elsewhere:
            self.summary.add_elsewhere(vid)
            return
        if queued.pending is not None:
            try:
                queued.pending.finish()
            except (SampleError, ValueError, OSError) as e:
                result = self._failed(result, e)
            else:
                if png is not None and png.recomputed(vid):
                    self.summary.recomputed += 1
        if png is not None:
            png.done_with(result)
        self.summary.add(result)

    def _failed(self, result: VideoLabels, e: Exception) -> VideoFailed:
        vid = result.meta.video_id
        error = os_error_message(self.root, vid, e) if isinstance(e, OSError) else str(e)
        log.warning(f"Video {vid!r} ({result.url}) not written: {error}")
        return VideoFailed(vid, result.key, result.url, error, result.meta.clip_index)

    def _writes(self) -> BackgroundWrites:
        if self._pool is None:
            self._pool = BackgroundWrites(self.write_workers, self.max_pending_writes)
        return self._pool

    # -- the end: metrics and summaries ---------------------------------------------------------
    def on_stage_end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        """Complete the labels being written, then write `metrics.json` (test/validate, rank 0), this
        rank's summary and the merged one."""
        self.flush()
        results = getattr(pl_module, "eval_results", None)
        if stage != "predict" and results is not None and self.rank == 0:
            atomic_write(self.root / METRICS, json_bytes(results))
        if self._png is not None:
            self._png.release_all()
        if self.summary is None:
            return
        if self._shards is not None:
            for run in self._shards.unfinished():  # videos whose last clip never came here
                came = len(run.parts)
                error = f"Expected all clips of video {run.video_id!r} on this rank, but only {came} came."
                self.summary.add(VideoFailed(run.video_id, run.parts[0]["__key__"], "", error))
        self._release_stores()
        self.summary.finish()
        own = write_rank_summary(self.root, self.summary)
        merged = merge_run(own, self.root, self.summary_timeout_s, wait=self.rank == 0)
        self.failed_videos = int(merged["total"]["failed"]) if merged is not None else len(own["failed"])
        if self.rank == 0 and merged is not None:
            t = merged["total"]
            log.warning(
                f"{merged['stage']}: {t['videos']} videos ({t['frames']} frames) written, "
                f"{t['skipped_videos']} skipped as complete, {t.get('in_progress_elsewhere', 0)} in progress "
                f"elsewhere, {t['failed']} failed; "
                f"{t['frames_per_second']:.2f} frames/s. "
                f"Summary: {self.root / SUMMARY}"
            )
            if pl_module.logger is not None:
                scalars = {k: v for k, v in t.items() if isinstance(v, (int, float))}
                pl_module.logger.log_metrics(
                    {f"{merged['stage']}/summary/{k}": v for k, v in scalars.items()}
                )
        self.summary = None
