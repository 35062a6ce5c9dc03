"""Score predicted labels (png folders or label shards) against labelled shards.

    python -m vss_lightning.evaluate --pred DIR --gt shards/vspw-val [--num_classes 124]

`--gt` names the labelled shards as `--data.shards` does (`data.shards.resolve_shards`): a folder with
the `manifest.json` of data_tools, a brace pattern, a glob, a url, or several of these. `--num_classes`
defaults to the manifest's `num_classes`, else to the one the samples' metadata record; a value given
that disagrees with either is an error.

Predictions are read from `<pred>/<video_id>/<frame_name>.png` (single-channel uint8 or uint16; the
frame name comes from the shard's `meta.frame_names`), so labels written earlier, or by another tool,
can be scored; or, when `<pred>` holds label shards (`labels-rank*.tar` of `predict` or `vocabulary
apply` with `--output_format shards`), from their `<i>.label.png` members, read by offset (nothing is
extracted) and scored exactly as the same labels stored as png. A folder holding both kinds is
refused. Only the labelled frames of each video (`meta.labelled`, as VSPW counts frames with a mask
file) are read and scored; mVC_n uses them in order. Clips of one video are joined (in
`clip_index` order) before scoring, so per-video matching and mVC_n see the whole video.

The JSON result (printed, and written to `--out` if given) has `mIoU`, `pixel_acc`, `mVC8`, `mVC16`,
`per_class_iou` (null for classes absent from the ground truth), `frames`, `videos` (with a labelled
frame) and `missing` (predictions counted as wrong under `--missing as-wrong`); undefined values are
null.

Length: over 400 lines with its command line, the reading of predictions and the checks of every
input a user gives (each error names the file and the fix); the metrics themselves are in `metrics/`.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import sys
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from vss_lightning.clips import ClipAssembler, ClipOrderError
from vss_lightning.data.format import IGNORE_INDEX, VideoMeta, decode_sample
from vss_lightning.data.reader import tar_samples
from vss_lightning.data.shards import MANIFEST, dataset_info, resolve_shards
from vss_lightning.metrics import VideoSegmentationMetrics
from vss_lightning.vocabulary.corpus import LABEL_SHARDS, ShardVideo, tar_videos
from vss_lightning.vocabulary.sheet import class_ids_of_names

PRED_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")
GT_ARG = "--gt"


class EvaluationError(ValueError):
    """Input that cannot be scored; the message names the file and the fix."""


@dataclass
class LabelledVideo:
    """The labelled frames of one whole video.

    Attributes:
        video_id: the video's name.
        frame_names: names of the labelled frames, in order.
        labels: (T, H, W) int64 ground truth of those frames.
        where: the shards it came from, for messages.
        num_classes: the dataset's number of classes from the metadata, if recorded.
    """

    video_id: str
    frame_names: list[str]
    labels: torch.Tensor
    where: str
    num_classes: int | None = None


def _labelled_clip(
    meta: VideoMeta, labels: torch.Tensor | None, where: str
) -> tuple[list[str], torch.Tensor]:
    """Names and (T, H, W) label maps of the labelled frames of one clip, in frame order."""
    indices = sorted(set(meta.labelled))
    if indices and labels is None:
        raise EvaluationError(
            f"Expected {where} to hold label PNGs for its labelled frames {indices[:5]}, but it has none. "
            "Rebuild the shard with data_tools."
        )
    bad = [i for i in indices if not 0 <= i < len(meta.frame_names)]
    if bad:
        raise EvaluationError(
            f"Expected the labelled frame indices of {where} to be in [0, {len(meta.frame_names)}), but "
            f"got {bad[:5]}. Rebuild the shard with data_tools."
        )
    if not indices:
        return [], torch.zeros(0, 0, 0, dtype=torch.long)
    return [meta.frame_names[i] for i in indices], labels[indices]


def iter_labelled_videos(
    urls: Sequence[str], expected: Mapping[str, int] | None = None
) -> Iterator[LabelledVideo]:
    """Read shards and yield each whole video's labelled frames once all of its clips are read.

    Args:
        urls: the shard urls, in order.
        expected: samples per shard url as the manifests list them (`resolve_shards`), to catch a
            shard cut between two samples (which tar cannot detect).

    Raises:
        EvaluationError: if a video appears twice, some of its clips are missing from the shards, or a
            shard holds fewer samples than its manifest lists.
        SampleError: if a sample cannot be decoded (the message names the shard and video).
    """
    dataset = tar_samples(list(urls))  # only schema fields are read; shard errors propagate
    clips: ClipAssembler[tuple[list[str], torch.Tensor, str]] = ClipAssembler(any_order=True)
    done: set[str] = set()
    counts: dict[str, int] = {}
    for raw in dataset:
        counts[raw["__url__"]] = counts.get(raw["__url__"], 0) + 1
        sample = decode_sample(raw)
        meta, vid = sample.meta, sample.meta.video_id
        repeated = EvaluationError(
            f"Expected video {vid!r} clip {meta.clip_index} to occur once in the shards, but "
            f"{sample.where} repeats it. Remove the duplicate shard from `--gt`."
        )
        if vid in done:
            raise repeated
        try:
            runs = clips.add(meta, (*_labelled_clip(meta, sample.labels, sample.where), sample.where))
        except ClipOrderError as e:
            raise repeated from e
        for run in runs:
            done.add(vid)
            if not run.complete:
                raise EvaluationError(
                    f"Expected clips 0..{meta.num_clips - 1} of video {vid!r}, but got {run.clips}. "
                    "Rebuild the shards with data_tools."
                )
            names = [name for part in run.parts for name in part[0]]
            maps = [part[1] for part in run.parts if part[0]]
            if maps and len({tuple(m.shape[1:]) for m in maps}) > 1:
                raise EvaluationError(f"Expected all clips of video {vid!r} to have one frame size.")
            labels = torch.cat(maps) if maps else torch.zeros(0, 0, 0, dtype=torch.long)
            where = "; ".join(part[2] for part in run.parts)
            yield LabelledVideo(vid, names, labels, where, meta.num_classes)
    short = [(url, want) for url, want in (expected or {}).items() if counts.get(url, 0) < want]
    if short:
        url, want = short[0]
        raise EvaluationError(
            f"Expected shard {url!r} to hold {want} samples as its {MANIFEST} says, but only "
            f"{counts.get(url, 0)} could be read: the shard is truncated (or was rewritten after the "
            "manifest). Rebuild it with `python -m data_tools`."
        )
    pending = clips.pending()
    if pending:
        raise EvaluationError(
            f"Expected every clip of video {pending[0].video_id!r} in the shards, but only clips "
            f"{pending[0].clips} were found ({len(pending)} video(s) incomplete). Add the missing shards "
            "to `--gt`."
        )


def read_prediction(path: str, size: tuple[int, int]) -> np.ndarray | str:
    """Read one predicted label PNG.

    Args:
        path: the file.
        size: expected (H, W).

    Returns:
        (H, W) int64 ids, or a string saying why the prediction is missing or has the wrong size.

    Raises:
        EvaluationError: if the file exists but is not a readable single-channel image.
    """
    if not os.path.isfile(path):
        return "missing"
    return decode_prediction(path, size, repr(path))


def decode_prediction(source: str | bytes, size: tuple[int, int], what: str) -> np.ndarray | str:
    """Decode one predicted label PNG (a file, or the bytes of a label shard's member).

    Args:
        source: the file's path, or the encoded PNG.
        size: expected (H, W).
        what: names the prediction in messages (a quoted path, or the frame, video and tar).

    Returns:
        (H, W) int64 ids, or a string saying that the prediction has the wrong size.

    Raises:
        EvaluationError: if it is not a readable single-channel PNG.
    """
    try:  # the header; pixels only when mode and size fit
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=["PNG"]) as img:
            mode, got = img.mode, (img.height, img.width)
            array = np.asarray(img) if mode in PRED_MODES and got == tuple(size) else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise EvaluationError(
            f"Expected prediction {what} to be a readable PNG, but got {type(e).__name__}: {e}."
        ) from e
    if mode not in PRED_MODES:
        raise EvaluationError(
            f"Expected prediction {what} to be a single-channel uint8/uint16 PNG of ids, but got mode "
            f"{mode!r}. Save class (or cluster) ids, not colours."
        )
    if array is None:
        return f"size {got[0]}x{got[1]}, expected {size[0]}x{size[1]} (H x W)"
    return array.astype(np.int64)


@dataclass
class PngPredictions:
    """Predictions as `<root>/<video_id>/<frame_name>.png` (`--output_format png`)."""

    root: str

    def read(self, video_id: str, name: str, size: tuple[int, int]) -> tuple[np.ndarray | str, str]:
        """The (H, W) ids of one frame (or why they are missing), and how messages name the prediction."""
        path = os.path.join(self.root, video_id, f"{name}.png")
        return read_prediction(path, size), repr(path)


@dataclass
class ShardPredictions:
    """Predictions as the `<i>.label.png` members of label shards (`--output_format shards`).

    Attributes:
        root: the folder of the `labels-rank*.tar` files.
        videos: video id -> where its labels lie (`vocabulary.corpus.ShardVideo`).
    """

    root: str
    videos: dict[str, ShardVideo]

    def read(self, video_id: str, name: str, size: tuple[int, int]) -> tuple[np.ndarray | str, str]:
        """The (H, W) ids of one frame (or why they are missing), and how messages name the prediction."""
        video = self.videos.get(video_id)
        if video is None:
            return "missing", f"in the label shards {os.path.join(self.root, LABEL_SHARDS)!r}"
        where = f"in {str(video.tar)!r}"
        if name not in video.labels:
            return "missing", where
        try:
            data = video.label_bytes(name)
        except OSError as e:
            raise EvaluationError(
                f"Expected label shard {str(video.tar)!r} to be readable, but reading frame {name!r} of "
                f"video {video_id!r} failed: {e.strerror or e}. Rerun the `predict` that wrote it."
            ) from e
        return decode_prediction(data, size, f"{where} of frame {name!r} of video {video_id!r}"), where


Predictions = PngPredictions | ShardPredictions


def _png_video_folder(pred_dir: str) -> str | None:
    """The first subfolder of `pred_dir` that holds a `.png` file (a png video folder), if any."""
    with os.scandir(pred_dir) as entries:
        folders = sorted(e.path for e in entries if e.is_dir())
    for folder in folders:
        try:
            with os.scandir(folder) as files:
                if any(f.name.endswith(".png") and f.is_file() for f in files):
                    return folder
        except OSError:  # unreadable: not a video folder evaluation could read either
            continue
    return None


def open_predictions(pred_dir: str) -> Predictions:
    """The predictions in `pred_dir`: png video folders, or label shards when it holds `labels-rank*.tar`.

    Raises:
        EvaluationError: if `pred_dir` is not a directory, holds both kinds, a label tar cannot be read,
            or two label tars hold one video.
    """
    if not os.path.isdir(pred_dir):
        raise EvaluationError(f"Expected `--pred` to be a directory, but got {pred_dir!r}.")
    tars = sorted(Path(pred_dir).glob(LABEL_SHARDS))
    if not tars:
        unfinished = sorted(Path(pred_dir).glob(LABEL_SHARDS + ".tmp"))
        if unfinished and _png_video_folder(pred_dir) is None:
            raise EvaluationError(
                f"Expected finished predictions in `--pred` {pred_dir!r}, but it holds only unfinished label "
                f"shards ({str(unfinished[0])!r}): the `predict` writing them is still running or was "
                "stopped. Let it finish, or rerun it with the same --output_dir to complete them."
            )
        return PngPredictions(pred_dir)
    folder = _png_video_folder(pred_dir)
    if folder is not None:
        raise EvaluationError(
            f"Expected `--pred` {pred_dir!r} to hold one kind of predictions, png video folders "
            f"(<video>/<frame>.png) or label shards ({LABEL_SHARDS}), but it holds both: {folder!r} and "
            f"{str(tars[0])!r}. Move one kind to another folder and pass that folder as `--pred`."
        )
    videos: dict[str, ShardVideo] = {}
    for tar in tars:
        try:
            found = tar_videos(tar)
        except (tarfile.TarError, OSError, ValueError, KeyError, TypeError) as e:
            raise EvaluationError(
                f"Expected label shard {str(tar)!r} to be a readable tar of `predict --output_format "
                f"shards`, but reading it failed ({type(e).__name__}: {e}). Rerun the `predict` that wrote "
                "it, or move the file out of `--pred`."
            ) from e
        for video in found:
            first = videos.setdefault(video.video_id, video)
            if first is not video:
                raise EvaluationError(
                    f"Expected video {video.video_id!r} in one label shard of `--pred`, but both "
                    f"{str(first.tar)!r} and {str(tar)!r} hold it. Move one of them out of {pred_dir!r}."
                )
    return ShardPredictions(pred_dir, videos)


def _resolve_num_classes(
    given: int | None, manifest: int | None, manifests: Sequence[str], first: LabelledVideo | None
) -> tuple[int, str]:
    """C and where it came from: `--num_classes`, else the manifest, else the first video's metadata."""
    where = ", ".join(manifests)
    if given is not None:
        if manifest is not None and given != manifest:
            raise EvaluationError(
                f"Expected `--num_classes` to match the shards' {MANIFEST} ({where}: {manifest}), but got "
                f"{given}. Pass `--num_classes {manifest}` or leave it out."
            )
        return given, "given"
    if manifest is not None:
        return manifest, f"from {where}"
    if first is not None and first.num_classes is not None:
        return first.num_classes, f"from the metadata of {first.where}"
    raise EvaluationError(
        f"Expected `--num_classes` to be given, since neither a {MANIFEST} nor the metadata of the shards "
        f"of `{GT_ARG}` record the number of classes, but got none. Pass `--num_classes C`."
    )


def _check_gt_ids(video: LabelledVideo, num_classes: int, origin: str, ignore_index: int) -> None:
    """Refuse ground-truth ids outside `[0, num_classes)` other than `ignore_index` (never drop them).

    Raises:
        EvaluationError: naming the first such frame of `video`, the id and the fix.
    """
    labels = video.labels  # (T, H, W)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if not bool(bad.any()):
        return
    frame = int(bad.flatten(1).any(dim=1).nonzero()[0, 0])
    ids = sorted({int(v) for v in labels[bad].unique()[:5]})
    top = int(labels[bad].max())
    raise EvaluationError(
        f"Expected the ground truth of frame {video.frame_names[frame]!r} of video {video.video_id!r} "
        f"({video.where}) to hold class ids in [0, {num_classes}) or the ignore index {ignore_index}, but "
        f"got ids {ids} with `--num_classes` {num_classes} ({origin}). Pass `--num_classes {top + 1}` if "
        "the dataset has that many classes, else fix the shards' labels."
    )


def evaluate(
    pred_dir: str,
    gt: str | Sequence[str],
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    matching: Literal["none", "video", "dataset"] = "none",
    missing: Literal["error", "as-wrong"] = "error",
    max_pred_ids: int = 256,
    names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Score `<pred_dir>/<video_id>/<frame_name>.png` (or the label shards in `pred_dir`) against the
    labelled shards `gt` names.

    Args:
        pred_dir: directory of predictions: png video folders, or the `labels-rank*.tar` label shards of
            `--output_format shards` (`open_predictions`).
        gt: the labelled WebDataset shards: a folder with the `manifest.json` of data_tools, a brace
            pattern, a glob, a url, or a list of these (`data.shards.resolve_shards`).
        num_classes: C; None takes the shards' `manifest.json` value, else their metadata's.
        ignore_index: the ignore label of the shards.
        matching: "none", "video" or "dataset" (Hungarian matching of predicted ids to classes).
        missing: "error" raises on a missing or wrong-size prediction; "as-wrong" counts every valid
            ground-truth pixel of that frame as wrong (and inconsistent for mVC) and lists the file.
        max_pred_ids: bound on predicted ids under matching.
        names: predicted id -> class name (a corpus vocabulary's `names.yaml`): each predicted id is
            scored as the dataset class of that name (the shards' manifest `class_names`, compared
            without case); an id without a name, or with a name the dataset lacks, counts as wrong.

    Returns:
        The metrics of `VideoSegmentationMetrics.compute` (NaN where undefined) plus `missing`, the
        list of predictions counted as wrong (`<video_id>/<frame_name>.png`, for label shards too).

    Raises:
        EvaluationError: on input that cannot be scored, e.g. `gt` naming no shard, `num_classes`
            below 2, disagreeing with the shards (or missing where they do not record it), or a
            ground-truth id outside `[0, num_classes)` other than `ignore_index`, or `pred_dir` holding
            both png video folders and label shards.
    """
    if missing not in ("error", "as-wrong"):
        raise EvaluationError(f"Expected `missing` to be 'error' or 'as-wrong', but got {missing!r}.")
    predictions = open_predictions(pred_dir)
    try:
        urls, expected = resolve_shards(gt if isinstance(gt, str) else list(gt), GT_ARG)
        info = dataset_info(urls, GT_ARG)
    except ValueError as e:
        raise EvaluationError(str(e)) from e
    videos = iter_labelled_videos(urls, expected)
    first = next(videos, None)  # its metadata may be what tells C
    num_classes, origin = _resolve_num_classes(num_classes, info.num_classes, info.manifests, first)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise EvaluationError(
            f"Expected `--num_classes` to be an int >= 2 (mIoU needs at least two classes), but got "
            f"{num_classes!r} ({origin}). Pass the dataset's number of classes, e.g. `--num_classes 124`."
        )
    lut = None if names is None else _names_to_classes(names, info.class_names, num_classes)
    metrics = VideoSegmentationMetrics(num_classes, matching, ignore_index, max_pred_ids)
    missed: list[str] = []
    for video in itertools.chain([first] if first is not None else [], videos):
        if video.num_classes is not None and video.num_classes != num_classes:
            hint = (
                f"Pass `--num_classes {video.num_classes}`."
                if origin == "given"
                else "The shards disagree about their classes; rebuild them with `python -m data_tools`."
            )
            raise EvaluationError(
                f"Expected `--num_classes` to match the shards, but got {num_classes} ({origin}) while "
                f"{video.where} records num_classes={video.num_classes}. {hint}"
            )
        if not video.frame_names:
            continue
        _check_gt_ids(video, num_classes, origin, ignore_index)
        num_frames, height, width = video.labels.shape
        preds = torch.full((num_frames, height, width), -1, dtype=torch.long)  # -1: no prediction
        for t, name in enumerate(video.frame_names):
            pred, where = predictions.read(video.video_id, name, (height, width))
            if isinstance(pred, str):
                if missing == "error":
                    raise EvaluationError(
                        f"Expected a prediction {where} ({height}x{width}) for labelled frame {name!r} of "
                        f"video {video.video_id!r}, but it is {pred}. Predict every labelled frame, or pass "
                        "`--missing as-wrong` to count it as wrong."
                    )
                print(
                    f"warning: prediction {where} for frame {name!r} of video {video.video_id!r} is {pred}; "
                    "counted as wrong",
                    file=sys.stderr,
                )
                missed.append(f"{video.video_id}/{name}.png")
                continue
            preds[t] = (
                torch.from_numpy(pred)
                if lut is None
                else lut[torch.from_numpy(pred).long().clamp(max=len(lut) - 1)]
            )
        labelled = torch.ones(num_frames, dtype=torch.bool)  # meta.labelled decides, as VSPW's mask files
        metrics.update(preds, video.labels, labelled)
    result: dict[str, Any] = metrics.compute()
    result["missing"] = missed
    return result


def _names_to_classes(
    names: dict[int, str], class_names: Sequence[str] | None, num_classes: int
) -> torch.Tensor:
    """A lookup table predicted id -> dataset class id by name (`num_classes`, counted wrong, where none).

    Raises:
        EvaluationError: if the shards record no class names.
    """
    if not class_names:
        raise EvaluationError(
            "Expected the shards' manifest.json to record `class_names` for `--names`, but it has none. "
            "Rebuild the shards with `python -m data_tools` (it records them for known datasets), or use "
            "`--matching dataset` instead."
        )
    found, unknown = class_ids_of_names(names, class_names)
    size = max([*names, 0]) + 2  # the last entry takes every id beyond the named ones
    lut = torch.full((size,), num_classes, dtype=torch.long)
    for g, c in found.items():
        lut[g] = c
    if unknown:
        print(
            f"warning: names not among the dataset's classes (counted as wrong): {unknown}", file=sys.stderr
        )
    return lut


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vss_lightning.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--pred",
        required=True,
        help="directory of <video_id>/<frame_name>.png predictions, or of label shards (labels-rank*.tar)",
    )
    parser.add_argument(
        "--gt",
        required=True,
        nargs="+",
        help="labelled WebDataset shards: a folder with manifest.json, a brace pattern, a glob, or several",
    )
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="number of classes C (default: the shards' manifest.json, else their metadata)",
    )
    parser.add_argument("--ignore_index", type=int, default=IGNORE_INDEX, help="ignore label (default 255)")
    parser.add_argument(
        "--matching",
        choices=("none", "video", "dataset"),
        default="none",
        help="Hungarian matching of predicted ids to classes (for cluster outputs)",
    )
    parser.add_argument("--max_pred_ids", type=int, default=256, help="bound on predicted ids under matching")
    parser.add_argument(
        "--names",
        default=None,
        help="names.yaml of a corpus vocabulary: score each predicted id as the dataset class of its name",
    )
    parser.add_argument("--out", default=None, help="write the metrics JSON here too")
    parser.add_argument(
        "--missing",
        choices=("error", "as-wrong"),
        default="error",
        help="a missing or wrong-size prediction: error, or count its frame as wrong",
    )
    args = parser.parse_args(argv)
    try:
        names = None
        if args.names is not None:
            from vss_lightning.vocabulary.sheet import load_names

            try:
                names = load_names(args.names)
            except OSError as e:
                raise EvaluationError(
                    f"Expected `--names` {args.names!r} to be a readable names.yaml, but reading it failed: "
                    f"{e.strerror or e}."
                ) from e
        result = evaluate(
            args.pred,
            args.gt[0] if len(args.gt) == 1 else args.gt,
            args.num_classes,
            args.ignore_index,
            args.matching,
            args.missing,
            args.max_pred_ids,
            names,
        )
    except ValueError as e:  # EvaluationError, SampleError and argument errors: a message, no traceback
        parser.exit(2, f"error: {e}\n")
    text = json.dumps({k: _json_safe(v) for k, v in result.items()}, indent=2)
    print(text, flush=True)  # first: a failing `--out` must not lose the metrics
    if args.out:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            parser.exit(
                1,
                f"error: Expected `--out` {args.out!r} to be a writable file path, but writing it failed "
                f"({type(e).__name__}: {e.strerror or e}). The metrics are printed above; pass another "
                "`--out`.\n",
            )


if __name__ == "__main__":
    main()
