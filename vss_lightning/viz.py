"""Pictures of labels: stable palettes, colour overlays on frames, and overlay videos.

Plain NumPy / Pillow / PyAV (no Lightning, no W&B), shared by the writer's `--write_previews` and
the W&B callback.

Palettes map a label id to an RGB colour, the same colour for the same id in every video and run:

- cluster ids (`label_mode: cluster`, or any dataset not listed below): `distinct_palette(256)`, a
  fixed sequence of 256 different colours picked greedily, each as far as possible (CIELAB distance)
  from black, white and the colours before it; ids above 255 wrap around;
- Cityscapes (19 train ids) and CamVid (11 classes): the datasets' official colours;
- VSPW (124 classes): VSPW publishes no palette, so its classes take the first 124 colours of
  `distinct_palette` (fixed, generated as above).

The ignore id 255 of a ground-truth map is drawn black by `colorize` and left uncoloured by
`overlay` when `ignore_index` is given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

VideoFormat = Literal["auto", "mp4", "gif"]

# Cityscapes train ids 0..18 (cityscapesScripts `labels.py`).
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
        (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
        (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)  # fmt: skip
# CamVid 11 classes (sky, building, pole, road, pavement, tree, sign_symbol, fence, car, pedestrian,
# bicyclist), coloured as in the official 32-class table of the CamVid release (label_colors.txt).
CAMVID_PALETTE = np.array(
    [
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
        (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ],
    dtype=np.uint8,
)  # fmt: skip
VSPW_NUM_CLASSES = 124
IGNORE_COLOUR = (0, 0, 0)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 sRGB -> (N, 3) CIELAB (D65)."""
    c = rgb.astype(np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


@lru_cache(maxsize=1)
def _distinct_256() -> np.ndarray:
    levels = np.linspace(0, 255, 16).round().astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)  # (4096, 3)
    lab = _srgb_to_lab(grid)
    seeds = _srgb_to_lab(np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8))
    dist = np.min(((lab[:, None] - seeds[None]) ** 2).sum(-1), 1)  # to the nearest colour taken
    picked = []
    for _ in range(256):
        i = int(np.argmax(dist))  # ties: the first candidate, so the sequence is fixed
        picked.append(i)
        dist = np.minimum(dist, ((lab - lab[i]) ** 2).sum(-1))
    out = grid[picked]
    out.flags.writeable = False
    return out


def distinct_palette(n: int = 256) -> np.ndarray:
    """The first `n` (<= 256) colours of the fixed distinct sequence, (n, 3) uint8.

    The sequence does not depend on `n`: colour `i` is the same for every `n > i`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 256:
        raise ValueError(f"Expected `n` to be an int in [1, 256], but got {n!r}.")
    return _distinct_256()[:n].copy()


def dataset_palette(source: str, num_classes: int | None) -> np.ndarray | None:
    """The official palette of a known dataset's class ids, or None.

    Args:
        source: the dataset (`VideoMeta.source`, e.g. "cityscapes", "camvid", "vspw").
        num_classes: its number of classes; a palette is returned only when it matches.

    Returns:
        (C, 3) uint8, or None for an unknown dataset or class count.
    """
    name = (source or "").lower()
    if name == "cityscapes" and num_classes == len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE.copy()
    if name == "camvid" and num_classes == len(CAMVID_PALETTE):
        return CAMVID_PALETTE.copy()
    if name == "vspw" and num_classes == VSPW_NUM_CLASSES:
        return distinct_palette(VSPW_NUM_CLASSES)
    return None


def palette_for(source: str = "", num_classes: int | None = None, label_mode: str = "cluster") -> np.ndarray:
    """The 256-colour lookup table for labels of one video.

    Labels are class ids only in `first_frame_gt` and `open_vocab` modes (and in ground truth); a
    known dataset's class ids then take its official colours. Cluster ids, and ids beyond a
    dataset's classes, take the fixed distinct colours.

    Args:
        source: the dataset name (`VideoMeta.source`).
        num_classes: the dataset's number of classes (`VideoMeta.num_classes`).
        label_mode: "cluster", "first_frame_gt" or "open_vocab" (`ZeroShotVSS.label_mode`); "gt" for
            ground truth.

    Returns:
        (256, 3) uint8: row `i` is the colour of id `i`; row 255 (the ignore id) is black for class
        ids.
    """
    table = distinct_palette(256)
    if label_mode in ("first_frame_gt", "open_vocab", "gt"):
        known = dataset_palette(source, num_classes)
        if known is not None:
            table[: len(known)] = known
        table[255] = IGNORE_COLOUR
    return table


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Colour a label map.

    Args:
        labels: (..., H, W) non-negative integer ids.
        palette: (N, 3) uint8 lookup table (default: `palette_for()`); ids wrap around modulo N.

    Returns:
        (..., H, W, 3) uint8 RGB.
    """
    table = palette_for() if palette is None else np.asarray(palette, dtype=np.uint8)
    ids = np.asarray(labels)
    if ids.size and int(ids.min()) < 0:
        raise ValueError(f"Expected non-negative label ids, but got {int(ids.min())}.")
    return table[ids.astype(np.int64) % len(table)]


