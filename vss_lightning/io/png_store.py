"""The png output: `<output_dir>/<video_id>/<frame_name>.png` per frame, `DONE` last, and video locks.

Each frame gets one single-channel label map at the frame's size (uint8, or uint16 when an id
exceeds 255); `DONE`, written last, is JSON with the frame count, the settings hash and the video's
identity (id, source shards, frame names and `clip_identity` per clip), which the completeness
check compares. A video split into clips gets `clip-<k>.done` per clip, replaced by `DONE` once all
its clips are there. With `write_previews`, also the previews of `io.previews`.

The output namespace belongs to the tool: a video id may not take one of its names
(`check_video_id`), a frame name may not end in `.preview` (`validate_name`), and no path below
`output_dir` is followed through a symbolic link (`path`); each of these fails its video alone.

Several jobs may share one `output_dir`: before computing a video, `is_complete` takes the video's
lock `<video_id>.lock` beside its folder (`locks.FileLock`; ids ending in `.lock` are reserved, so
no video folder takes that name). A video whose lock a live job holds is not computed here (counted
as `in_progress_elsewhere`, neither failed nor complete); a stale lock (its job is gone) is taken
over. The lock is released once `DONE` is written, or when the video fails, so only its holder ever
writes or cleans up temporary files in the video's folder.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import numpy as np

from vss_lightning.clips import is_last_clip
from vss_lightning.data.format import (
    MAX_OUTPUT_NAME_LENGTH,
    SampleError,
    VideoMeta,
    encode_png,
    validate_name,
)

from .background import BackgroundWrites, Pending, failed, run_now
from .files import atomic_write, json_bytes, os_error_message, read_json
from .labels import clip_identity, label_array, label_record
from .locks import FileLock, describe
from .previews import PreviewVideos, sample_frames
from .summary import VideoFailed, VideoLabels, VideoResult

log = logging.getLogger(__name__)

DONE = "DONE"
CLIP_DONE = "clip-{index:04d}.done"
PROTOTYPES = "prototypes.safetensors"  # the video's label prototypes (`pipeline.prototypes`)
MAX_DONE_BYTES = 64 << 20  # a DONE lists the frame names: > 100_000 names of 200 bytes
# The tool's own names in `output_dir` (summary.json, summary-rank<k>-<run id>.json, metrics.json,
# config-<stage>.yaml, labels-rank<r>-<n>.tar/.index.json, wandb/, ...): no video id may take them.
RESERVED_ID_SUFFIXES = (".json", ".yaml", ".yml", ".tar", ".tmp", ".lock")
RESERVED_IDS = frozenset({"wandb", "lightning_logs", "checkpoints"})


def write_png(path: Path, label: np.ndarray) -> None:
    """Encode an (H, W) label map as PNG and write it to `path` (temporary name, then rename)."""
    atomic_write(path, encode_png(label))


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


class PngStore:
    """The png labels of one job in `root` (see the module docstring); one per writer and stage.

    Args:
        root: the output folder.
        info: the module's `output_info()` (settings hash, label mode, backbone).
        lock_timeout_s: a video lock of a job on another host untouched this long is stale.
        write_previews: also write the previews (`io.previews`).
    """

    def __init__(
        self, root: Path, info: dict[str, Any], lock_timeout_s: float, write_previews: bool = False
    ) -> None:
        self.root = root
        self.info = info
        self.settings_hash = str(info.get("settings_hash", ""))
        self.lock_timeout_s = lock_timeout_s
        label_mode = str(info.get("label_mode") or "cluster")
        self.previews = PreviewVideos(self.path, label_mode) if write_previews else None
        self._stale_warned: set[str] = set()
        self._stale: set[str] = set()  # videos of other settings, being recomputed
        self._refused: dict[tuple[str, int], str] = {}  # (video, clip) refused by is_complete: the reason
        self._seen: dict[tuple[str, int], str] = {}  # (video, clip) labelled or skipped this run: its shard
        self._locks: dict[str, FileLock] = {}  # videos this job holds the lock of
        self._touched: dict[str, float] = {}  # video -> monotonic time its lock was last refreshed
        self._busy: dict[tuple[str, int], str] = {}  # (video, clip) locked by another live job: its holder

    def is_complete(self, meta: VideoMeta) -> bool:
        """Whether the sample of `meta` needs no computing: its video is complete, or it is refused.

        Complete: `<video>/DONE` exists with this run's settings hash and records this clip's identity
        (`clip_identity`: id, clip layout, frame names and sizes). A video written with another
        settings hash is not complete: it is recomputed and overwritten (logged once per video; shards
        refuse such an `output_dir` in `setup`).

        Refused (True as well, so nothing is computed; the writer then records the step's
        `VideoSkipped` as a `VideoFailed` with the reason): the id takes a name the tool keeps
        (`check_video_id`), a path under `output_dir` on the way is a symbolic link or unreadable, or
        `DONE` records another video with the same id. This check never raises for one video's problem.

        In progress elsewhere (True, nothing computed; the writer counts the step's `VideoSkipped` as
        `in_progress_elsewhere`): another live job holds the video's lock. Otherwise (False) this job
        holds the video's lock from here until `DONE` is written or the video fails.
        """
        vid = meta.video_id
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
            reason = str(e) if isinstance(e, SampleError) else self.os_error(vid, e)
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
                f"Video {vid!r}: the labels in {self.path(vid)} were made with other settings "
                f"(hash {done.get('settings_hash')!r}, now {self.settings_hash!r}); recomputing and "
                "overwriting them."
            )
        return False

    # -- what the writer asks after a step ---------------------------------------------------------
    def busy(self, meta: VideoMeta) -> bool:
        """Whether `is_complete` found the clip locked by another live job (asked once)."""
        return self._busy.pop((meta.video_id, meta.clip_index), None) is not None

    def claim(self, vid: str) -> str | None:
        """Hold the lock of `vid` (test/validate never ask `is_complete`): None when held, else its holder."""
        return self._lock(vid) if vid not in self._locks else None

    def recomputed(self, vid: str) -> bool:
        """Whether `vid` had labels of other settings that this run overwrote (asked once)."""
        if vid not in self._stale:
            return False
        self._stale.discard(vid)
        return True

    def done_with(self, result: VideoResult) -> None:
        """After a step: release the video's lock at its last clip or failure, else touch it."""
        vid = result.video_id if isinstance(result, VideoFailed) else result.meta.video_id
        if vid is None:
            return
        if isinstance(result, VideoFailed) or is_last_clip(result.meta):
            self._unlock(vid)  # DONE written, or the video failed: others may take it
        elif vid in self._locks:
            self._locks[vid].refresh()  # more clips to come: still alive

    def touch(self, vid: str) -> None:
        """Refresh the lock of `vid` while its frames are being labelled (called on frame progress),
        at most every `lock_timeout_s / 20` seconds (at least 1 s): a long video keeps its lock fresh
        for jobs on other hosts, which judge staleness by the lock's age, not only between clips."""
        lock = self._locks.get(vid)
        now = time.monotonic()
        if lock is None or now - self._touched.get(vid, -float("inf")) < max(1.0, self.lock_timeout_s / 20):
            return
        self._touched[vid] = now
        lock.refresh()

    # -- video locks: one job computes a video ------------------------------------------------------
    def _done_here(self, done: dict[str, Any] | None, meta: VideoMeta) -> bool:
        """Whether `done` marks `meta`'s video complete with this run's settings (raises if another video)."""
        if done is None or done.get("settings_hash") != self.settings_hash:
            return False
        self._check_identity(done, meta)
        return True

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
        self._touched.pop(vid, None)
        lock = self._locks.pop(vid, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for vid in list(self._locks):
            self._unlock(vid)

    def _read_done(self, vid: str) -> dict[str, Any] | None:
        """`<vid>/DONE` as a JSON object, None if absent or not an object; never through a link.

        Raises:
            SampleError: if the id is refused (`check_video_id`) or a path on the way is a link.
            OSError: if the file cannot be read.
        """
        vdir = self.path(check_video_id(vid))
        if vdir.exists() and not vdir.is_dir():  # not a link: `_path` refused those
            raise SampleError(
                f"Expected {str(vdir)!r} to be the folder of video {vid!r}, but it is a file. Remove it."
            )
        path = self.path(vid, DONE)
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
            f"Expected {str(self.path(meta.video_id, DONE))!r} to record this video, but it records "
            f"another video with the id {meta.video_id!r} ({done.get('frames')} frames from "
            f"{done.get('sources')}), not clip {meta.clip_index} of {meta.num_clips} with {len(names)} "
            f"frames {first_last}. Two different videos share this id: rename one in the source data, or "
            f"delete {str(self.path(meta.video_id))!r} to relabel it."
        )

    def os_error(self, vid: str, e: OSError) -> str:
        return os_error_message(self.root, vid, e)

    def refusal(self, result: VideoResult) -> str | None:
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

    def path(self, *parts: str) -> Path:
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

    def write(self, res: VideoLabels, sample: Any = None) -> None:
        """Write one clip's label PNGs (and previews), then its `clip-<k>.done` or the video's `DONE`,
        here and now (`start`, then `finish`)."""
        self.start(res, sample).finish()

    def start(self, res: VideoLabels, sample: Any = None, pool: BackgroundWrites | None = None) -> Pending:
        """Start writing one clip: checks and clean-up now, its label PNGs (and previews) by `pool`.

        The clip's `clip-<k>.done` or the video's `DONE` comes from the returned `Pending`'s `finish`,
        once every file of the clip is written; the writer calls it, in clip order, before it starts
        the video's next clip (which cleans the folder's temporary files).

        Args:
            res: the clip's labels.
            sample: the step's batch, for the previews' frames.
            pool: writes the files (default: now, in this thread).

        Raises:
            SampleError, ValueError, OSError: the clip's checks or clean-up failed (nothing started).
        """
        meta = res.meta
        vid = meta.video_id
        arr = label_array(res.labels)  # (T, H, W)
        if arr.shape[0] != len(meta.frame_names):
            raise ValueError(
                f"Expected {len(meta.frame_names)} label maps for video {vid!r}, but got {arr.shape[0]}."
            )
        vdir = self.path(check_video_id(vid))
        for name in meta.frame_names:  # checked at read too; `<name>.png` and `<name>.preview.png` differ
            validate_name(name, f"frame name of video {vid!r}")
        previous = self._read_done(vid)
        if previous is not None:  # recomputed (test, validate, other settings): must be the same video
            self._check_identity(previous, meta)
        vdir.mkdir(exist_ok=True)
        self.path(vid, DONE).unlink(missing_ok=True)  # being (re)written: not complete until DONE is back
        for stale in vdir.glob(".*.tmp"):  # left by a killed job: only the lock holder (us) writes here
            stale.unlink(missing_ok=True)
        if meta.clip_index == 0:
            for stale in vdir.glob("clip-*.done"):
                stale.unlink(missing_ok=True)
            self.path(vid, PROTOTYPES).unlink(missing_ok=True)
        submit = pool.submit if pool is not None else run_now
        files = []
        for i, name in enumerate(meta.frame_names):
            files.append(submit(write_png, self.path(vid, f"{name}.png"), arr[i]))
            if failed(files[-1]):  # no use writing the rest (without workers: as soon as it fails)
                break
        previews = self.previews
        if previews is not None and not any(failed(f) for f in files):
            try:
                files.append(previews.start(res, arr, sample_frames(sample, res), submit))
            except BaseException:
                wait(files)  # nothing of ours is written in the folder once its lock can be released
                raise
        record = label_record(res, arr, self.info)
        forget = (lambda: previews.forget(vid)) if previews is not None else None
        return Pending(files, lambda _: self._finish(res, record), on_error=forget)

    def _finish(self, res: VideoLabels, record: dict[str, Any]) -> None:
        """After every file of a clip is written: its prototypes, then `clip-<k>.done` or `DONE`."""
        meta = res.meta
        vid = meta.video_id
        done = self.path(vid, DONE)
        if res.prototypes is not None:  # before DONE: a complete video always has its prototypes
            res.prototypes.settings_hash = self.settings_hash
            atomic_write(self.path(vid, PROTOTYPES), res.prototypes.to_bytes())
        if meta.num_clips <= 1:
            atomic_write(done, json_bytes(record))
            return
        atomic_write(self.path(vid, CLIP_DONE.format(index=meta.clip_index)), json_bytes(record))
        clips = [read_json(self.path(vid, CLIP_DONE.format(index=k))) for k in range(meta.num_clips)]
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
                self.path(vid, CLIP_DONE.format(index=k)).unlink(missing_ok=True)
