"""The pseudo-label writer: labels to disk as they are computed, exactly once, resumable.

Output layout under `output_dir`:

- `png` (default): `<video_id>/<frame_name>.png`, one single-channel label map per frame at the
  frame's size (uint8, or uint16 when an id exceeds 255), and a `DONE` file written last: JSON with
  the frame count, the settings hash and the video's identity (id, source shards, frame names and
  `clip_identity` per clip), which the completeness check compares. With `write_previews`, also
  `<frame_name>.preview.png` (the label colours blended over the frame, RGB; a palette PNG of the
  labels when the frames are not at hand) and one overlay video per video, `preview.mp4` (PyAV)
  or `preview.gif` (Pillow, when PyAV has no H.264/MPEG-4 encoder), closed before `DONE`; colours
  from `vss_lightning.viz`. A video split into clips gets `clip-<k>.done` per clip, replaced by
  `DONE` once all its clips are there.
- `shards`: WebDataset tars `labels-rank<r>-<n>.tar`, one sample per clip (`meta.json`, `labels.json`
  and `<i>.label.png` per frame, plus `<i>.preview.png` with `write_previews`; no overlay video),
  written per rank; a tar holds whole videos only and is renamed from `.tmp` when closed, next to an
  index `labels-rank<r>-<n>.index.json`.
- `summary-rank<k>.json` per rank and `summary.json` (merged), `metrics.json` after test/validate.

The output namespace belongs to the tool: a video id may not take one of its names
(`check_video_id`), a frame name may not end in `.preview` (`validate_name`), and no path below
`output_dir` is followed through a symbolic link (`_path`); each of these fails its video alone.

Every file is written under a temporary name and renamed, so a killed job never leaves a label that
looks complete; `DONE` (or a renamed tar) is the only mark of completion. A rerun asks `is_complete`
before computing a video and skips it when its output is complete with the same settings hash.

Several jobs may share one png `output_dir`: before computing a video, `is_complete` takes the
video's lock `<video_id>.lock` beside its folder (`locks.FileLock`; ids ending in `.lock` are
reserved, so no video folder takes that name). A video whose lock a live job holds is not computed
here (counted as `in_progress_elsewhere` in the summary, neither failed nor complete); a stale lock
(its job is gone) is taken over. The lock is released once `DONE` is written, or when the video fails,
so only its holder ever writes or cleans up temporary files in the video's folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

from vss_lightning import viz
from vss_lightning.data.format import (
    MAX_OUTPUT_NAME_LENGTH,
    SampleError,
    VideoMeta,
    VideoSample,
    encode_png,
    sample_key,
    validate_name,
)

from .label_shards import LabelShardStore
from .locks import FileLock, describe
from .summary import (
    SUMMARY,
    SUMMARY_RANK,
    RankSummary,
    VideoFailed,
    VideoLabels,
    VideoResult,
    VideoSkipped,
    atomic_write,
    json_bytes,
    merge_summaries,
    read_json,
    read_rank_summaries,
    with_earlier_runs,
)

log = logging.getLogger(__name__)

DONE = "DONE"
CLIP_DONE = "clip-{index:04d}.done"
MAX_DONE_BYTES = 64 << 20  # a DONE lists the frame names: > 100_000 names of 200 bytes
# The tool's own names in `output_dir` (summary.json, summary-rank<k>.json, metrics.json,
# config-<stage>.yaml, labels-rank<r>-<n>.tar/.index.json, wandb/, ...): no video id may take them.
RESERVED_ID_SUFFIXES = (".json", ".yaml", ".yml", ".tar", ".tmp", ".lock")
RESERVED_IDS = frozenset({"wandb", "lightning_logs", "checkpoints"})


def check_video_id(video_id: str) -> str:
    """A video id that can name its folder in `output_dir` without shadowing one of the tool's files.

    Returns:
        The id unchanged.

    Raises:
        SampleError: if it is not a safe file name (`validate_name`) or takes a name the tool keeps for
            itself: ending in one of `RESERVED_ID_SUFFIXES` or one of `RESERVED_IDS` (any case).
    """
    validate_name(video_id, "video id", MAX_OUTPUT_NAME_LENGTH)
    low = video_id.lower()
    if low in RESERVED_IDS or low.endswith(RESERVED_ID_SUFFIXES):
        raise SampleError(
            f"Expected the video id to be none of the names the tool keeps for its own files in "
            f"`output_dir` (ending in {', '.join(RESERVED_ID_SUFFIXES)}; {', '.join(sorted(RESERVED_IDS))}; "
            f"any case), but got {video_id!r}. Rename the video in the source data."
        )
    return video_id


def clip_identity(meta: VideoMeta) -> str:
    """A digest of what tells one clip of a video from another: id, clip layout, frame names and sizes.

    Frame pixels are not hashed: the completeness check sees only the metadata, and decoded pixels can
    change with the image library, which must not make a finished video look like another one.
    """
    record = [meta.video_id, meta.clip_index, meta.num_clips, meta.frame_offset, list(meta.frame_names),
              [list(size) for size in meta.sizes]]  # fmt: skip
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:32]


def label_array(labels: torch.Tensor) -> np.ndarray:
    """(T, H, W) integer labels -> uint8 array, or uint16 when an id exceeds 255.

    Raises:
        ValueError: on negative ids or ids above 65535 (not storable in a PNG label map).
    """
    if labels.numel() == 0:
        return labels.numpy().astype(np.uint8)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"Expected label ids in [0, 65535] to write PNG label maps, but got [{lo}, {hi}].")
    return labels.numpy().astype(np.uint8 if hi <= 255 else np.uint16)


# -- previews (write_previews) ------------------------------------------------------------------------
PREVIEW_VIDEO = "preview"  # <video_id>/preview.mp4 (or .gif)
PREVIEW_FPS = 10.0


def preview_png(label: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """A palette PNG showing an (H, W) label map in colour (ids above 255 wrap around).

    Args:
        label: (H, W) integer ids.
        palette: (256, 3) uint8 colours (default: `viz.palette_for()`, the distinct cluster colours).
    """
    table = viz.palette_for() if palette is None else palette
    img = Image.fromarray((label.astype(np.int64) % 256).astype(np.uint8))
    img.putpalette(np.asarray(table, dtype=np.uint8)[:256].flatten().tolist())  # "L" + palette -> "P"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_frames(sample: Any, res: VideoLabels) -> np.ndarray | None:
    """The (T, H, W, 3) uint8 frames of `res` from the step's batch, or None if it does not hold them."""
    if not isinstance(sample, VideoSample) or sample.meta.video_id != res.meta.video_id:
        return None
    frames = sample.frames
    t, h, w = res.labels.shape
    if sample.meta.clip_index != res.meta.clip_index or tuple(frames.shape) != (t, 3, h, w):
        return None
    return frames.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8, copy=False)  # (T, H, W, 3)


