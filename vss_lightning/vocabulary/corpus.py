"""The videos of a labelled corpus: found, checked, and read again on each pass.

A corpus is one or more output folders of `predict`, in either output format:

- png (`--output_format png`): each finished video (`<video>/DONE`) holds `prototypes.safetensors`
  next to its `<frame>.png` labels (`PngVideo`);
- label shards (`--output_format shards`): the finished `labels-rank<r>-<n>.tar` files; a video's
  clips are consecutive samples, each with `labels.json` (its frame names) and `<i>.label.png`
  members, the last one with `prototypes.safetensors` (`ShardVideo`). The folder is scanned once
  (headers and the small JSON members); members are then read by their offsets, never the whole tar.

`Corpus.scan` checks every video's prototypes from their headers (one settings hash and one
feature size for the whole corpus); `videos()` and `chunks()` stream them, never all in memory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from vss_lightning.io.png_store import DONE

from .prototypes import PROTOTYPES, PrototypeError, VideoPrototypes, load_prototypes

FrameSource = Callable[[str, str], "np.ndarray | None"]  # (video id, frame name) -> (H, W, 3) uint8
LABEL_SHARDS = "labels-rank*.tar"  # finished label shards (being written: `.tar.tmp`)


def _read_png(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im)


@dataclass
class PngVideo:
    """A finished video of a png output folder."""

    folder: Path

    @property
    def video_id(self) -> str:
        return self.folder.name

    @property
    def where(self) -> str:
        return repr(str(self.folder / PROTOTYPES))

    @functools.cached_property
    def _done(self) -> bytes:
        return (self.folder / DONE).read_bytes()

    def record(self) -> bytes:
        """The video's DONE record (its identity: a rewritten video has another one), read once."""
        return self._done

    def frame_names(self) -> list[str]:
        return list(json.loads(self._done).get("frame_names") or [])

    def settings_hash(self) -> str:
        return str(json.loads(self._done).get("settings_hash", ""))

    def header(self) -> tuple[dict[str, str], int]:
        """The prototypes' metadata and feature size, from the file's header."""
        path = self.folder / PROTOTYPES
        if not path.is_file():
            raise PrototypeError(
                f"Expected {str(path)!r} next to the labels of video {self.video_id!r}, but it is missing. "
                "Relabel the video with this version of vss_lightning (delete its DONE and rerun the "
                "same `predict`)."
            )
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), int(f.get_slice("features").get_shape()[1])

    def prototypes(self) -> VideoPrototypes:
        return load_prototypes(self.folder / PROTOTYPES)

    def label(self, name: str) -> np.ndarray:
        return _read_png(self.folder / f"{name}.png")


@dataclass
class ShardVideo:
    """A video stored in a label shard: its members' (offset, size) in the tar, by name."""

    tar: Path
    video_id: str
    records: list[dict] = field(default_factory=list)  # the clips' labels.json records, in order
    labels: dict[str, tuple[int, int]] = field(default_factory=dict)  # frame name -> label member
    prototypes_member: tuple[int, int] | None = None
    metas: list[tuple[int, int] | None] = field(default_factory=list)  # the clips' meta.json members

    @property
    def where(self) -> str:
        return f"video {self.video_id!r} in {str(self.tar)!r}"

    def _read(self, member: tuple[int, int]) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(member[0])
            return f.read(member[1])

    def record(self) -> bytes:
        return json.dumps(self.records, sort_keys=True).encode()

    def frame_names(self) -> list[str]:
        return [name for r in self.records for name in r.get("frame_names") or []]

    def settings_hash(self) -> str:
        return str(self.records[-1].get("settings_hash", "")) if self.records else ""

    def header(self) -> tuple[dict[str, str], int]:
        if self.prototypes_member is None:
            raise PrototypeError(
                f"Expected prototypes for {self.where}, but its samples hold none. Relabel it with this "
                "version of vss_lightning into a new output folder."
            )
        with open(self.tar, "rb") as f:  # safetensors: 8-byte header length, then the JSON header
            f.seek(self.prototypes_member[0])
            (n,) = struct.unpack("<Q", f.read(8))
            head = json.loads(f.read(n))
        return dict(head.get("__metadata__") or {}), int(head["features"]["shape"][1])

    def prototypes(self) -> VideoPrototypes:
        meta, _ = self.header()
        meta.setdefault("video_id", self.video_id)
        return VideoPrototypes.from_bytes(self._read(self.prototypes_member), meta, self.where)

    def label(self, name: str) -> np.ndarray:
        return _read_png(self.label_bytes(name))

    def label_bytes(self, name: str) -> bytes:
        """The encoded `<i>.label.png` member of frame `name` (KeyError if the video has none for it)."""
        return self._read(self.labels[name])

    def clip_meta(self, index: int) -> bytes | None:
        """The `meta.json` of the video's clip `index` (its position among the video's samples)."""
        member = self.metas[index] if index < len(self.metas) else None
        return self._read(member) if member is not None else None


