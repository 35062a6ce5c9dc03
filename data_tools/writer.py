"""Write scanned videos as WebDataset shards in the `vss_lightning.data.format` schema.

For each video the writer

1. checks it completely before writing anything: the video id and frame names (`validate_name`), that
   it has frames, that every frame decodes and all have one size, that every label decodes, maps to
   class ids and has its frame's size;
2. splits it into clips of at most `max_frames_per_clip` frames (0: one clip);
3. writes all its clips, in order, into the current shard, so a video never spans two shards and one
   DataLoader worker reads its clips in order.

Frames in a stored format (jpg, jpeg, png, webp) are copied byte for byte; others are re-encoded.
Labels are stored as single-channel PNGs of class ids (255 = ignore).

Shards are written as `<name>.tar.tmp` and renamed to `<name>.tar` once complete, so a killed
conversion never leaves a truncated shard that looks finished; `manifest.json` is written (atomically)
only at the end. A shard is closed before a video that would push it past `shard_size` bytes (or past
`max_videos_per_shard` videos); a single video larger than `shard_size` gets a shard of its own.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from vss_lightning.data.format import (
    FRAME_EXTS,
    FRAME_FORMATS,
    IGNORE_INDEX,
    SCHEMA,
    SampleError,
    VideoMeta,
    encode_png,
    encode_sample,
    sample_key,
    validate_name,
)

from .common import (
    ConversionError,
    DatasetInfo,
    FrameSpec,
    Scan,
    VideoSpec,
    encode_image,
    open_source_image,
    read_label,
)

_RECORD = tarfile.RECORDSIZE  # a closed tar is padded to a multiple of this


def _frame_bytes(frame: FrameSpec, image_format: Literal["jpg", "png"]) -> tuple[bytes, str, tuple[int, int]]:
    """Read and fully decode one frame. Returns (bytes to store, extension, (H, W))."""
    try:
        data = frame.path.read_bytes()
    except OSError as e:
        raise ConversionError(f"Expected frame file {frame.path} to be readable, but got {e}.") from e
    ext = frame.path.suffix.lower().lstrip(".")
    try:
        with open_source_image(data, frame.path) as img:
            img.load()  # a full decode: truncated or corrupt files fail here, not at inference
            size = (img.height, img.width)
            if ext not in FRAME_EXTS or img.format not in FRAME_FORMATS:  # e.g. a BMP named .jpg
                data, ext = encode_image(img, image_format), image_format
    except (OSError, ValueError, SyntaxError) as e:
        raise ConversionError(
            f"Expected frame file {frame.path} to be a readable image, but got {type(e).__name__}: {e}. "
            "Re-encode or remove the file."
        ) from e
    return data, ext, size


def _label_bytes(frame: FrameSpec, info: DatasetInfo, size: tuple[int, int]) -> tuple[bytes, set[int]]:
    """Read, map and encode one label. Returns (PNG bytes, class ids present without 255)."""
    assert frame.label_path is not None
    ids = info.label_fn(read_label(frame.label_path), frame.label_path)
    if ids.shape != size:
        raise ConversionError(
            f"Expected label file {frame.label_path} to be {size[0]}x{size[1]} (H x W) like its frame "
            f"{frame.path}, but got {ids.shape[0]}x{ids.shape[1]}. Resize it with nearest-neighbour "
            "interpolation or remove it."
        )
    present = {int(v) for v in np.unique(ids)} - {IGNORE_INDEX}
    return encode_png(ids), present


@dataclass
class _Clip:
    meta: VideoMeta
    frames: list[FrameSpec]
    nbytes: int  # bytes the clip adds to a tar, headers included


@dataclass
class _Checked:
    video_id: str
    clips: list[_Clip]
    frames: int
    labelled: int

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.clips)


def _member_bytes(name: str, size: int, mtime: int) -> int:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, mtime
    header = len(info.tobuf(format=tarfile.PAX_FORMAT))
    return header + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def check_video(
    spec: VideoSpec,
    frames: list[FrameSpec],
    info: DatasetInfo,
    max_frames_per_clip: int,
    image_format: Literal["jpg", "png"],
    mtime: int,
) -> _Checked:
    """Pass 1: check a whole video and plan its clips (nothing is kept in memory but sizes).

    Raises:
        ConversionError: naming the video or file, on any bad input.
    """
    try:
        validate_name(spec.video_id, f"video id of {spec.origin}")
        for f in frames:
            validate_name(f.name, f"frame name of {f.path}")
    except SampleError as e:
        raise ConversionError(str(e)) from e
    if not frames:
        raise ConversionError(
            f"Expected video {spec.video_id!r} ({spec.origin}) to have at least one frame, but it has none. "
            "Remove the empty video or add its frames."
        )
    names = [f.name for f in frames]
    if len(set(names)) != len(names):
        dup = sorted(n for n, k in Counter(names).items() if k > 1)
        raise ConversionError(
            f"Expected unique frame names in video {spec.video_id!r} ({spec.origin}), but got several "
            f"files for {dup[:5]}. Keep one file per frame."
        )
    sizes, exts, frame_nbytes, label_nbytes, label_sets = [], [], [], [], []
    for f in frames:
        data, ext, size = _frame_bytes(f, image_format)
        if sizes and size != sizes[0]:
            raise ConversionError(
                f"Expected all frames of video {spec.video_id!r} to have one size, but {f.path} is "
                f"{size[0]}x{size[1]} and {frames[0].path} is {sizes[0][0]}x{sizes[0][1]} (H x W)."
            )
        sizes.append(size)
        exts.append(ext)
        frame_nbytes.append(len(data))
        if f.label_path is not None:
            png, present = _label_bytes(f, info, size)
            label_nbytes.append(len(png))
            label_sets.append(present)
        else:
            label_nbytes.append(None)
            label_sets.append(set())
    step = max_frames_per_clip if max_frames_per_clip > 0 else len(frames)
    starts = list(range(0, len(frames), step))
    clips = []
    for clip_index, start in enumerate(starts):
        idx = range(start, min(start + step, len(frames)))
        meta = VideoMeta(
            video_id=spec.video_id,
            frame_names=[names[i] for i in idx],
            sizes=[sizes[i] for i in idx],
            labelled=[i - start for i in idx if label_nbytes[i] is not None],
            label_set=sorted(set().union(*(label_sets[i] for i in idx))),
            source=info.source,
            clip_index=clip_index,
            num_clips=len(starts),
            frame_offset=start,
            num_classes=info.num_classes,
            class_names=info.class_names,
        )
        key = sample_key(spec.video_id, clip_index)
        nbytes = _member_bytes(f"{key}.meta.json", len(meta.to_json()), mtime)
        for j, i in enumerate(idx):
            nbytes += _member_bytes(f"{key}.{j:05d}.{exts[i]}", frame_nbytes[i], mtime)
            if label_nbytes[i] is not None:
                nbytes += _member_bytes(f"{key}.{j:05d}.label.png", label_nbytes[i], mtime)
        clips.append(_Clip(meta=meta, frames=[frames[i] for i in idx], nbytes=nbytes))
    labelled = sum(n is not None for n in label_nbytes)
    return _Checked(video_id=spec.video_id, clips=clips, frames=len(frames), labelled=labelled)


def build_sample(
    clip: _Clip, info: DatasetInfo, image_format: Literal["jpg", "png"], origin: str
) -> dict[str, Any]:
    """Pass 2: read one clip's frames and labels again and build its sample with `encode_sample`."""
    frames, labels = [], {}
    for i, f in enumerate(clip.frames):
        data, ext, size = _frame_bytes(f, image_format)
        if size != tuple(clip.meta.sizes[i]):
            raise ConversionError(f"Expected {f.path} to stay unchanged during the conversion of {origin}.")
        frames.append((data, ext))
        if f.label_path is not None:
            labels[i], _ = _label_bytes(f, info, size)
    return encode_sample(clip.meta, frames, labels)


