"""The one definition of the shard sample schema, shared by `data_tools` (writing) and the DataModule
(reading).

A sample is one video, or one clip of a long video. In the tar file its members are::

    <key>.meta.json          JSON metadata (see `VideoMeta`)
    <key>.00000.jpg          frame 0, encoded as stored (jpg, jpeg, png or webp)
    <key>.00000.label.png    label of frame 0 (uint8 or uint16 single-channel PNG), where it exists
    <key>.00001.jpg          ...

WebDataset groups members by the part of the base name before its first dot, so `<key>` has no dot
(`sample_key`). Only these fields are ever decoded; any other member (a pickle, a `.pth`, ...) is
ignored and counted in `VideoSample.ignored_fields`, never deserialised.

Label maps use 255 as the ignore index in every dataset.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

SCHEMA = "vss_lightning.video/1"
IGNORE_INDEX = 255
FRAME_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_MAX_PIXELS = 8192 * 8192  # well above a 4K frame (3840 x 2160 = 8.3 Mpx)
DEFAULT_MAX_FRAMES = 100_000
MAX_NAME_LENGTH = 200

_FRAME_RE = re.compile(r"^(\d{5,6})\.(jpg|jpeg|png|webp)$")
_LABEL_RE = re.compile(r"^(\d{5,6})\.label\.png$")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class SampleError(ValueError):
    """A sample (video) that cannot be used: the message names the shard, the video and the fix."""


def validate_name(name: Any, what: str) -> str:
    """Check that a name taken from data can be used as one path component.

    Refuses separators, `.`/`..`, absolute paths, control characters, a leading dot and names longer
    than `MAX_NAME_LENGTH`.

    Args:
        name: the value read from the data (a video id, a frame name, ...).
        what: what the name is, for the error message (e.g. "video id").

    Returns:
        The name unchanged.

    Raises:
        SampleError: if the name is not a safe single path component.
    """
    problem = None
    if not isinstance(name, str):
        problem = f"a string, but got {type(name).__name__} {name!r}"
    elif not name or len(name) > MAX_NAME_LENGTH:
        problem = f"1 to {MAX_NAME_LENGTH} characters long, but got {len(name)} characters ({name[:40]!r})"
    elif "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        problem = f"a plain file name (no '/', '\\\\', leading '.' or '..'), but got {name!r}"
    elif any(unicodedata.category(c)[0] == "C" for c in name):
        problem = f"free of control characters, but got {name!r}"
    elif ":" in name and len(name) > 1 and name[1] == ":":
        problem = f"a relative name (no drive letter), but got {name!r}"
    if problem:
        raise SampleError(f"Expected the {what} to be {problem}. Fix the name in the source data.")
    return name


def sample_key(video_id: str, clip_index: int = 0) -> str:
    """The tar key of a video's clip: no dots, unique per (video id, clip)."""
    return f"{_KEY_SAFE.sub('_', video_id)}__c{clip_index:04d}"


@dataclass
class VideoMeta:
    """The JSON metadata record of one sample.

    Attributes:
        video_id: the video's name (a safe path component); several clips share it.
        frame_names: the source frame names without extension, in frame order (also the output names).
        sizes: (height, width) of each frame.
        labelled: indices (into `frame_names`) of the frames that have a label.
        label_set: the class ids that occur in the labels (255 excluded).
        source: what made the sample (e.g. "camvid", "vspw", "frames").
        clip_index: position of this clip in the video (0 for an unsplit video).
        num_clips: number of clips of the video.
        frame_offset: index of this clip's first frame in the whole video.
        num_classes: number of classes of the dataset, if known.
        class_names: class names by id, if known.
    """

    video_id: str
    frame_names: list[str]
    sizes: list[tuple[int, int]]
    labelled: list[int] = field(default_factory=list)
    label_set: list[int] = field(default_factory=list)
    source: str = ""
    clip_index: int = 0
    num_clips: int = 1
    frame_offset: int = 0
    num_classes: int | None = None
    class_names: list[str] | None = None
    schema: str = SCHEMA

    def to_json(self) -> bytes:
        d = asdict(self)
        d["sizes"] = [list(s) for s in self.sizes]
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "") -> VideoMeta:
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SampleError(f"Expected `meta.json` of {where} to be valid JSON, but got {e}.") from e
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise SampleError(
                f"Expected `meta.json` of {where} to have schema {SCHEMA!r}, but got {got!r}. "
                "Make the shards with `python -m data_tools`."
            )
        known = set(cls.__dataclass_fields__)
        try:
            meta = cls(**{k: v for k, v in d.items() if k in known})
            meta.sizes = [(int(h), int(w)) for h, w in meta.sizes]
            meta.labelled = [int(i) for i in meta.labelled]
            meta.label_set = [int(i) for i in meta.label_set]
        except (TypeError, ValueError) as e:
            raise SampleError(f"Expected `meta.json` of {where} to match the schema, but got {e}.") from e
        validate_name(meta.video_id, f"video id in {where}")
        for name in meta.frame_names:
            validate_name(name, f"frame name of video {meta.video_id!r} in {where}")
        if len(set(meta.frame_names)) != len(meta.frame_names):
            raise SampleError(f"Expected unique frame names in video {meta.video_id!r} ({where}).")
        if len(meta.sizes) != len(meta.frame_names):
            raise SampleError(
                f"Expected one size per frame in video {meta.video_id!r} ({where}), but got "
                f"{len(meta.sizes)} sizes for {len(meta.frame_names)} frames."
            )
        return meta