Video = PngVideo | ShardVideo


def _png_videos(root: Path) -> Iterator[PngVideo]:
    for vdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if (vdir / DONE).is_file():
            yield PngVideo(vdir)


def shard_videos(root: Path) -> Iterator[ShardVideo]:
    """The videos of the finished label shards in `root`, one scan of each tar's headers."""
    for path in sorted(root.glob(LABEL_SHARDS)):
        yield from tar_videos(path)


def tar_videos(path: Path) -> list[ShardVideo]:
    """The videos of one label tar, sorted by id, from one scan of its headers and `labels.json` members.

    Raises:
        tarfile.TarError, OSError, ValueError, KeyError: if the tar or a `labels.json` is unreadable.
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}  # key -> member -> (offset, size)
    records: dict[str, dict] = {}  # key -> its labels.json
    with tarfile.open(path, "r:") as tar:  # our own output: a plain tar
        for info in tar:
            if not info.isreg() or "." not in info.name:
                continue
            key, member = info.name.split(".", 1)
            samples.setdefault(key, {})[member] = (info.offset_data, info.size)
            if member == "labels.json":
                records[key] = json.loads(tar.extractfile(info).read())
    videos: dict[str, ShardVideo] = {}
    for key, members in samples.items():  # tar order: a video's clips in order
        record = records.get(key)
        if record is None:
            continue
        vid = str(record["video_id"])
        video = videos.setdefault(vid, ShardVideo(path, vid))
        video.records.append(record)
        video.metas.append(members.get("meta.json"))
        for i, name in enumerate(record.get("frame_names") or []):
            if f"{i:05d}.label.png" in members:
                video.labels[name] = members[f"{i:05d}.label.png"]
        if PROTOTYPES in members:
            video.prototypes_member = members[PROTOTYPES]
    return [videos[v] for v in sorted(videos)]


def find_videos(labels: list[Path]) -> Iterator[Video]:
    """The finished videos of output folders (png or label shards), sorted by folder then video id.

    Raises:
        PrototypeError: if a folder does not exist or holds no finished video.
    """
    for root in labels:
        root = Path(root)
        if not root.is_dir():
            raise PrototypeError(
                f"Expected `--labels` {str(root)!r} to be an output folder of `predict`, but it is not a "
                "folder."
            )
        found = False
        for video in (*_png_videos(root), *shard_videos(root)):
            found = True
            yield video
        if not found:
            raise PrototypeError(
                f"Expected finished videos (<video>/DONE, or {LABEL_SHARDS} label shards) in {str(root)!r}, "
                "but found none. Run `predict` into it first."
            )


def record_digest(video: Video) -> str:
    """A short digest of a video's completion record (changes when the video is relabelled)."""
    return hashlib.sha256(video.record()).hexdigest()[:16]


@dataclass
class Corpus:
    """The videos of a corpus with prototypes, read again on each pass (never all in memory)."""

    files: list[Video]
    settings_hash: str
    dim: int

    @classmethod
    def scan(cls, labels: list[Path]) -> Corpus:
        """Find and check every video's prototypes (header only: settings hash and feature size)."""
        videos, hashes, dims = [], {}, {}
        for video in find_videos(labels):
            meta, dim = video.header()
            hashes.setdefault(meta.get("settings_hash", ""), video.where)
            dims.setdefault(dim, video.where)
            videos.append(video)
        if len(hashes) > 1:
            (h1, p1), (h2, p2) = list(hashes.items())[:2]
            raise PrototypeError(
                f"Expected every video of the corpus to come from one settings hash, but {p1} has "
                f"{h1!r} and {p2} has {h2!r}. Fit one vocabulary per settings (pass only the "
                "output folders of one configuration)."
            )
        if len(dims) > 1:
            raise PrototypeError(
                f"Expected one feature size in the corpus, but got {sorted(dims)} "
                f"({list(dims.values())[:2]}). Fit one vocabulary per backbone."
            )
        return cls(videos, next(iter(hashes), ""), next(iter(dims), 0))

    def videos(self) -> Iterator[VideoPrototypes]:
        for video in self.files:
            yield video.prototypes()

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for p in self.videos():
            if p.labels.numel():
                yield p.features, p.cells.to(torch.float64)
