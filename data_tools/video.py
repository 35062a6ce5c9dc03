"""Video files (mp4, avi, mkv, webm, mov): one video per file, decoded with PyAV.

`--root` is a video file or a folder of them (not searched recursively); the video id is the file's
stem. Frames are named by their index in the decoded stream (`000000`, `000003`, ...), so subsampled
frames keep their source position, and encoded as JPEG (quality 95) or PNG (`--image-format`).
`--fps F` keeps the first frame and then each frame that starts a new 1/F s slot of the presentation
time (a 30 fps video at `--fps 10` keeps every third frame); 0 keeps every frame. Frames are decoded
into a scratch folder next to the shards, one video at a time, so memory stays bounded.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Literal

import av

from .common import ConversionError, DatasetInfo, FrameSpec, Scan, VideoSpec, encode_image, natural_key

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def extract_frames(
    path: Path, fps: float, image_format: Literal["jpg", "png"], out_dir: Path
) -> list[FrameSpec]:
    """Decode a video file into encoded frame files.

    Args:
        path: the video file.
        fps: frames per second to keep (0: all).
        image_format: jpg (quality 95) or png.
        out_dir: the scratch folder for the frame files.

    Returns:
        The frames in order.

    Raises:
        ConversionError: naming the file if it has no video stream or cannot be decoded.
    """
    frames: list[FrameSpec] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ConversionError(f"Expected {path} to hold a video stream, but it has none.")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            start, next_slot = None, 0
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / (rate or 1.0)
                if fps > 0:
                    start = t if start is None else start
                    slot = (t - start) * fps + 1e-6
                    if slot < next_slot:
                        continue
                    next_slot = math.floor(slot) + 1
                name = f"{i:06d}"
                file = out_dir / f"{name}.{image_format}"
                file.write_bytes(encode_image(frame.to_image(), image_format))
                frames.append(FrameSpec(name, file))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ConversionError(
            f"Expected {path} to be a readable video file, but got {type(e).__name__}: {e}. "
            "Re-encode or remove the file."
        ) from e
    return frames


def scan(root: Path, fps: float = 0.0, image_format: Literal["jpg", "png"] = "jpg") -> Scan:
    """Scan a video file or a folder of video files.

    Args:
        root: a video file or a folder of them.
        fps: frames per second to keep (0: all).
        image_format: jpg (quality 95) or png.

    Raises:
        ConversionError: if `root` does not exist or `fps` is negative.
    """
    if fps < 0 or not math.isfinite(fps):
        raise ConversionError(f"Expected `--fps` to be >= 0 (0: every frame), but got {fps}.")
    if root.is_file():
        files, ignored = [root], []
    elif root.is_dir():
        entries = sorted(
            (p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")),
            key=lambda p: natural_key(p.name),
        )
        files = [p for p in entries if p.suffix.lower() in VIDEO_EXTS]
        ignored = [str(p) for p in entries if p.suffix.lower() not in VIDEO_EXTS]
    else:
        raise ConversionError(f"Expected `--root` to be a video file or a folder, but got {str(root)!r}.")
    videos = [
        VideoSpec(p.stem, origin=str(p), extract=partial(extract_frames, p, fps, image_format)) for p in files
    ]
    return Scan(DatasetInfo("video"), videos, ignored_files=ignored)
