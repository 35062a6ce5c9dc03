"""Label shards: one rank's labels as WebDataset tars of whole videos, with a resume index.

Files in `output_dir` (`r` the rank, `n` a per-rank counter):

    labels-rank<r>-<n>.tar          one sample per clip: `meta.json`, `labels.json`, `<i>.label.png`
    labels-rank<r>-<n>.index.json   {"videos": {video_id: {"num_clips", "settings_hash"}}, ...}

A tar is written as `.tmp`, closed, its index written, then renamed: a tar under its final name is
complete, and holds whole videos only (the clips of a video are buffered, as encoded PNGs, until its
last clip). A tar without an index (killed between the two renames) is scanned instead. Tars cannot
be rewritten in place, so a folder holding labels of other settings is refused. The PNGs of a clip
may be encoded in the writer's background pool (`start`); the clips are added to the tar by one
thread, in order (`Pending.finish`).

Writers: the pseudo-label writer (`io.writer`, `predict`/`test`) and `vocabulary apply`, which stores
labels mapped to global ids (`write(..., record=...)` adds its fields to `labels.json`; `mtime` makes
its tars byte-stable; `abort` drops the open tar on an error, as a kill would).
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from vss_lightning.clips import Clip, ClipAssembler, ClipRun
from vss_lightning.data.format import encode_png, sample_key, validate_name

from .background import BackgroundWrites, Pending, run_now
from .files import atomic_write, json_bytes, read_json
from .labels import label_array, label_record
from .previews import palette, preview_image, sample_frames
from .summary import VideoLabels

SHARD = "labels-rank{rank:03d}-{index:06d}.tar"
SHARD_INDEX = "labels-rank{rank:03d}-{index:06d}.index.json"


def scan_tar(path: Path) -> dict[str, dict[str, Any]]:
    """The complete videos of a label tar, from its `labels.json` members (when its index is missing)."""
    clips: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.name.endswith(".labels.json"):
                continue
            f = tar.extractfile(member)
            rec = json.loads(f.read()) if f is not None else {}
            entry = clips.setdefault(rec["video_id"], {"clips": set(), **rec})
            entry["clips"].add(rec["clip_index"])
    return {
        vid: {"num_clips": e["num_clips"], "settings_hash": e["settings_hash"]}
        for vid, e in clips.items()
        if e["clips"] == set(range(e["num_clips"]))
    }


def _encode(
    label: np.ndarray, frame: np.ndarray | None, colours: np.ndarray, preview: bool
) -> tuple[bytes, bytes | None]:
    """One frame of a tar sample: its label PNG, and its preview PNG when `preview`."""
    return encode_png(label), preview_image(label, frame, colours) if preview else None


class LabelShardStore:
    """The label tars of one rank, and the index of every rank's finished tars.

    Args:
        root: the output folder.
        rank: this process's global rank.
        world_size: number of ranks.
        settings_hash: the settings hash of this run's labels.
        run_id: recorded in the index files.
        videos_per_shard: close a tar after this many videos.
        shard_max_bytes: close a tar once it holds this many bytes of labels.
        info: the module's `output_info()`, recorded per clip (default: the settings hash only).
        write_previews: also store `<i>.preview.png` per frame (`io.previews`).
        mtime: the modification time of every tar member (None: the time of writing); a fixed value
            gives byte-identical tars for identical content (`vocabulary apply`).
    """

    def __init__(
        self,
        root: Path,
        rank: int,
        world_size: int,
        settings_hash: str,
        run_id: str = "",
        videos_per_shard: int = 100,
        shard_max_bytes: int = 1 << 30,
        info: dict[str, Any] | None = None,
        write_previews: bool = False,
        mtime: float | None = None,
    ) -> None:
        self.root, self.rank, self.world_size = root, rank, world_size
        self.settings_hash, self.run_id = settings_hash, run_id
        self.videos_per_shard, self.shard_max_bytes = videos_per_shard, shard_max_bytes
        self.info = info if info is not None else {"settings_hash": settings_hash}
        self.write_previews = write_previews
        self.mtime = mtime
        self.complete: dict[str, str] = {}  # video id -> settings hash, from finished tars
        self._pending: ClipAssembler[dict[str, Any]] = ClipAssembler()  # clips of unfinished videos
        self.next_index = 0
        self._tar: wds.TarWriter | None = None
        self._file: Any = None
        self._videos: dict[str, dict[str, Any]] = {}
        self._bytes = 0

    def _name(self, index: int, index_file: bool = False) -> str:
        return (SHARD_INDEX if index_file else SHARD).format(rank=self.rank, index=index)

    def open(self) -> LabelShardStore:
        """Remove this rank's unfinished tars and read the index of all finished ones; returns self.

        Raises:
            ValueError: if a finished tar holds labels of other settings.
        """
        for tmp in self.root.glob("labels-rank*-*.tar.tmp"):  # left by a killed run
            try:
                owner = int(tmp.name[len("labels-rank") :].split("-")[0])
            except ValueError:
                continue
            if owner == self.rank or (self.rank == 0 and owner >= self.world_size):
                tmp.unlink(missing_ok=True)
        self.complete, last = {}, -1
        for tar in sorted(self.root.glob("labels-rank*-*.tar")):
            stem = tar.name[: -len(".tar")]
            index = read_json(tar.with_name(f"{stem}.index.json"))
            videos = index["videos"] if index is not None else scan_tar(tar)
            for vid, info in videos.items():
                if info.get("settings_hash") != self.settings_hash:
                    raise ValueError(
                        f"Expected `output_dir` {str(self.root)!r} to hold labels made with the current "
                        f"settings (hash {self.settings_hash!r}), but {tar.name} holds video {vid!r} made "
                        f"with hash {info.get('settings_hash')!r}. Shards cannot be overwritten in place: "
                        "use a new --output_dir, or delete the old labels-rank*.tar files."
                    )
                self.complete[vid] = info["settings_hash"]
            if tar.name.startswith(f"labels-rank{self.rank:03d}-"):
                last = max(last, int(stem.rsplit("-", 1)[1]))
        self.next_index = last + 1
        return self

    def is_complete(self, video_id: str) -> bool:
        """Whether a finished tar (of any rank, or this run) holds the whole video."""
        return video_id in self.complete

    def write(self, res: VideoLabels, sample: Any = None, record: dict[str, Any] | None = None) -> None:
        """Encode one clip's labels (and previews) as a tar sample and `add_clip` it, here and now; a
        video already in a finished tar is not stored twice (test/validate recompute complete videos).

        Args:
            res: the clip's labels (with the video's prototypes on its last clip).
            sample: the step's batch, for the previews' frames.
            record: fields added to (or replacing those of) the clip's `labels.json` record.
        """
        self.start(res, sample, record).finish()

    def start(
        self,
        res: VideoLabels,
        sample: Any = None,
        record: dict[str, Any] | None = None,
        pool: BackgroundWrites | None = None,
    ) -> Pending:
        """`write`, with the PNGs encoded by `pool` (default: now, in this thread): the clip is added to
        the tar by the returned `Pending`'s `finish`. Call `finish` in the order the clips were started
        (one thread appends to the tar, in order).
        """
        meta = res.meta
        vid = validate_name(meta.video_id, "video id")
        if self.is_complete(vid):
            return Pending([], lambda _: None)
        arr = label_array(res.labels)
        frames = sample_frames(sample, res) if self.write_previews else None
        colours = palette(meta, str(self.info.get("label_mode") or "cluster"))
        out: dict[str, Any] = {
            "__key__": sample_key(vid, meta.clip_index),
            "meta.json": meta.to_json(),
            "labels.json": json_bytes({**label_record(res, arr, self.info), **(record or {})}),
        }
        if res.prototypes is not None:  # the video's, with its last clip
            res.prototypes.settings_hash = self.settings_hash
            out["prototypes.safetensors"] = res.prototypes.to_bytes()
        submit = pool.submit if pool is not None else run_now
        encoded = [
            submit(_encode, arr[i], frames[i] if frames is not None else None, colours, self.write_previews)
            for i in range(arr.shape[0])
        ]

        def store(pngs: list[tuple[bytes, bytes | None]]) -> None:
            if self.is_complete(vid):  # stored meanwhile (the same video twice in this run)
                return
            for i, (label, preview) in enumerate(pngs):
                out[f"{i:05d}.label.png"] = label
                if preview is not None:
                    out[f"{i:05d}.preview.png"] = preview
            self.add_clip(meta, out)

        return Pending(encoded, store)

    def add_clip(self, clip: Clip, sample: dict[str, Any]) -> None:
        """Buffer one clip's sample; store the whole video when its last clip comes.

        Raises:
            ValueError: if the clips of a video do not come in order (the video is dropped).
        """
        if not self._pending.follows(clip):
            held = self._pending.pop(clip.video_id)
            raise ValueError(
                f"Expected the clips of video {clip.video_id!r} to arrive in order on one rank (clip "
                f"{held.clips[-1] + 1 if held else 0} next), but got clip {clip.clip_index}. Keep each "
                "video in one shard (data_tools does)."
            )
        for run in self._pending.add(clip, sample):
            self._store(run.video_id, run.parts, run.num_clips)

    def unfinished(self) -> list[ClipRun[dict[str, Any]]]:
        """Drop the videos whose last clip never came (they are not stored); returns them."""
        return self._pending.clear()

    def _store(self, video_id: str, samples: list[dict[str, Any]], num_clips: int) -> None:
        if self._tar is None:
            self._file = open(self.root / f"{self._name(self.next_index)}.tmp", "wb")  # noqa: SIM115
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=self.mtime)
        for sample in samples:
            self._tar.write(sample)
            self._bytes += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        self._videos[video_id] = {"num_clips": num_clips, "settings_hash": self.settings_hash}
        self.complete[video_id] = self.settings_hash
        if len(self._videos) >= self.videos_per_shard or self._bytes >= self.shard_max_bytes:
            self.close()

    def close(self) -> None:
        """Finish the open tar: close it, write its index, rename it from `.tmp` (in that order)."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        index = {"videos": self._videos, "rank": self.rank, "run_id": self.run_id}
        atomic_write(self.root / self._name(self.next_index, index_file=True), json_bytes(index))
        name = self._name(self.next_index)
        os.replace(self.root / f"{name}.tmp", self.root / name)
        self._tar, self._file = None, None
        self.next_index += 1
        self._videos, self._bytes = {}, 0

    def abort(self) -> None:
        """Drop the open tar (its `.tmp` is removed, its videos are not complete) and the clips of
        unfinished videos: what a kill leaves, minus the temporary file. Finished tars are kept."""
        self.unfinished()
        if self._tar is None:
            return
        try:
            self._tar.close()
            self._file.close()
        finally:
            (self.root / f"{self._name(self.next_index)}.tmp").unlink(missing_ok=True)
            for vid in self._videos:
                self.complete.pop(vid, None)
            self._tar, self._file = None, None
            self._videos, self._bytes = {}, 0