@dataclass
class VideoSample:
    """One decoded sample, as the DataModule hands it to the LightningModule.

    Attributes:
        meta: the metadata record.
        frames: (T, 3, H, W) uint8 RGB frames.
        labels: (T, H, W) int64 label maps, 255 where a frame has no label; None if no frame has one.
        key: the sample's tar key.
        url: the shard it came from (for messages).
        ignored_fields: number of tar members that are not part of the schema (never decoded).
    """

    meta: VideoMeta
    frames: torch.Tensor
    labels: torch.Tensor | None
    key: str = ""
    url: str = ""
    ignored_fields: int = 0

    @property
    def video_id(self) -> str:
        return self.meta.video_id

    @property
    def where(self) -> str:
        return f"video {self.meta.video_id!r} (key {self.key!r} in shard {self.url!r})"


def encode_sample(
    meta: VideoMeta, frames: list[tuple[bytes, str]], labels: dict[int, bytes] | None = None
) -> dict[str, Any]:
    """Build the dict that `webdataset.TarWriter.write` stores as one sample.

    Args:
        meta: metadata; `frame_names` must have one entry per frame.
        frames: (encoded bytes, extension) per frame, extension one of FRAME_EXTS.
        labels: encoded single-channel PNG bytes by frame index.
    """
    if len(frames) != len(meta.frame_names):
        raise ValueError(f"Expected {len(meta.frame_names)} frames, but got {len(frames)}.")
    sample: dict[str, Any] = {
        "__key__": sample_key(meta.video_id, meta.clip_index),
        "meta.json": meta.to_json(),
    }
    for i, (data, ext) in enumerate(frames):
        ext = ext.lower().lstrip(".")
        if ext not in FRAME_EXTS:
            raise ValueError(f"Expected a frame extension in {FRAME_EXTS}, but got {ext!r}.")
        sample[f"{i:05d}.{ext}"] = data
    for i, data in (labels or {}).items():
        sample[f"{i:05d}.label.png"] = data
    return sample


def encode_png(array: np.ndarray) -> bytes:
    """Encode an (H, W) uint8/uint16 label map or an (H, W, 3) uint8 image as PNG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _open_checked(data: bytes, what: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise SampleError(
            f"Expected {what} to be at most {max_pixels} pixels, but got {e}. "
            "Raise `--data.max_pixels` if the image is genuine."
        ) from e
    except (OSError, ValueError) as e:
        raise SampleError(
            f"Expected {what} to be a readable image, but got {type(e).__name__}: {e}. "
            "Re-encode or remove the file."
        ) from e
    w, h = img.size
    if w * h > max_pixels:
        raise SampleError(
            f"Expected {what} to be at most {max_pixels} pixels, but got {w}x{h} = {w * h}. "
            "Raise `--data.max_pixels` if the image is genuine."
        )
    return img


def decode_image(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded frame to an (H, W, 3) uint8 RGB array, checking its size from the header."""
    img = _open_checked(data, what, max_pixels)
    try:
        return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise SampleError(
            f"Expected {what} to decode, but got {type(e).__name__}: {e}. Re-encode or remove the file."
        ) from e


