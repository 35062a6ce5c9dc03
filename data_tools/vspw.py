"""VSPW (480p or full resolution): one video per entry of `<split>.txt`.

Layout under `--root`: `data/<video>/origin/<frame>.jpg`, `data/<video>/mask/<frame>.png` (same
stem; the test split has no masks) and `train.txt`, `val.txt`, `test.txt` (one video name a line).
Frames are stored as their original JPEG bytes. Masks are remapped as the VSPW README recommends:
raw 0 ("others") and 255 (void) -> 255, raw k in 1..124 -> k - 1 (124 classes). Class names come from
`label_num_dic_final.json` at the root when present.
"""

from __future__ import annotations

import json
from pathlib import Path

from vss_lightning.data.format import SampleError, validate_name

from .common import (
    ConversionError,
    DatasetInfo,
    FrameSpec,
    Problem,
    Scan,
    VideoSpec,
    ignore_lut,
    list_images,
    lut_label_fn,
)

NUM_CLASSES = 124
SPLITS = ("train", "val", "test")

LUT = ignore_lut({k: k - 1 for k in range(1, NUM_CLASSES + 1)})
for _v in range(NUM_CLASSES + 1, 255):
    LUT[_v] = -1  # VSPW masks hold 0..124 and 255 only


def _class_names(path: Path) -> list[str] | None:
    """Read `label_num_dic_final.json` ({name: raw id} or {raw id: name}); None if absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        pairs = [(int(v), str(k)) if isinstance(v, int) else (int(k), str(v)) for k, v in data.items()]
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ConversionError(
            f"Expected {path} to map VSPW class names to raw ids, but got {type(e).__name__}: {e}. "
            "Fix or remove the file (class names are optional)."
        ) from e
    by_id = dict(pairs)
    missing = [k for k in range(1, NUM_CLASSES + 1) if k not in by_id]
    if missing:
        raise ConversionError(
            f"Expected {path} to name the raw ids 1..{NUM_CLASSES}, but ids {missing[:5]} are missing. "
            "Fix or remove the file (class names are optional)."
        )
    return [by_id[k] for k in range(1, NUM_CLASSES + 1)]


def scan(root: Path, split: str | None) -> Scan:
    """Scan a VSPW folder.

    Args:
        root: the dataset folder (holding `data/` and the split lists).
        split: train, val or test.

    Raises:
        ConversionError: if the split or its list is missing.
    """
    if split not in SPLITS:
        raise ConversionError(f"Expected `--split` to be one of {SPLITS} for VSPW, but got {split!r}.")
    split_file = root / f"{split}.txt"
    if not split_file.is_file() or not (root / "data").is_dir():
        raise ConversionError(
            f"Expected {root} to be a VSPW folder with `data/` and `{split}.txt`, but "
            f"{split_file if not split_file.is_file() else root / 'data'} does not exist."
        )
    info = DatasetInfo(
        "vspw", NUM_CLASSES, _class_names(root / "label_num_dic_final.json"),
        lut_label_fn(LUT, "VSPW ids 0..124 or 255"),
    )  # fmt: skip
    problems: list[Problem] = []
    ignored: list[str] = []
    videos = []
    seen: set[str] = set()
    for line_no, line in enumerate(split_file.read_text().splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            problems.append(
                Problem(
                    name, f"Expected each video once in {split_file}, but {name!r} repeats on line {line_no}."
                )
            )
            continue
        seen.add(name)
        try:
            validate_name(name, f"video id on line {line_no} of {split_file}")
        except SampleError as e:
            problems.append(Problem(name, str(e)))
            continue
        video_dir = root / "data" / name
        if not (video_dir / "origin").is_dir():
            problems.append(
                Problem(
                    name,
                    f"Expected the frames of video {name!r} in {video_dir / 'origin'}, "
                    f"but that folder does not exist ({split_file}, line {line_no}).",
                )
            )
            continue
        frames, others = list_images(video_dir / "origin")
        ignored.extend(str(p) for p in others)
        masks: dict[str, Path] = {}
        if (video_dir / "mask").is_dir():
            mask_files, others = list_images(video_dir / "mask")
            ignored.extend(str(p) for p in others)
            masks = {p.stem: p for p in mask_files}
        specs = [FrameSpec(p.stem, p, masks.pop(p.stem, None)) for p in frames]
        if masks:
            path = next(iter(masks.values()))
            problems.append(
                Problem(
                    name,
                    f"Expected a frame in {video_dir / 'origin'} for every mask, but "
                    f"{len(masks)} mask(s) have none, e.g. {path}.",
                )
            )
            continue
        videos.append(VideoSpec(name, specs, origin=str(video_dir)))
    return Scan(info, videos, problems, ignored)
