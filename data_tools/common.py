"""What a source converter hands to the shard writer, and the small helpers the converters share.

A converter scans a dataset layout into a `Scan`: the videos (`VideoSpec`, each a list of `FrameSpec`
pointing at files on disk), the dataset facts (`DatasetInfo`: source, classes, how to turn a label
file into class ids) and the problems it found while scanning. The writer (`data_tools.writer`) then
checks, splits and stores every video.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from vss_lightning.data.format import DEFAULT_MAX_PIXELS, FRAME_EXTS, IGNORE_INDEX, SampleError, open_image

# Frame files the converters pick up. FRAME_EXTS are stored byte for byte; the others are decoded and
# re-encoded (see `--image-format`).
IMAGE_EXTS = tuple(f".{e}" for e in FRAME_EXTS) + (".bmp", ".tif", ".tiff")
# The PIL formats an input file may be, whatever its suffix: no other PIL plugin (EPS runs Ghostscript,
# ...) ever sees the bytes of a source folder.
SOURCE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")

JPEG_QUALITY = 95

LabelFn = Callable[[np.ndarray, Path], np.ndarray]


class ConversionError(Exception):
    """Bad input for a conversion; the message names the file or video and says how to fix it."""


@dataclass(frozen=True)
class FrameSpec:
    """One frame on disk.

    Attributes:
        name: the frame name stored in the shard (the source file's stem).
        path: the encoded frame file.
        label_path: the label file of this frame, or None if the frame has no label.
    """

    name: str
    path: Path
    label_path: Path | None = None


@dataclass
class VideoSpec:
    """One video of a source, before any file is read.

    Attributes:
        video_id: the video's name in the shards (checked with `format.validate_name`).
        frames: the frames in order.
        origin: where the video comes from (a folder or file), for messages.
        extract: for sources without frame files (video files): called with a scratch folder, it
            writes the frames there and returns them; `frames` is then ignored.
    """

    video_id: str
    frames: list[FrameSpec] = field(default_factory=list)
    origin: str = ""
    extract: Callable[[Path], list[FrameSpec]] | None = None


def plain_label_ids(array: np.ndarray, path: Path) -> np.ndarray:
    """Keep a single-channel label map's values as class ids.

    Args:
        array: the label image as `np.asarray(PIL.Image.open(path))` returns it.
        path: the label file, for messages.

    Returns:
        (H, W) uint8 (or uint16 when an id exceeds 255) class ids.

    Raises:
        ConversionError: if the label is not single-channel or has ids outside 0..65535.
    """
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ConversionError(
            f"Expected label file {path} to be a single-channel image of class ids, but got an array of "
            f"shape {array.shape} and dtype {array.dtype}. Convert colour-coded labels to ids first."
        )
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ConversionError(
            f"Expected the ids in label file {path} to lie in 0..65535, but got "
            f"{int(array.min())}..{int(array.max())}."
        )
    return array.astype(np.uint8 if not array.size or array.max() <= 255 else np.uint16)


@dataclass
class DatasetInfo:
    """Facts about a source that go into every sample's metadata.

    Attributes:
        source: the source's name (`meta.source`).
        num_classes: number of classes, if known.
        class_names: class names by id, if known.
        label_fn: turns a decoded label file into (H, W) class ids with 255 as ignore; raises
            `ConversionError` naming the file on values it cannot map.
    """

    source: str
    num_classes: int | None = None
    class_names: list[str] | None = None
    label_fn: LabelFn = plain_label_ids


@dataclass
class Problem:
    """Bad input found while scanning (handled by `--on-error`)."""

    item: str
    reason: str


@dataclass
class Scan:
    """The result of scanning a source layout.

    Attributes:
        info: the dataset facts.
        videos: the videos, in the order they are written.
        problems: bad input found while scanning; `--on-error fail` stops on the first, `skip` lists
            them in the manifest.
        ignored_files: files that are not part of the layout (not images, ...), listed in the manifest.
    """

    info: DatasetInfo
    videos: list[VideoSpec]
    problems: list[Problem] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically (`f9` before `f10`)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def list_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files and the other visible files of a folder, in natural order.

    Args:
        folder: the folder (not searched recursively).

    Returns:
        (image files, other files); hidden files (leading dot) and sub-folders are left out.
    """
    images, others = [], []
    for p in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if p.name.startswith(".") or p.is_dir():
            continue
        (images if p.suffix.lower() in IMAGE_EXTS else others).append(p)
    return images, others


_RAISE = "Raise `--data.max_pixels` if the image is genuine."
_RESIZE = "Resize it: `vss-lightning` refuses larger frames unless `--data.max_pixels` is raised."


def open_source_image(data: bytes, path: Path) -> Image.Image:
    """Open an input image from its header: one of `SOURCE_FORMATS`, at most `DEFAULT_MAX_PIXELS` pixels
    (what the reader accepts by default), checked before anything is decoded.

    Raises:
        ConversionError: naming the file, if it is not such an image.
    """
    try:
        return open_image(data, f"image file {path}", DEFAULT_MAX_PIXELS, SOURCE_FORMATS)
    except SampleError as e:
        raise ConversionError(str(e).replace(_RAISE, _RESIZE)) from e


def read_label(path: Path) -> np.ndarray:
    """Decode a label file without any colour conversion (palette PNGs keep their indices).

    Raises:
        ConversionError: if the file cannot be read or decoded.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConversionError(f"Expected label file {path} to be readable, but got {e}.") from e
    try:
        with open_source_image(data, path) as img:
            img.load()
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise ConversionError(
            f"Expected label file {path} to be a readable image, but got {type(e).__name__}: {e}. "
            "Re-export or remove the file."
        ) from e


def lut_label_fn(lut: Sequence[int], what: str) -> LabelFn:
    """A `LabelFn` that maps 8-bit label ids through a lookup table.

    Args:
        lut: 256 entries, the new id for each raw id; -1 marks raw ids that must not occur.
        what: the dataset's label convention, for messages (e.g. "VSPW ids 0..124 or 255").
    """
    table = np.asarray(lut, dtype=np.int64)
    if table.shape != (256,):
        raise ValueError(f"Expected `lut` to have 256 entries, but got {table.shape}.")

    def apply(array: np.ndarray, path: Path) -> np.ndarray:
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ConversionError(
                f"Expected label file {path} to be a single-channel image of {what}, but got an array "
                f"of shape {array.shape} and dtype {array.dtype}."
            )
        values = np.unique(array)
        bad = [int(v) for v in values if v < 0 or v > 255 or table[v] < 0]
        if bad:
            raise ConversionError(
                f"Expected label file {path} to hold {what}, but got the values {bad[:10]}. "
                "Check that the labels belong to this dataset."
            )
        return table[array].astype(np.uint8)

    return apply


def ignore_lut(valid: dict[int, int]) -> list[int]:
    """A 256-entry table mapping the keys of `valid` to its values and every other id to 255."""
    return [valid.get(i, IGNORE_INDEX) for i in range(256)]


def encode_image(img: Image.Image, image_format: Literal["jpg", "png"]) -> bytes:
    """Encode a PIL image as RGB JPEG (quality `JPEG_QUALITY`) or PNG."""
    buf = io.BytesIO()
    if image_format == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
