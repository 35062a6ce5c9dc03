"""CamVid: one video per driving sequence, frames in frame order.

Layouts (detected under `--root`):

- SegNet 11-class release: `<split>/` and `<split>annot/` (`--split train|val|test`), frames
  `<sequence>_<frame>.png`, labels with the same name holding ids 0..10 and 11 = void (written as 255).
- Original 32-colour release: `701_StillsRaw_full/` + `LabeledApproved_full/<name>_L.png`, or the
  split layout `<split>/` + `<split>_labels/<name>_L.png` (`--split`); RGB colours are mapped to ids with
  the official table below (31 classes; Void -> 255). A colour not in the table is an error naming the file.
- Flat: `<sequence>/images/*.png` + `<sequence>/labels/*.png`, one video per sequence folder (or
  `images/` + `labels/` directly under `--root`, e.g. `../shared/data/camvid/0006R0`); labels are
  11-class ids, or colour-coded if the first label file is RGB.

Frames keep their names (`0006R0_f00930`); a frame without a label is stored unlabelled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vss_lightning.data.format import IGNORE_INDEX

from .common import (
    SOURCE_FORMATS,
    ConversionError,
    DatasetInfo,
    FrameSpec,
    LabelFn,
    Problem,
    Scan,
    VideoSpec,
    ignore_lut,
    list_images,
    lut_label_fn,
    natural_key,
)

CLASSES_11 = [
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign_symbol", "fence", "car", "pedestrian", "bicyclist",
]  # fmt: skip

# The official CamVid colour table (label_colors.txt of the CamVid release,
# http://mi.eng.cam.ac.uk/research/projects/VideoRec/CamVid/), as mirrored in
# github.com/Haitaoshang/Bayesian-Network-for-Semantic-Segmentation/blob/eb2ca06/label_colors.txt
# (identical copy: github.com/francescomucciolo4/Semantic-Segmentation-per-Scene-Understanding-in-
# Autonomous-Driving/blob/ed3019a/label_colors.txt). 32 colours: 31 classes (ids in table order) + Void.
COLORS_32: list[tuple[tuple[int, int, int], str]] = [
    ((64, 128, 64), "Animal"), ((192, 0, 128), "Archway"), ((0, 128, 192), "Bicyclist"),
    ((0, 128, 64), "Bridge"), ((128, 0, 0), "Building"), ((64, 0, 128), "Car"),
    ((64, 0, 192), "CartLuggagePram"), ((192, 128, 64), "Child"), ((192, 192, 128), "Column_Pole"),
    ((64, 64, 128), "Fence"), ((128, 0, 192), "LaneMkgsDriv"), ((192, 0, 64), "LaneMkgsNonDriv"),
    ((128, 128, 64), "Misc_Text"), ((192, 0, 192), "MotorcycleScooter"), ((128, 64, 64), "OtherMoving"),
    ((64, 192, 128), "ParkingBlock"), ((64, 64, 0), "Pedestrian"), ((128, 64, 128), "Road"),
    ((128, 128, 192), "RoadShoulder"), ((0, 0, 192), "Sidewalk"), ((192, 128, 128), "SignSymbol"),
    ((128, 128, 128), "Sky"), ((64, 128, 192), "SUVPickupTruck"), ((0, 0, 64), "TrafficCone"),
    ((0, 64, 64), "TrafficLight"), ((192, 64, 128), "Train"), ((128, 128, 0), "Tree"),
    ((192, 128, 192), "Truck_Bus"), ((64, 0, 64), "Tunnel"), ((192, 192, 0), "VegetationMisc"),
    ((0, 0, 0), "Void"), ((64, 192, 0), "Wall"),
]  # fmt: skip
CLASSES_32 = [name for _, name in COLORS_32 if name != "Void"]

ID_LUT_11 = ignore_lut({i: i for i in range(11)})
for _v in range(12, 255):
    ID_LUT_11[_v] = -1  # only 0..10, 11 (void) and 255 may occur


def colour_label_ids(array: np.ndarray, path: Path) -> np.ndarray:
    """Map an RGB CamVid label to the 31 class ids (table order), Void to 255.

    Raises:
        ConversionError: if the label is not RGB or holds a colour that is not in the table.
    """
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ConversionError(
            f"Expected label file {path} to be an RGB colour-coded CamVid label, but got an array of "
            f"shape {array.shape} and dtype {array.dtype}."
        )
    rgb = array[..., :3].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = np.array([(r << 16) | (g << 8) | b for (r, g, b), _ in COLORS_32])
    ids = np.array([IGNORE_INDEX if n == "Void" else CLASSES_32.index(n) for _, n in COLORS_32])
    order = np.argsort(table)
    pos = np.clip(np.searchsorted(table[order], codes), 0, len(table) - 1)
    known = table[order][pos] == codes
    if not known.all():
        bad = np.unique(codes[~known])[:5]
        colours = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in bad]
        raise ConversionError(
            f"Expected every colour of label file {path} to be in the CamVid colour table, but got "
            f"{colours} ({int((~known).sum())} pixels). Check that the file is a CamVid label."
        )
    return ids[order][pos].astype(np.uint8)


def _group(frames: list[Path], labels: dict[str, Path], problems: list[Problem]) -> list[VideoSpec]:
    """Group `<sequence>_<frame>` files into one video per sequence, in natural frame order."""
    by_seq: dict[str, list[FrameSpec]] = {}
    for p in frames:
        seq, sep, _ = p.stem.partition("_")
        if not sep or not seq:
            problems.append(
                Problem(
                    str(p),
                    f"Expected CamVid frame {p} to be named <sequence>_<frame>.png, but it has no '_'. "
                    "Rename it or leave it out.",
                )
            )
            continue
        by_seq.setdefault(seq, []).append(FrameSpec(p.stem, p, labels.pop(p.stem, None)))
    problems.extend(_orphans(labels))
    return [
        VideoSpec(seq, sorted(fs, key=lambda f: natural_key(f.name)), origin=f"{seq} in {fs[0].path.parent}")
        for seq, fs in sorted(by_seq.items())
    ]


def _orphans(labels: dict[str, Path]) -> list[Problem]:
    return [
        Problem(str(path), f"Expected a frame named {stem!r} for label file {path}, but found none.")
        for stem, path in sorted(labels.items())
    ]


def _labels_by_stem(folder: Path, suffix: str, ignored: list[str]) -> dict[str, Path]:
    images, others = list_images(folder)
    ignored.extend(str(p) for p in others)
    out = {}
    for p in images:
        stem = p.stem[: -len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem
        out[stem] = p
    return out


def _flat_label_kind(label_dirs: list[Path]) -> tuple[LabelFn, int, list[str]]:
    for d in label_dirs:
        images, _ = list_images(d)
        if images:
            try:
                with Image.open(images[0], formats=list(SOURCE_FORMATS)) as img:
                    rgb = img.mode in ("RGB", "RGBA")
            except (OSError, Image.DecompressionBombError) as e:
                raise ConversionError(f"Expected label file {images[0]} to be readable, but got {e}.") from e
            if rgb:
                return colour_label_ids, len(CLASSES_32), CLASSES_32
            break
    return lut_label_fn(ID_LUT_11, "CamVid 11-class ids 0..11 or 255"), len(CLASSES_11), CLASSES_11


def scan(root: Path, split: str | None = None) -> Scan:
    """Scan a CamVid folder (see the module docstring for the layouts).

    Args:
        root: the dataset folder.
        split: train, val or test for the split layouts; must be None for the others.

    Raises:
        ConversionError: if no known layout is found or `split` does not fit the layout.
    """
    problems: list[Problem] = []
    ignored: list[str] = []
    ids_11 = lut_label_fn(ID_LUT_11, "CamVid 11-class ids 0..11 or 255")
    if split is not None and (root / split).is_dir() and (root / f"{split}annot").is_dir():
        frames, others = list_images(root / split)
        ignored.extend(str(p) for p in others)
        labels = _labels_by_stem(root / f"{split}annot", "", ignored)
        info = DatasetInfo("camvid", len(CLASSES_11), CLASSES_11, ids_11)
    elif split is not None and (root / split).is_dir() and (root / f"{split}_labels").is_dir():
        frames, others = list_images(root / split)
        ignored.extend(str(p) for p in others)
        labels = _labels_by_stem(root / f"{split}_labels", "_L", ignored)
        info = DatasetInfo("camvid", len(CLASSES_32), CLASSES_32, colour_label_ids)
    elif split is not None:
        raise ConversionError(
            f"Expected {root} to hold `{split}/` with `{split}annot/` (SegNet) or `{split}_labels/`, but "
            "it does not. Drop `--split` for the original or the flat layout."
        )
    elif (root / "LabeledApproved_full").is_dir():
        frames, others = list_images(root / "701_StillsRaw_full")
        ignored.extend(str(p) for p in others)
        labels = _labels_by_stem(root / "LabeledApproved_full", "_L", ignored)
        info = DatasetInfo("camvid", len(CLASSES_32), CLASSES_32, colour_label_ids)
    else:
        seq_dirs = (
            [root]
            if (root / "images").is_dir()
            else sorted(
                (d for d in root.iterdir() if (d / "images").is_dir()), key=lambda d: natural_key(d.name)
            )
        )
        if not seq_dirs:
            raise ConversionError(
                f"Expected {root} to hold a CamVid layout (`<split>/` + `<split>annot/` with `--split`, "
                "`701_StillsRaw_full/` + `LabeledApproved_full/`, or `<sequence>/images/` + "
                "`<sequence>/labels/`), but found none of them."
            )
        label_fn, num_classes, names = _flat_label_kind([d / "labels" for d in seq_dirs])
        info = DatasetInfo("camvid", num_classes, names, label_fn)
        videos = []
        for d in seq_dirs:  # one video per sequence folder, whatever its file names
            frames, others = list_images(d / "images")
            ignored.extend(str(p) for p in others)
            labels = _labels_by_stem(d / "labels", "_L", ignored) if (d / "labels").is_dir() else {}
            specs = [FrameSpec(p.stem, p, labels.pop(p.stem, None)) for p in frames]
            problems.extend(_orphans(labels))
            videos.append(VideoSpec(d.name, specs, origin=str(d / "images")))
        return Scan(info, videos, problems, ignored)
    return Scan(info, _group(frames, labels, problems), problems, ignored)
