"""Folders of frames: one video per sub-folder of `--root` (or `--root` itself if it holds the images).

Frames are the image files of the folder in natural name order (`f9` before `f10`); jpg, jpeg, png and
webp are stored byte for byte, bmp and tif are re-encoded (`--image-format`). Optional labels: `--labels
DIR` with the same structure, `<video>/<frame>.png` (single-channel class ids, stored as they are; 255
is ignore). Files that are not images are listed in the manifest as ignored.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    ConversionError,
    DatasetInfo,
    FrameSpec,
    Problem,
    Scan,
    VideoSpec,
    list_images,
    natural_key,
)


def scan(root: Path, labels: Path | None = None) -> Scan:
    """Scan a folder of frame folders.

    Args:
        root: a folder with one sub-folder of frames per video, or a single folder of frames.
        labels: a folder with the same structure holding `<frame>.png` label maps, or None.

    Raises:
        ConversionError: if `root` or `labels` is not a folder, or `root` mixes frames and sub-folders.
    """
    for what, folder in (("--root", root), ("--labels", labels)):
        if folder is not None and not folder.is_dir():
            raise ConversionError(f"Expected `{what}` to be a folder, but got {str(folder)!r}.")
    subdirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: natural_key(d.name),
    )
    images, others = list_images(root)
    if images and subdirs:
        raise ConversionError(
            f"Expected {root} to hold either one folder per video or the frames of one video, but it holds "
            f"both (e.g. {images[0].name!r} and {subdirs[0].name!r}/). Move the frames into a folder."
        )
    if not images and not subdirs:
        raise ConversionError(
            f"Expected {root} to hold one folder of frames per video, or frames, but it has neither."
        )
    ignored = [str(p) for p in others]
    if images or not subdirs:
        pairs = [(root, labels)]
    else:
        pairs = [(d, labels / d.name if labels is not None else None) for d in subdirs]
    problems: list[Problem] = []
    videos = []
    for video_dir, label_dir in pairs:
        frames, others = list_images(video_dir)
        if video_dir != root:
            ignored.extend(str(p) for p in others)
        by_stem: dict[str, Path] = {}
        if label_dir is not None and label_dir.is_dir():
            label_files, label_others = list_images(label_dir)
            ignored.extend(str(p) for p in label_others)
            by_stem = {p.stem: p for p in label_files}
        specs = [FrameSpec(p.stem, p, by_stem.pop(p.stem, None)) for p in frames]
        problems.extend(
            Problem(
                str(p), f"Expected a frame named {stem!r} in {video_dir} for label file {p}, but found none."
            )
            for stem, p in sorted(by_stem.items())
        )
        videos.append(VideoSpec(video_dir.name, specs, origin=str(video_dir)))
    if labels is not None:
        known = {v.video_id for v in videos}
        for d in sorted(labels.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and d.name not in known and subdirs:
                problems.append(
                    Problem(
                        str(d),
                        f"Expected a frame folder {root / d.name} for label folder {d}, but found none.",
                    )
                )
    return Scan(DatasetInfo("frames"), videos, problems, ignored)