class PseudoLabelWriter(BasePredictionWriter):
    """Writes the labels of each sample as soon as its step ends (nothing accumulates in memory).

    Runs on every rank on that rank's own samples (no collective but one broadcast in `setup`). The
    LightningModule asks `is_complete(meta)` before computing a sample, so a rerun into the same
    `output_dir` skips finished videos. Also counts every result into `summary-rank<k>.json` and
    merges them into `summary.json` (see `_merge`).

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
    ) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise ValueError(f"Expected `output_dir` to be a folder path, but got {output_dir!r}.")
        if output_format not in ("png", "shards"):
            raise ValueError(f"Expected `output_format` to be 'png' or 'shards', but got {output_format!r}.")
        if videos_per_shard < 1 or shard_max_bytes < 1:
            raise ValueError(
                "Expected `videos_per_shard` and `shard_max_bytes` to be at least 1, but got "
                f"{videos_per_shard} and {shard_max_bytes}."
            )
        self.output_dir = str(output_dir)
        self.output_format = output_format
        self.write_previews = write_previews
        self.videos_per_shard = videos_per_shard
        self.shard_max_bytes = shard_max_bytes
        self.summary_timeout_s = summary_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.root = Path(self.output_dir).expanduser().resolve()
        self.info: dict[str, Any] = {"settings_hash": ""}
        self.rank, self.world_size = 0, 1
        self.run_id = ""
        self.summary: RankSummary | None = None
        self.failed_videos = 0  # videos the last finished stage could not label (merged on rank 0)
        self._shards_lock: FileLock | None = None  # with "shards": this job's hold on its rank's tars
        self._stale_warned: set[str] = set()
        self._stale: set[str] = set()
        self._shards: LabelShardStore | None = None
        self._videos: dict[str, tuple[int, viz.VideoWriter]] = {}  # open preview videos: next clip, file
        self._refused: dict[tuple[str, int], str] = {}  # (video, clip) refused by is_complete: the reason
        self._seen: dict[tuple[str, int], str] = {}  # (video, clip) labelled or skipped this run: its shard
        self._locks: dict[str, FileLock] = {}  # videos this job holds the lock of
        self._busy: dict[tuple[str, int], str] = {}  # (video, clip) locked by another live job: its holder

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
        self._stale_warned.clear()
        self._stale.clear()
        self._refused.clear()
        self._seen.clear()
        self._release_all()
        self._busy.clear()
        self._shards = None
        self._release_shards_lock()
        if self.output_format == "shards":
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
                    self.videos_per_shard, self.shard_max_bytes,
                ).open()  # fmt: skip
            except BaseException:
                self._release_shards_lock()
                raise

    def _start(self) -> None:
        self.summary = RankSummary(
            run_id=self.run_id,
            rank=self.rank,
            world_size=self.world_size,
            stage=self._stage,
            settings_hash=self.settings_hash,
        )

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Close the open tar (it holds whole videos only), release the video locks, record the counts."""
        self._abort_preview_videos()
        self._release_all()
        if self._shards is not None:
            self._shards.pending.clear()  # unfinished videos are not stored
            self._shards.close()
        self._release_shards_lock()
        if self.summary is None:
            return
        self.summary.finish(interrupted=True)
        self._merge(self._write_rank_summary(), wait=False)
        self.summary = None

    # -- the output index: asked by the module before it computes a sample -------------------------
    def is_complete(self, meta: VideoMeta) -> bool:
        """Whether the sample of `meta` needs no computing: its video is complete, or it is refused.

        Complete: `<video>/DONE` exists with this run's settings hash and records this clip's identity
        (`clip_identity`: id, clip layout, frame names and sizes). A video written with another
        settings hash is not complete: it is recomputed and overwritten (logged once per video; shards
        refuse such an `output_dir` in `setup`).

        Refused (True as well, so nothing is computed; `handle` then records the step's `VideoSkipped`
        as a `VideoFailed` with the reason): the id takes a name the tool keeps (`check_video_id`), a
        path under `output_dir` on the way is a symbolic link or unreadable, or `DONE` records another
        video with the same id. This check never raises for one video's problem.

        In progress elsewhere (True, nothing computed; `handle` counts the step's `VideoSkipped` as
        `in_progress_elsewhere`): another live job holds the video's lock. Otherwise (False) this job
        holds the video's lock from here until `DONE` is written or the video fails.
        """
        vid = meta.video_id
        if self._shards is not None:
            return self._shards.is_complete(vid)
        try:
            done = self._read_done(vid)
            if self._done_here(done, meta):
                return True
            if vid not in self._locks:
                holder = self._lock(vid)
                if holder is not None:
                    self._busy[(vid, meta.clip_index)] = holder
                    log.warning(
                        f"Video {vid!r} clip {meta.clip_index} skipped: in progress elsewhere ({holder})."
                    )
                    return True
                done = self._read_done(vid)  # another job may have finished it before we took the lock
                if self._done_here(done, meta):
                    self._unlock(vid)
                    return True
        except (SampleError, OSError) as e:
            reason = str(e) if isinstance(e, SampleError) else self._os_error(vid, e)
            log.warning(f"Video {vid!r} clip {meta.clip_index} not labelled: {reason}")
            self._refused[(vid, meta.clip_index)] = reason
            self._unlock(vid)
            return True
        if done is None:
            return False
        if vid not in self._stale_warned:
            self._stale_warned.add(vid)
            self._stale.add(vid)
            log.warning(
                f"Video {vid!r}: the labels in {self._path(vid)} were made with other settings "
                f"(hash {done.get('settings_hash')!r}, now {self.settings_hash!r}); recomputing and "
                "overwriting them."
            )
        return False

    # -- writing ------------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.handle(prediction, batch)
        if trainer.received_sigterm:
            # Lightning's predict loop ignores SIGTERM; stop after this sample (its output is complete).
            log.warning(f"Rank {self.rank}: SIGTERM received; stopped after the current video or clip.")
            raise SIGTERMException(143)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.handle(outputs, batch)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.handle(outputs, batch)

    def _done_here(self, done: dict[str, Any] | None, meta: VideoMeta) -> bool:
        """Whether `done` marks `meta`'s video complete with this run's settings (raises if another video)."""
        if done is None or done.get("settings_hash") != self.settings_hash:
            return False
        self._check_identity(done, meta)
        return True

    # -- video locks (png): one job computes a video ------------------------------------------------
    def _lock(self, vid: str) -> str | None:
        """Take the lock of video `vid`; None when held now, else who holds it.

        Raises:
            SampleError: if the id is refused or the lock path is a symbolic link.
            OSError: if the lock cannot be created.
        """
        path = self.root / f"{check_video_id(vid)}.lock"  # ids ending in .lock are refused: never a video
        if os.path.islink(path):
            raise SampleError(
                f"Expected the lock {str(path)!r} to be a file made by this tool, but it is a symbolic link. "
                "Remove it."
            )
        lock = FileLock(path, self.lock_timeout_s)
        holder = lock.acquire()
        if holder is not None:
            return describe(holder)
        self._locks[vid] = lock
        return None

    def _unlock(self, vid: str) -> None:
        lock = self._locks.pop(vid, None)
        if lock is not None:
            lock.release()

    def _release_all(self) -> None:
        for vid in list(self._locks):
            self._unlock(vid)

    def _release_shards_lock(self) -> None:
        """Release this job's hold on its rank's label tars (after they are closed)."""
        if self._shards_lock is not None:
            self._shards_lock.release()
            self._shards_lock = None

    def _read_done(self, vid: str) -> dict[str, Any] | None:
        """`<vid>/DONE` as a JSON object, None if absent or not an object; never through a link.

        Raises:
            SampleError: if the id is refused (`check_video_id`) or a path on the way is a link.
            OSError: if the file cannot be read.
        """
        vdir = self._path(check_video_id(vid))
        if vdir.exists() and not vdir.is_dir():  # not a link: `_path` refused those
            raise SampleError(
                f"Expected {str(vdir)!r} to be the folder of video {vid!r}, but it is a file. Remove it."
            )
        path = self._path(vid, DONE)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_DONE_BYTES + 1)
        try:
            done = json.loads(data) if len(data) <= MAX_DONE_BYTES else None
        except ValueError:  # a torn or foreign file: not complete
            return None
        return done if isinstance(done, dict) else None

    def _check_identity(self, done: dict[str, Any], meta: VideoMeta) -> None:
        """Refuse a `DONE` that records another video than `meta`'s (a second video with the same id).

        A `DONE` without `identity` (written before identities were recorded) is taken as it is.
        """
        identity = done.get("identity")
        if identity is None:
            return
        ok = (
            done.get("video_id") == meta.video_id
            and isinstance(identity, list)
            and len(identity) == meta.num_clips
            and identity[meta.clip_index] == clip_identity(meta)
        )
        if ok:
            return
        names = meta.frame_names
        first_last = f"{names[0]!r}..{names[-1]!r}" if names else "none"
        raise SampleError(
            f"Expected {str(self._path(meta.video_id, DONE))!r} to record this video, but it records "
            f"another video with the id {meta.video_id!r} ({done.get('frames')} frames from "
            f"{done.get('sources')}), not clip {meta.clip_index} of {meta.num_clips} with {len(names)} "
            f"frames {first_last}. Two different videos share this id: rename one in the source data, or "
            f"delete {str(self._path(meta.video_id))!r} to relabel it."
        )

    def _os_error(self, vid: str, e: OSError) -> str:
        where = e.filename if e.filename else str(self.root / vid)
        return (
            f"Expected to read and write the output of video {vid!r} at {str(where)!r}, but got "
            f"{type(e).__name__}: {e.strerror or e}. Free space, fix the permissions or remove the file."
        )

    def _refusal(self, result: VideoResult) -> str | None:
        """Why a labelled or skipped result must be recorded as failed: refused, or a duplicate id."""
        if isinstance(result, VideoFailed):
            return None
        key = (result.meta.video_id, result.meta.clip_index)
        reason = self._refused.pop(key, None)
        if reason is not None:
            return reason
        first = self._seen.get(key)
        if first is not None:
            return (
                f"Expected video {key[0]!r} clip {key[1]} to occur once in the shards, but {result.url!r} "
                f"(key {result.key!r}) repeats it after {first}; the first one's labels were kept and this "
                "one was not labelled. Rename one of the videos or remove the duplicate shard."
            )
        self._seen[key] = f"{result.url!r} (key {result.key!r})"
        return None

    def handle(self, result: VideoResult, sample: Any = None) -> None:
        """Write one step's result (labels) and count it in the summary.

        Args:
            result: what the step returned.
            sample: the step's batch (a `VideoSample`); its frames make the overlay previews.
        """
        if not isinstance(result, (VideoLabels, VideoSkipped, VideoFailed)):
            raise TypeError(
                "Expected the step to return a VideoLabels, VideoSkipped or VideoFailed (use "
                f"vss_lightning.module.ZeroShotVSS), but got {type(result).__name__}."
            )
        if self.summary is None:
            self._start()
        vid = result.video_id if isinstance(result, VideoFailed) else result.meta.video_id
        if isinstance(result, VideoSkipped) and self._busy.pop((vid, result.meta.clip_index), None):
            self.summary.add_elsewhere(vid)  # another job holds its lock: neither done nor failed here
            return
        reason = self._refusal(result) if self.output_format == "png" else None
        if reason is not None:
            log.warning(f"Video {result.meta.video_id!r} ({result.url}) not written: {reason}")
            result = VideoFailed(result.meta.video_id, result.key, result.url, reason, result.meta.clip_index)
        if isinstance(result, VideoLabels):
            try:
                if self.output_format == "png":
                    holder = self._lock(vid) if vid not in self._locks else None  # test/validate: not asked
                    if holder is not None:
                        log.warning(f"Video {vid!r} not written: in progress elsewhere ({holder}).")
                        self.summary.add_elsewhere(vid)
                        return
                    self._write_png(result, sample)
                else:
                    self._write_shard_sample(result, sample)
            except (SampleError, ValueError, OSError) as e:  # unsafe names or paths, unstorable ids, disk
                error = self._os_error(result.meta.video_id, e) if isinstance(e, OSError) else str(e)
                log.warning(f"Video {result.meta.video_id!r} ({result.url}) not written: {error}")
                result = VideoFailed(
                    result.meta.video_id, result.key, result.url, error, result.meta.clip_index
                )
            else:
                if result.meta.video_id in self._stale:
                    self._stale.discard(result.meta.video_id)
                    self.summary.recomputed += 1
        if isinstance(result, VideoFailed) or result.meta.clip_index >= result.meta.num_clips - 1:
            if vid is not None:
                self._unlock(vid)  # DONE written, or the video failed: others may take it
        elif vid in self._locks:
            self._locks[vid].refresh()  # more clips to come: still alive
        self.summary.add(result)

    def _path(self, *parts: str) -> Path:
        """`output_dir/<parts>`, each part a safe name and none of them a symbolic link.

        Every component below `output_dir` that exists is checked with `lstat` (a link is never
        followed, not even one to a folder inside `output_dir`), so the path lies inside `output_dir`.

        Raises:
            SampleError: if a part is not a safe name or an existing component is a symbolic link.
        """
        path = self.root
        for part in parts:
            path = path / validate_name(part, "output path component", MAX_OUTPUT_NAME_LENGTH)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                break  # nothing below it exists either
            if stat.S_ISLNK(mode):
                raise SampleError(
                    f"Expected {str(path)!r} to be a real file or folder inside `output_dir` "
                    f"{str(self.root)!r}, but it is a symbolic link (to {os.readlink(path)!r}); links are "
                    "never followed. Remove the link or use another output_dir."
                )
        return path

    def _record(self, res: VideoLabels, arr: np.ndarray) -> dict[str, Any]:
        meta = res.meta
        return {
            "video_id": meta.video_id,
            "identity": [clip_identity(meta)],  # per clip; the whole video's in DONE
            "sources": [res.url],
            "keys": [res.key],
            "frame_names": list(meta.frame_names),
            "frames": res.frames,
            "clip_index": meta.clip_index,
            "num_clips": meta.num_clips,
            "frame_offset": meta.frame_offset,
            "dtype": str(arr.dtype),
            "settings_hash": self.settings_hash,
            "label_mode": self.info.get("label_mode"),
            "backbone": self.info.get("backbone"),
        }

    def _write_png(self, res: VideoLabels, sample: Any = None) -> None:
        meta = res.meta
        vid = meta.video_id
        arr = label_array(res.labels)  # (T, H, W)
        if arr.shape[0] != len(meta.frame_names):
            raise ValueError(
                f"Expected {len(meta.frame_names)} label maps for video {vid!r}, but got {arr.shape[0]}."
            )
        vdir = self._path(check_video_id(vid))
        for name in meta.frame_names:  # checked at read too; `<name>.png` and `<name>.preview.png` differ
            validate_name(name, f"frame name of video {vid!r}")
        previous = self._read_done(vid)
        if previous is not None:  # recomputed (test, validate, other settings): must be the same video
            self._check_identity(previous, meta)
        vdir.mkdir(exist_ok=True)
        done = self._path(vid, DONE)
        done.unlink(missing_ok=True)  # the video is being (re)written: it is not complete until DONE is back
        for stale in vdir.glob(".*.tmp"):  # left by a killed job: only the lock holder (us) writes here
            stale.unlink(missing_ok=True)
        if meta.clip_index == 0:
            for stale in vdir.glob("clip-*.done"):
                stale.unlink(missing_ok=True)
        for i, name in enumerate(meta.frame_names):
            atomic_write(self._path(vid, f"{name}.png"), encode_png(arr[i]))
        if self.write_previews:
            self._write_previews(res, arr, sample_frames(sample, res))
        record = self._record(res, arr)
        if meta.num_clips <= 1:
            atomic_write(done, json_bytes(record))
            return
        atomic_write(self._path(vid, CLIP_DONE.format(index=meta.clip_index)), json_bytes(record))
        clips = [read_json(self._path(vid, CLIP_DONE.format(index=k))) for k in range(meta.num_clips)]
        if all(c is not None and c.get("settings_hash") == self.settings_hash for c in clips):
            record.update(
                frames=sum(int(c["frames"]) for c in clips), clip_index=None, frame_offset=0,
                identity=[(c.get("identity") or [None])[0] for c in clips],
                sources=[(c.get("sources") or [None])[0] for c in clips],
                keys=[(c.get("keys") or [None])[0] for c in clips],
                frame_names=[name for c in clips for name in c.get("frame_names") or []],
            )  # fmt: skip
            atomic_write(done, json_bytes(record))
            for k in range(meta.num_clips):
                self._path(vid, CLIP_DONE.format(index=k)).unlink(missing_ok=True)

    # -- previews (write_previews) --------------------------------------------------------------
    def _palette(self, meta: VideoMeta) -> np.ndarray:
        return viz.palette_for(meta.source, meta.num_classes, str(self.info.get("label_mode") or "cluster"))

    def _preview_image(self, meta: VideoMeta, label: np.ndarray, frames: np.ndarray | None, i: int) -> bytes:
        """Frame `i`'s overlay as an RGB PNG, or a palette PNG of the labels without frames."""
        if frames is None:
            return preview_png(label, self._palette(meta))
        return viz.encode_png(viz.overlay(frames[i], label, self._palette(meta)))

    def _write_previews(self, res: VideoLabels, arr: np.ndarray, frames: np.ndarray | None) -> None:
        """`<frame>.preview.png` per frame and the clip's frames appended to the video's overlay video.

        The video is streamed clip by clip into a temporary file and renamed at the video's last
        clip, before `DONE`. A clip that does not follow the previous one on this rank starts the
        video afresh (it then shows the clips from there on).
        """
        meta, vid = res.meta, res.meta.video_id
        palette = self._palette(meta)
        expected, video = self._videos.pop(vid, (0, None))
        if video is not None and expected != meta.clip_index:
            video.abort()
            video = None
        if video is None:
            if meta.clip_index == 0:
                for stale in self._path(vid).glob(f".{PREVIEW_VIDEO}.*.part"):  # left by a killed run
                    stale.unlink(missing_ok=True)
            else:
                log.warning(
                    f"Video {vid!r}: clip {meta.clip_index} came without clip {meta.clip_index - 1} on "
                    f"this rank; its overlay video starts at this clip."
                )
            filename = f"{PREVIEW_VIDEO}.{viz.video_format()}"
            video = viz.VideoWriter(self._path(vid, filename), PREVIEW_FPS)
        try:
            for i, name in enumerate(meta.frame_names):  # frame by frame: memory of one frame
                if frames is not None:
                    image = viz.overlay(frames[i], arr[i], palette)
                    data = viz.encode_png(image)
                else:
                    image, data = viz.colorize(arr[i], palette), preview_png(arr[i], palette)
                atomic_write(self._path(vid, f"{name}.preview.png"), data)
                video.write(image[None])
        except BaseException:
            video.abort()
            raise
        if meta.clip_index >= meta.num_clips - 1:
            video.close()
        else:
            self._videos[vid] = (meta.clip_index + 1, video)

    def _abort_preview_videos(self) -> None:
        """Drop the overlay videos whose last clip never came (their temporary files go)."""
        for vid, (_, video) in self._videos.items():
            log.warning(f"Video {vid!r}: its last clip never came; no overlay video written.")
            video.abort()
        self._videos.clear()

    # -- shards ---------------------------------------------------------------------------------
    def _write_shard_sample(self, res: VideoLabels, sample: Any = None) -> None:
        meta = res.meta
        vid = validate_name(meta.video_id, "video id")
        if self._shards.is_complete(vid):  # test/validate recompute complete videos: never store twice
            return
        arr = label_array(res.labels)
        frames = sample_frames(sample, res) if self.write_previews else None
        out: dict[str, Any] = {
            "__key__": sample_key(vid, meta.clip_index),
            "meta.json": meta.to_json(),
            "labels.json": json_bytes(self._record(res, arr)),
        }
        for i in range(arr.shape[0]):
            out[f"{i:05d}.label.png"] = encode_png(arr[i])
            if self.write_previews:
                out[f"{i:05d}.preview.png"] = self._preview_image(meta, arr[i], frames, i)
        self._shards.add_clip(vid, meta.clip_index, meta.num_clips, out)

    # -- the end: summaries ---------------------------------------------------------------------
    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release_all()
        if self.summary is None:
            return
        self._abort_preview_videos()
        if self._shards is not None:
            for vid, samples in self._shards.pending.items():  # videos whose last clip never came here
                error = f"Expected all clips of video {vid!r} on this rank, but only {len(samples)} came."
                self.summary.add(VideoFailed(vid, samples[0]["__key__"], "", error))
            self._shards.pending.clear()
            self._shards.close()
        self._release_shards_lock()
        self.summary.finish()
        own = self._write_rank_summary()
        merged = self._merge(own, wait=self.rank == 0)
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

    def _write_rank_summary(self) -> dict[str, Any]:
        """Write this rank's summary; returns it as written (plain JSON types: the stage enum becomes
        its value "predict"), for `_merge`."""
        data = json_bytes(self.summary.to_dict())
        atomic_write(self.root / SUMMARY_RANK.format(rank=self.rank), data)
        return json.loads(data)

    def _merge(self, own: dict[str, Any], wait: bool) -> dict[str, Any] | None:
        """Merge the ranks' summaries into `summary.json` once all of this run's are there.

        No collective: every rank writes its own file, then looks for the others; whichever rank
        sees all of them writes the merged file (several may, with the same content). Rank 0 also
        polls for up to `summary_timeout_s`, then writes what it has with `missing_ranks` listed.
        A barrier would also work here, but it would fail with the process-group timeout when ranks
        finish far apart (uneven shards) and hang when a rank died; polling does neither. This rank's
        summary is `own` (as `_write_rank_summary` wrote it), not re-read from its file.
        """
        deadline = time.monotonic() + (self.summary_timeout_s if wait else 0.0)
        while True:
            found = read_rank_summaries(self.root, self.run_id, self.world_size)
            # another job on this folder may have replaced our rank's file since we wrote `own`
            found = [r for r in found if r.get("rank") != self.rank] + [own]
            if len(found) == self.world_size or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if len(found) < self.world_size and not wait:
            return None
        merged = merge_summaries(found, self.world_size)
        if merged["missing_ranks"]:
            log.warning(
                f"No summary from ranks {merged['missing_ranks']} after {self.summary_timeout_s:.0f} s; "
                f"{self.root / SUMMARY} is partial (the last rank to finish rewrites it)."
            )
        lock = FileLock(self.root / f"{SUMMARY}.lock", stale_after_s=60.0)  # jobs sharing output_dir
        if not lock.wait(timeout_s=30.0):
            log.warning(f"{lock.path} held for 30 s; writing {SUMMARY} without it.")
        try:
            atomic_write(
                self.root / SUMMARY, json_bytes(with_earlier_runs(merged, read_json(self.root / SUMMARY)))
            )
        finally:
            lock.release()
        return merged