def decode_label(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a single-channel label PNG to an (H, W) int64 array (palette indices kept as ids)."""
    img = _open_checked(data, what, max_pixels)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise SampleError(
            f"Expected {what} to be a single-channel label PNG, but got mode {img.mode!r}. "
            "Convert colour-coded labels to ids with `python -m data_tools`."
        )
    try:
        return np.asarray(img).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as e:
        raise SampleError(f"Expected {what} to decode, but got {type(e).__name__}: {e}.") from e


def decode_sample(
    raw: dict[str, Any],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> VideoSample:
    """Decode one raw WebDataset sample (bytes by field) into a `VideoSample`.

    Only the schema's fields are decoded; others are counted and ignored. Every failure raises
    `SampleError` naming the shard and video.
    """
    key = str(raw.get("__key__", ""))
    url = str(raw.get("__url__", ""))
    where = f"sample {key!r} of shard {url!r}"
    if "meta.json" not in raw:
        raise SampleError(
            f"Expected {where} to hold a `meta.json` field, but it has none "
            f"(fields: {sorted(k for k in raw if not k.startswith('__'))[:8]})."
        )
    meta = VideoMeta.from_json(raw["meta.json"], where)
    where = f"video {meta.video_id!r} ({where})"
    n = len(meta.frame_names)
    if n == 0:
        raise SampleError(f"Expected {where} to have at least one frame, but it has none.")
    if n > max_frames:
        raise SampleError(
            f"Expected {where} to have at most {max_frames} frames, but got {n}. "
            "Split it into clips with data_tools or raise `--data.max_frames`."
        )
    frames: dict[int, bytes] = {}
    labels: dict[int, bytes] = {}
    ignored = 0
    for name, value in raw.items():
        if name.startswith("__") or name == "meta.json":
            continue
        if m := _FRAME_RE.match(name):
            frames[int(m.group(1))] = value
        elif m := _LABEL_RE.match(name):
            labels[int(m.group(1))] = value
        else:
            ignored += 1
    missing = [i for i in range(n) if i not in frames]
    if missing:
        raise SampleError(
            f"Expected {where} to hold {n} frames, but frame(s) {missing[:5]} are missing "
            "(truncated shard?). Rebuild the shard with data_tools."
        )
    decoded = []
    for i in range(n):
        arr = decode_image(frames[i], f"frame {meta.frame_names[i]!r} of {where}", max_pixels)
        if arr.shape[:2] != tuple(meta.sizes[i]):
            raise SampleError(
                f"Expected frame {meta.frame_names[i]!r} of {where} to be {meta.sizes[i]} "
                f"(H, W) as its metadata says, but got {arr.shape[:2]}."
            )
        if decoded and arr.shape[:2] != decoded[0].shape[:2]:
            raise SampleError(
                f"Expected all frames of {where} to have one size, but frame "
                f"{meta.frame_names[i]!r} is {arr.shape[:2]} and the first is {decoded[0].shape[:2]}."
            )
        decoded.append(arr)
    video = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
    label_tensor = None
    if labels:
        h, w = decoded[0].shape[:2]
        lab = np.full((n, h, w), IGNORE_INDEX, dtype=np.int64)
        for i, data in labels.items():
            if i >= n:
                ignored += 1
                continue
            arr = decode_label(data, f"label of frame {meta.frame_names[i]!r} of {where}", max_pixels)
            if arr.shape != (h, w):
                raise SampleError(
                    f"Expected the label of frame {meta.frame_names[i]!r} of {where} to be "
                    f"{(h, w)} like its frame, but got {arr.shape}."
                )
            lab[i] = arr
        label_tensor = torch.from_numpy(lab)
    return VideoSample(meta=meta, frames=video, labels=label_tensor, key=key, url=url, ignored_fields=ignored)


@dataclass
class FailedSample:
    """A sample that could not be read; handed on (not dropped) so the job records it as failed.

    Attributes:
        key: the tar key, if known.
        url: the shard it came from.
        error: the message (names the video/file and the fix).
        video_id: the video id if the metadata could be read, else None.
    """

    key: str
    url: str
    error: str
    video_id: str | None = None

    @property
    def where(self) -> str:
        vid = f"video {self.video_id!r} " if self.video_id else ""
        return f"{vid}(key {self.key!r} in shard {self.url!r})"