@dataclass
class _ShardStats:
    name: str
    videos: int = 0
    clips: int = 0
    frames: int = 0
    labelled_frames: int = 0
    bytes: int = 0
    video_ids: list[str] = field(default_factory=list)


class ShardWriter:
    """Rolling, atomic tar shard writer: `<name>.tar.tmp` is renamed to `<name>.tar` when complete.

    Args:
        pattern: shard path pattern with one integer field, e.g. `out/camvid-%06d.tar`.
        max_bytes: a shard is closed before a video that would make it larger than this.
        max_videos: a shard holds at most this many videos (0: no limit).
        mtime: modification time stored in the tar headers.
    """

    def __init__(self, pattern: str, max_bytes: int, max_videos: int = 0, mtime: int = 0) -> None:
        self.pattern, self.max_bytes, self.max_videos, self.mtime = pattern, max_bytes, max_videos, mtime
        self.shards: list[_ShardStats] = []
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None

    def begin_video(self, nbytes: int) -> None:
        """Make room for a video of `nbytes` tar bytes: close the current shard if it is full."""
        if self._tar is not None and self.shards[-1].videos > 0:
            closed = -(-(self._tar.offset + nbytes + 2 * tarfile.BLOCKSIZE) // _RECORD) * _RECORD
            too_many = self.max_videos > 0 and self.shards[-1].videos >= self.max_videos
            if too_many or closed > self.max_bytes:
                self._finish()
        if self._tar is None:
            self._open()

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: `meta.json` first (a truncated sample still names its video), then the
        frames and labels in frame order."""
        assert self._tar is not None, "call begin_video first"
        key = sample["__key__"]
        fields = ["meta.json"] + sorted(k for k in sample if k not in ("__key__", "meta.json"))
        for name in fields:
            data = sample[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.shards[-1].clips += 1

    def end_video(self, video: _Checked) -> None:
        s = self.shards[-1]
        s.videos += 1
        s.frames += video.frames
        s.labelled_frames += video.labelled
        s.video_ids.append(video.video_id)

    def close(self) -> list[_ShardStats]:
        """Finish the last shard; returns the statistics of all shards written."""
        if self._tar is not None:
            if self.shards[-1].videos > 0:
                self._finish()
            else:
                self.abort()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its `.tmp` file); finished shards stay."""
        if self._tar is not None:
            self._file.close()
            self._path.with_name(self._path.name + ".tmp").unlink(missing_ok=True)
            self.shards.pop()
            self._tar = self._file = None

    def _open(self) -> None:
        self._path = Path(self.pattern % len(self.shards))
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path.with_name(self._path.name + ".tmp"), "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.shards.append(_ShardStats(name=self._path.name))

    def _finish(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.shards[-1].bytes = self._file.tell()
        self._file.close()
        os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
        self._tar = self._file = None


def check_pattern(pattern: str) -> re.Pattern:
    """Check an output pattern like `out/camvid-%06d.tar`; returns a regex matching its shard names."""
    try:
        a, b = pattern % 0, pattern % 1
    except (TypeError, ValueError) as e:
        raise ConversionError(
            f"Expected `--out` to be a shard path pattern with one integer field such as "
            f"'out/camvid-%06d.tar', but got {pattern!r} ({e})."
        ) from e
    if a == b or not a.endswith(".tar") or os.path.dirname(a) != os.path.dirname(b):
        raise ConversionError(
            f"Expected `--out` to be a pattern like 'out/camvid-%06d.tar' (integer field in the file "
            f"name, ending in .tar), but got {pattern!r}."
        )
    name = os.path.basename(pattern)
    parts = re.split(r"%0?\d*d", name)
    return re.compile(r"\d+".join(re.escape(p) for p in parts) + r"(\.tmp)?")


def _prepare_output(pattern: str, overwrite: bool) -> Path:
    regex = check_pattern(pattern)
    out_dir = Path(os.path.dirname(pattern % 0) or ".")
    if not out_dir.is_dir():
        out_dir.mkdir(parents=True)
        return out_dir
    manifest = out_dir / "manifest.json"
    existing = sorted(p for p in out_dir.iterdir() if regex.fullmatch(p.name))
    if manifest.exists():
        existing.insert(0, manifest)
    if existing and not overwrite:
        raise ConversionError(
            f"Expected the output folder {out_dir} to hold no shards of {os.path.basename(pattern)!r} and "
            f"no manifest.json yet, but found {len(existing)} file(s), e.g. {existing[0].name!r}. Pass "
            "`--overwrite` to replace them, or choose another folder (one dataset per folder)."
        )
    for p in existing:  # the manifest goes first: a half-deleted output never looks complete
        p.unlink()
    return out_dir


@contextmanager
def _frames_of(spec: VideoSpec, out_dir: Path) -> Iterator[list[FrameSpec]]:
    if spec.extract is None:
        yield spec.frames
        return
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=out_dir) as tmp:
        yield spec.extract(Path(tmp))


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def convert(
    scan: Scan,
    out: str,
    shard_size: int = 256 * 2**20,
    max_videos_per_shard: int = 0,
    max_frames_per_clip: int = 0,
    on_error: Literal["skip", "fail"] = "fail",
    image_format: Literal["jpg", "png"] = "png",
    overwrite: bool = False,
    progress: bool = True,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the videos of a scan as shards and the manifest.

    Args:
        scan: the scanned source.
        out: shard path pattern, e.g. `out/camvid-%06d.tar`; `manifest.json` goes into its folder.
        shard_size: maximum bytes per shard (exceeded only by a single video larger than this).
        max_videos_per_shard: maximum videos per shard (0: no limit).
        max_frames_per_clip: split longer videos into consecutive clips (0: never split).
        on_error: "fail" stops at the first bad input; "skip" leaves the video (or file) out and lists
            it in the manifest.
        image_format: encoding for frames whose format is not stored as is (bmp, tif).
        overwrite: replace existing shards of this pattern and the manifest.
        progress: show a progress bar.
        options: recorded in the manifest (e.g. the command-line arguments).

    Returns:
        The manifest (also written to `<out folder>/manifest.json`).

    Raises:
        ConversionError: on bad input with on_error="fail" (the shard being written is removed and no
            manifest is written), or on bad arguments.
    """
    if on_error not in ("skip", "fail"):
        raise ConversionError(f"Expected `on_error` to be 'skip' or 'fail', but got {on_error!r}.")
    if shard_size <= 0 or max_videos_per_shard < 0 or max_frames_per_clip < 0:
        raise ConversionError(
            "Expected `shard_size` > 0 and `max_videos_per_shard`, `max_frames_per_clip` >= 0, but got "
            f"{shard_size}, {max_videos_per_shard}, {max_frames_per_clip}."
        )
    if not scan.videos and not scan.problems:
        raise ConversionError(
            f"Expected the {scan.info.source} source to hold at least one video, but found none. Check "
            "`--root` (and `--split`)."
        )
    skipped = [{"item": p.item, "reason": p.reason} for p in scan.problems]
    if skipped and on_error == "fail":
        more = f" ({len(skipped) - 1} more problem(s) found)" if len(skipped) > 1 else ""
        raise ConversionError(f"{skipped[0]['reason']}{more} Use `--on-error skip` to leave such items out.")
    out_dir = _prepare_output(out, overwrite)
    mtime = int(time.time())
    writer = ShardWriter(out, shard_size, max_videos_per_shard, mtime)
    keys: dict[str, str] = {}
    bar = tqdm(scan.videos, desc=f"{scan.info.source} -> {out_dir}", unit="video", disable=not progress)
    try:
        for spec in bar:
            writing = False
            try:
                with _frames_of(spec, out_dir) as frames:
                    video = check_video(spec, frames, scan.info, max_frames_per_clip, image_format, mtime)
                    key = sample_key(spec.video_id)
                    if key in keys:
                        raise ConversionError(
                            f"Expected every video id to give its own tar key, but {spec.video_id!r} "
                            f"({spec.origin}) and {keys[key]!r} both give {key!r}. Rename one of them."
                        )
                    keys[key] = spec.video_id
                    writer.begin_video(video.nbytes)
                    writing = True  # from here on a failure (a file changed since pass 1) is fatal
                    for clip in video.clips:
                        writer.write(build_sample(clip, scan.info, image_format, spec.origin))
                    writer.end_video(video)
            except ConversionError as e:
                if on_error == "fail" or writing:
                    raise
                skipped.append({"item": spec.video_id, "reason": str(e)})
            bar.set_postfix(shards=len(writer.shards), skipped=len(skipped))
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    shards = writer.close()
    manifest = {
        "schema": SCHEMA,
        "source": scan.info.source,
        "num_classes": scan.info.num_classes,
        "class_names": scan.info.class_names,
        "shards": [vars(s) for s in shards],
        "videos": sum(s.videos for s in shards),
        "clips": sum(s.clips for s in shards),
        "frames": sum(s.frames for s in shards),
        "labelled_frames": sum(s.labelled_frames for s in shards),
        "skipped": skipped,
        "ignored_files": scan.ignored_files,
        "options": options or {},
    }
    _atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest
