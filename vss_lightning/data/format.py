"""The one definition of the shard sample schema, shared by `data_tools` (writing) and the DataModule
(reading).

A sample is one video, or one clip of a long video. In the tar file its members are::

    <key>.meta.json          JSON metadata (see `VideoMeta`)
    <key>.00000.jpg          frame 0, encoded as stored (jpg, jpeg, png or webp)
    <key>.00000.label.png    label of frame 0 (uint8 or uint16 single-channel PNG), where it exists
    <key>.00001.jpg          ...

WebDataset groups members by the part of the base name before its first dot, so `<key>` has no dot
(`sample_key`). Only these fields are ever decoded; any other member (a pickle, a `.pth`, ...) is
ignored and counted in `VideoSample.ignored_fields`, never read or deserialised.

Limits on untrusted shards (each failure fails that sample with a `SampleError`, never the job):
`meta.json` at most `MAX_META_BYTES`; names from the data checked by `validate_name`; images opened
only as JPEG/PNG/WebP (labels PNG) and refused from their header above `max_pixels`; at most
`max_frames` frames and `max_sample_pixels` pixels (all frames together) per sample, checked from
the metadata before anything is decoded. `data.reader` checks member sizes from the tar headers
(`field_byte_limit`) before it reads them.

Label maps use 255 as the ignore index in every dataset.

Length: over 400 lines because the schema is one concept that writer and reader must agree on: the
metadata record, the encoders and the bounded decoders live together so they cannot drift apart.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import warnings
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
DEFAULT_MAX_SAMPLE_PIXELS = 1 << 30  # frames x H x W of one sample: ~500 frames of 1080p, 128 of 4K
MAX_NAME_LENGTH = 200  # UTF-8 bytes of a name from the data
# UTF-8 bytes of an output file name: a data name plus a suffix such as ".preview.png" fits, and so
# does its temporary name `.<name>.<pid>.tmp` within the 255 bytes of common file systems.
MAX_OUTPUT_NAME_LENGTH = 240
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{i}" for p in ("COM", "LPT") for i in "123456789¹²³"]
)
PREVIEW_SUFFIX = ".preview"  # `<frame>.preview.png` is the preview of `<frame>`: no frame may end so
MAX_META_BYTES = 32 << 20  # > 100_000 frame names of 200 characters with their sizes
MAX_CLIPS = 100_000
FRAME_FORMATS = ("JPEG", "PNG", "WEBP")  # PIL formats tried on a frame (no EPS, ... plugin ever runs)
LABEL_FORMATS = ("PNG",)
_IMAGE_BYTES_PER_PIXEL = 8  # the most an encoded image needs per pixel (uncompressed 16-bit RGBA PNG)

_FRAME_RE = re.compile(r"^(\d{5,6})\.(jpg|jpeg|png|webp)$")
_LABEL_RE = re.compile(r"^(\d{5,6})\.label\.png$")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class SampleError(ValueError):
    """A sample (video) that cannot be used: the message names the shard, the video and the fix."""


@dataclass(frozen=True)
class Refused:
    """A field the shard reader left unread (`reason`: too large, repeated); its sample fails."""

    reason: str


def is_schema_field(name: str) -> bool:
    """Whether a field name (the part of a tar member name after the key) belongs to the schema."""
    return name == "meta.json" or bool(_FRAME_RE.match(name) or _LABEL_RE.match(name))


def field_byte_limit(name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The most bytes a schema field may hold: `MAX_META_BYTES` for `meta.json`, else what an image of
    `max_pixels` pixels can need encoded (8 bytes per pixel plus 1 MiB)."""
    return MAX_META_BYTES if name == "meta.json" else _IMAGE_BYTES_PER_PIXEL * max_pixels + (1 << 20)


def validate_name(name: Any, what: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """Check that a name taken from data can be used as one path component.

    Refuses separators, `.`/`..`, absolute paths, control characters, a leading dot, names longer
    than `max_length` UTF-8 bytes, and names that are not portable or would share a path with an
    output of another name: not NFC-normalised, a trailing dot or space, a Windows device name
    (`CON`, `nul.txt`, `COM1`, ...), or ending in `.preview` (any case; the writer's
    `<frame>.preview.png` previews live next to the `<frame>.png` labels).

    Args:
        name: the value read from the data (a video id, a frame name, ...).
        what: what the name is, for the error message (e.g. "video id").
        max_length: the most UTF-8 bytes (`MAX_OUTPUT_NAME_LENGTH` for an output file name made
            from a data name).

    Returns:
        The name unchanged.

    Raises:
        SampleError: if the name is not a safe single path component.
    """
    problem = None
    if not isinstance(name, str):
        problem = f"a string, but got {type(name).__name__} {name!r}"
    elif not name or len(name.encode("utf-8", "surrogatepass")) > max_length:
        size = len(name.encode("utf-8", "surrogatepass"))
        problem = f"1 to {max_length} bytes long (UTF-8), but got {size} bytes ({name[:40]!r})"
    elif "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        problem = f"a plain file name (no '/', '\\\\', leading '.' or '..'), but got {name!r}"
    elif any(unicodedata.category(c)[0] == "C" for c in name):
        problem = f"free of control characters, but got {name!r}"
    elif ":" in name and len(name) > 1 and name[1] == ":":
        problem = f"a relative name (no drive letter), but got {name!r}"
    elif unicodedata.normalize("NFC", name) != name:  # two spellings of one name must not be two folders
        problem = f"NFC-normalised Unicode (`unicodedata.normalize('NFC', name)`), but got {name!r}"
    elif name.endswith((".", " ")):
        problem = f"free of a trailing dot or space (Windows drops them), but got {name!r}"
    elif name.split(".", 1)[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        problem = f"not a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9), but got {name!r}"
    elif name.lower().endswith(PREVIEW_SUFFIX):
        problem = (
            f"free of the suffix {PREVIEW_SUFFIX!r} (`<frame>.preview.png` is a preview), but got {name!r}"
        )
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
        """Parse and check a `meta.json` record read from a shard (untrusted).

        Raises:
            SampleError: if it is larger than `MAX_META_BYTES`, not valid JSON of this schema, or holds
                unsafe names or out-of-range values.
        """
        if not isinstance(data, (bytes, str)):
            reason = data.reason if isinstance(data, Refused) else f"it is a {type(data).__name__}"
            raise SampleError(
                f"Expected `meta.json` of {where} to be read, but it was not: {reason}. Rebuild the shard "
                "with `python -m data_tools` (long videos: `--max-frames-per-clip N`)."
            )
        if len(data) > MAX_META_BYTES:
            raise SampleError(
                f"Expected `meta.json` of {where} to be at most {MAX_META_BYTES} bytes, but got {len(data)}. "
                "Split the video into clips with `python -m data_tools ... --max-frames-per-clip N`."
            )
        try:
            d = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
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
            if not isinstance(meta.frame_names, list):
                raise TypeError(f"frame_names must be a list, not {type(meta.frame_names).__name__}")
            meta.sizes = [(int(h), int(w)) for h, w in meta.sizes]
            meta.labelled = [int(i) for i in meta.labelled]
            meta.label_set = [int(i) for i in meta.label_set]
            _check_fields(meta)
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


def _check_fields(meta: VideoMeta) -> None:
    """Types and ranges of the scalar fields (they steer clip handling and output files)."""

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not (is_int(meta.num_clips) and 1 <= meta.num_clips <= MAX_CLIPS):
        raise ValueError(f"num_clips must be an integer in [1, {MAX_CLIPS}], not {meta.num_clips!r}")
    if not (is_int(meta.clip_index) and 0 <= meta.clip_index < meta.num_clips):
        raise ValueError(f"clip_index must be an integer in [0, num_clips), not {meta.clip_index!r}")
    if not (is_int(meta.frame_offset) and meta.frame_offset >= 0):
        raise ValueError(f"frame_offset must be an integer >= 0, not {meta.frame_offset!r}")
    if meta.num_classes is not None and not (is_int(meta.num_classes) and meta.num_classes >= 1):
        raise ValueError(f"num_classes must be a positive integer or null, not {meta.num_classes!r}")
    if not isinstance(meta.source, str):
        raise TypeError(f"source must be a string, not {type(meta.source).__name__}")
    names = meta.class_names
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise TypeError("class_names must be a list of strings or null")
    if any(h < 1 or w < 1 for h, w in meta.sizes):
        raise ValueError("sizes must be positive (height, width) pairs")


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


def open_image(
    data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS, formats: tuple[str, ...] = FRAME_FORMATS
) -> Image.Image:
    """Open an encoded image from its header only, refusing other formats and sizes over `max_pixels`.

    Nothing is decoded here: the pixel count comes from the header, so an image that declares a huge
    size in a tiny file (a decompression bomb) is refused at once with little memory.

    Args:
        data: the encoded bytes.
        what: the image, for messages (e.g. "frame '00001' of video 'a' (...)").
        max_pixels: the largest width * height accepted.
        formats: the PIL formats tried (no other PIL plugin ever sees the bytes).

    Returns:
        The opened (not yet decoded) image.

    Raises:
        SampleError: if the bytes are not an image of `formats`, or it has more than `max_pixels` pixels.
    """
    too_big = "Raise `--data.max_pixels` if the image is genuine."
    try:
        with warnings.catch_warnings():  # our own limit is checked below; PIL's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as e:  # over 2 * PIL.Image.MAX_IMAGE_PIXELS: PIL refuses too
        raise SampleError(
            f"Expected {what} to be at most {max_pixels} pixels, but its header declares more: {e} "
            f"{too_big} (PIL refuses images above 2 * PIL.Image.MAX_IMAGE_PIXELS in any case.)"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise SampleError(
            f"Expected {what} to be a readable {'/'.join(formats)} image, but got {type(e).__name__}: {e}. "
            "Re-encode or remove the file."
        ) from e
    w, h = img.size
    if w * h > max_pixels:
        raise SampleError(
            f"Expected {what} to be at most {max_pixels} pixels, but its header declares {w}x{h} = {w * h}. "
            f"{too_big}"
        )
    return img


def decode_image(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded frame to an (H, W, 3) uint8 RGB array, checking its size from the header."""
    img = open_image(data, what, max_pixels, FRAME_FORMATS)
    try:
        return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise SampleError(
            f"Expected {what} to decode, but got {type(e).__name__}: {e}. Re-encode or remove the file."
        ) from e


def decode_label(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a single-channel label PNG to an (H, W) int64 array (palette indices kept as ids)."""
    img = open_image(data, what, max_pixels, LABEL_FORMATS)
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
    max_sample_pixels: int = DEFAULT_MAX_SAMPLE_PIXELS,
) -> VideoSample:
    """Decode one raw sample (bytes by field, as `data.reader.tar_samples` yields it) into a `VideoSample`.

    Only the schema's fields are decoded; others are counted and ignored (`__ignored__` holds the
    count of those the reader left unread). The frame count, each frame's size and the sample's total
    pixels are checked from the metadata before any image is decoded. Every failure raises
    `SampleError` naming the shard and video.
    """
    key = str(raw.get("__key__", ""))
    url = str(raw.get("__url__", ""))
    where = f"sample {key!r} of shard {url!r}"
    if "meta.json" not in raw:
        fields = sorted(k for k in raw if not k.startswith("__")) + list(raw.get("__ignored_names__", []))
        raise SampleError(
            f"Expected {where} to hold a `meta.json` field, but it has none (fields: {fields[:8]}). "
            "Make the shards with `python -m data_tools`."
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
    h, w = meta.sizes[0]
    if any(size != (h, w) for size in meta.sizes):
        raise SampleError(
            f"Expected all frames of {where} to have one size, but its metadata lists "
            f"{sorted(set(meta.sizes))[:3]} (H, W). Rebuild the shard with data_tools."
        )
    if h * w > max_pixels:
        raise SampleError(
            f"Expected the frames of {where} to be at most {max_pixels} pixels, but its metadata says "
            f"{h}x{w} (H x W). Raise `--data.max_pixels` if the video is genuine."
        )
    if n * h * w > max_sample_pixels:
        raise SampleError(
            f"Expected {where} to hold at most {max_sample_pixels} pixels (all frames together), but it "
            f"has {n} frames of {h}x{w} = {n * h * w}. Split it into clips with `python -m data_tools ... "
            "--max-frames-per-clip N`, or raise `--data.max_sample_pixels` if memory allows."
        )
    frames: dict[int, bytes] = {}
    labels: dict[int, bytes] = {}
    ignored = int(raw.get("__ignored__", 0))
    for name, value in raw.items():
        if name.startswith("__") or name == "meta.json":
            continue
        m = _FRAME_RE.match(name) or _LABEL_RE.match(name)
        if m is None:
            ignored += 1
            continue
        if isinstance(value, Refused):
            raise SampleError(
                f"Expected field {name!r} of {where} to be read, but it was not: {value.reason}."
            )
        fields = frames if m.re is _FRAME_RE else labels
        if int(m.group(1)) in fields:
            raise SampleError(
                f"Expected one {'frame' if fields is frames else 'label'} per index in {where}, but "
                f"index {int(m.group(1))} has several (e.g. {name!r}). Rebuild the shard with data_tools."
            )
        fields[int(m.group(1))] = value
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
