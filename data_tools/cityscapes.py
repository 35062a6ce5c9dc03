"""Cityscapes: 30-frame video snippets (sequence release) or single annotated images.

Layouts under `--root` (`--split train|val|test`), the sequence release taking precedence:

- Sequence release: `leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png` with
  `gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`. One video per annotated frame f:
  the snippet f-19 .. f+10 (the annotated frame is the 20th of 30), id `<city>_<seq>_<f>`, labelled on
  that one frame. Several snippets of one city share the `<seq>` number with different frame numbers,
  so snippets are found from the annotations, not by `<seq>`. A snippet frame that is missing is an
  error naming the file; frames in no snippet are reported. Without `gtFine/<split>`, each run of
  consecutive frame numbers becomes one unlabelled video.
- Plain release: `leftImg8bit/<split>/<city>/*_leftImg8bit.png` + `gtFine`. Each annotated image is a
  1-frame video (id `<city>_<seq>_<frame>`): annotated images of one `<seq>` lie seconds apart, so
  grouping them would not make a video.

Labels are mapped from `labelIds` to the 19 train ids (all other ids -> 255) with an inline table
(cityscapesscripts `helpers/labels.py`).
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import (
    ConversionError,
    DatasetInfo,
    FrameSpec,
    Problem,
    Scan,
    VideoSpec,
    ignore_lut,
    lut_label_fn,
    natural_key,
)

SPLITS = ("train", "val", "test")
BEFORE, AFTER = 19, 10  # snippet frames before / after the annotated one
CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
]  # fmt: skip
LABEL_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
LUT = ignore_lut(LABEL_TO_TRAIN_ID)

_NAME = re.compile(
    r"^(?P<city>.+)_(?P<seq>\d{6})_(?P<frame>\d{6})_(?P<kind>leftImg8bit|gtFine_labelIds)\.png$"
)

_Index = dict[tuple[str, str], dict[int, Path]]


def _index(folder: Path, kind: str, problems: list[Problem], ignored: list[str]) -> _Index:
    """{(city, seq): {frame number: path}} of the `*_<kind>.png` files under `folder/<city>/`."""
    out: _Index = {}
    for city in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for p in sorted(city.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            m = _NAME.match(p.name)
            if m and m["kind"] == kind:
                out.setdefault((m["city"], m["seq"]), {})[int(m["frame"])] = p
            elif p.name.endswith(f"_{kind}.png"):
                problems.append(
                    Problem(
                        str(p),
                        f"Expected {p} to be named <city>_<seq:06d>_<frame:06d>_"
                        f"{kind}.png, but it is not. Rename it or leave it out.",
                    )
                )
            elif not (kind == "gtFine_labelIds" and "_gtFine_" in p.name):  # not color/instanceIds/...
                ignored.append(str(p))
    return out


def _runs(numbers: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def _frame(path: Path, label: Path | None = None) -> FrameSpec:
    return FrameSpec(path.stem, path, label)


def scan(root: Path, split: str | None) -> Scan:
    """Scan a Cityscapes folder (see the module docstring).

    Args:
        root: the dataset folder holding `leftImg8bit_sequence/` or `leftImg8bit/`, and `gtFine/`.
        split: train, val or test.

    Raises:
        ConversionError: if the split is unknown or no image folder exists for it.
    """
    if split not in SPLITS:
        raise ConversionError(f"Expected `--split` to be one of {SPLITS} for Cityscapes, but got {split!r}.")
    info = DatasetInfo("cityscapes", len(CLASSES), CLASSES, lut_label_fn(LUT, "Cityscapes labelIds"))
    problems: list[Problem] = []
    ignored: list[str] = []
    seq_dir, plain_dir, gt_dir = (root / d / split for d in ("leftImg8bit_sequence", "leftImg8bit", "gtFine"))
    labels = _index(gt_dir, "gtFine_labelIds", problems, ignored) if gt_dir.is_dir() else {}
    videos = []
    if seq_dir.is_dir():
        frames = _index(seq_dir, "leftImg8bit", problems, ignored)
        used: dict[tuple[str, str], set[int]] = {}
        for (city, seq), annotated in sorted(labels.items()):
            have = frames.get((city, seq), {})
            for f, label in sorted(annotated.items()):
                video_id = f"{city}_{seq}_{f:06d}"
                wanted = range(f - BEFORE, f + AFTER + 1)
                missing = [n for n in wanted if n not in have]
                if missing:
                    expected = seq_dir / city / f"{city}_{seq}_{max(missing[0], 0):06d}_leftImg8bit.png"
                    problems.append(
                        Problem(
                            video_id,
                            f"Expected the 30-frame snippet of annotated frame "
                            f"{label} to be complete, but {len(missing)} frame(s) "
                            f"are missing, e.g. {expected}.",
                        )
                    )
                    continue
                used.setdefault((city, seq), set()).update(wanted)
                specs = [_frame(have[n], label if n == f else None) for n in wanted]
                videos.append(VideoSpec(video_id, specs, origin=str(seq_dir / city)))
        for (city, seq), have in sorted(frames.items()):
            rest = [n for n in have if n not in used.get((city, seq), set())]
            for run in _runs(rest):
                video_id = f"{city}_{seq}_{run[0]:06d}"
                if labels:
                    problems.append(
                        Problem(
                            video_id,
                            f"Expected every frame to belong to an annotated "
                            f"snippet, but {have[run[0]]} .. {have[run[-1]].name} "
                            f"({len(run)} frames) have no annotation in {gt_dir}.",
                        )
                    )
                else:
                    specs = [_frame(have[n]) for n in run]
                    videos.append(VideoSpec(video_id, specs, origin=str(seq_dir / city)))
        videos.sort(key=lambda v: natural_key(v.video_id))
    elif plain_dir.is_dir():
        frames = _index(plain_dir, "leftImg8bit", problems, ignored)
        for (city, seq), have in sorted(frames.items()):
            annotated = labels.get((city, seq), {})
            for f, path in sorted(have.items()):
                specs = [_frame(path, annotated.pop(f, None))]
                videos.append(VideoSpec(f"{city}_{seq}_{f:06d}", specs, origin=str(path)))
        for annotated in labels.values():
            for path in annotated.values():
                problems.append(
                    Problem(
                        str(path), f"Expected an image in {plain_dir} for label file {path}, but found none."
                    )
                )
    else:
        raise ConversionError(
            f"Expected {root} to hold `leftImg8bit_sequence/{split}/` or `leftImg8bit/{split}/`, but "
            "neither exists."
        )
    return Scan(info, videos, problems, ignored)