def overlay(
    frame: np.ndarray,
    labels: np.ndarray,
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    ignore_index: int | None = None,
) -> np.ndarray:
    """Blend the colours of a label map over a frame.

    Args:
        frame: (H, W, 3) uint8 RGB (or (T, H, W, 3) with labels (T, H, W)).
        labels: (H, W) integer ids, the frame's size.
        palette: lookup table for `colorize`.
        alpha: weight of the label colours (0: the frame, 1: the colours only).
        ignore_index: pixels with this id keep the frame's colour.

    Returns:
        uint8 RGB of the frame's shape.
    """
    frame, labels = np.asarray(frame), np.asarray(labels)
    if frame.dtype != np.uint8 or frame.shape[-1] != 3 or frame.shape[:-1] != labels.shape:
        raise ValueError(
            "Expected `frame` to be (..., H, W, 3) uint8 RGB with `labels` (..., H, W) of the same size, "
            f"but got {frame.dtype} {frame.shape} and {labels.shape}."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Expected `alpha` to be in [0, 1], but got {alpha}.")
    colours = colorize(labels, palette).astype(np.float32)
    out = (1.0 - alpha) * frame.astype(np.float32) + alpha * colours
    if ignore_index is not None:
        keep = labels == ignore_index
        out[keep] = frame[keep]
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def resize_max(image: np.ndarray, max_size: int | None, nearest: bool = False) -> np.ndarray:
    """Shrink an (H, W[, 3]) image so that its longer side is at most `max_size` (never enlarges).

    Use `nearest=True` for label maps (ids are never blended).
    """
    if max_size is None or max(image.shape[:2]) <= max_size:
        return image
    h, w = image.shape[:2]
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if nearest and image.ndim == 2 and image.dtype != np.uint8:  # PIL's "I" mode keeps ids above 255
        return np.asarray(Image.fromarray(image.astype(np.int32)).resize(size, resample)).astype(image.dtype)
    return np.asarray(Image.fromarray(image).resize(size, resample))


@lru_cache(maxsize=1)
def _mp4_codec() -> str | None:
    """An H.264 (or MPEG-4 part 2) encoder of the installed PyAV, or None without PyAV."""
    try:
        import av
    except ImportError:
        return None
    codecs = av.codecs_available
    return next((c for c in ("libx264", "libopenh264", "h264", "mpeg4") if c in codecs), None)


def video_format(prefer: VideoFormat = "auto") -> Literal["mp4", "gif"]:
    """The overlay video format to use: mp4 when PyAV has an encoder for it, else GIF (Pillow)."""
    if prefer not in ("auto", "mp4", "gif"):
        raise ValueError(f"Expected `prefer` to be 'auto', 'mp4' or 'gif', but got {prefer!r}.")
    if prefer == "gif" or _mp4_codec() is None:
        return "gif"
    return "mp4"


class VideoWriter:
    """Writes RGB frames to an mp4 (PyAV, streamed) or GIF (Pillow) under a temporary name.

    The file appears under `path` only on `close()` (renamed from `.<name>.<pid>.part` in the same
    folder); `abort()` deletes the temporary file. GIF frames are kept in memory until `close()`.
    Frame sizes must not change; mp4 frames of odd size are padded by one pixel (yuv420p needs even
    sizes).

    Args:
        path: the final file; its suffix (.mp4 or .gif) picks the format.
        fps: frames per second.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 10.0) -> None:
        self.path = Path(path)
        if self.path.suffix not in (".mp4", ".gif"):
            raise ValueError(f"Expected `path` to end in .mp4 or .gif, but got {str(path)!r}.")
        if self.path.suffix == ".mp4" and _mp4_codec() is None:
            raise ValueError("Expected PyAV with an H.264 or MPEG-4 encoder to write .mp4; use .gif instead.")
        if not fps > 0:
            raise ValueError(f"Expected `fps` to be positive, but got {fps}.")
        self.fps = fps
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._gif: list[Image.Image] = []
        self._container: Any = None
        self._stream: Any = None

    def write(self, frames: np.ndarray | Iterable[np.ndarray]) -> None:
        """Append frames: (T, H, W, 3) uint8 or an iterable of (H, W, 3) uint8."""
        for frame in frames:
            frame = np.asarray(frame)
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"Expected (H, W, 3) uint8 frames, but got {frame.dtype} {frame.shape}.")
            if self._size is None:
                self._size = frame.shape[:2]
                if self.path.suffix == ".mp4":
                    self._open_mp4()
            elif frame.shape[:2] != self._size:
                raise ValueError(
                    f"Expected every frame of {self.path.name} to be {self._size}, but got {frame.shape[:2]}."
                )
            if self._container is not None:
                self._write_mp4(frame)
            else:
                self._gif.append(Image.fromarray(frame))
            self.frames += 1

    def _open_mp4(self) -> None:
        import av

        h, w = self._size
        self._container = av.open(str(self.tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream(_mp4_codec(), rate=round(self.fps))
        self._stream.width, self._stream.height = w + w % 2, h + h % 2
        self._stream.pix_fmt = "yuv420p"

    def _write_mp4(self, frame: np.ndarray) -> None:
        import av

        h, w = frame.shape[:2]
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)

    def close(self) -> Path | None:
        """Finish the file and rename it to `path`; returns `path`, or None when no frame came."""
        if self.frames == 0:
            self.abort()
            return None
        try:
            if self._container is not None:
                for packet in self._stream.encode():
                    self._container.mux(packet)
                self._container.close()
                self._container = None
            else:
                first, *rest = self._gif
                duration = max(20, round(1000 / self.fps))
                first.save(
                    self.tmp, format="GIF", save_all=True, append_images=rest, duration=duration, loop=0
                )
                self._gif = []
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file."""
        if self._container is not None:
            import av

            container, self._container = self._container, None
            try:
                container.close()
            except (av.FFmpegError, OSError) as e:  # the unfinished file is deleted below anyway
                logging.getLogger(__name__).debug(f"Closing the unfinished {self.tmp} failed: {e}")
        self._gif = []
        self.tmp.unlink(missing_ok=True)


def write_video(
    path: str | os.PathLike, frames: np.ndarray | Iterable[np.ndarray], fps: float = 10.0
) -> Path | None:
    """Write (T, H, W, 3) uint8 frames to `path` (.mp4 or .gif) through a temporary name."""
    writer = VideoWriter(path, fps)
    try:
        writer.write(frames)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
