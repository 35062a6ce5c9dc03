"""Per-video label prototypes: the mean feature of each final label (for a corpus vocabulary).

For every final label of a video the pipeline keeps the mean of the aggregated, L-inf-normalised
features (docs/method.md section 1) over the feature-grid cells that carry the label in the video's
refined coarse masks, with the cell count and the frames where the label appears. No extra UNet
work: the features exist anyway. `vss_lightning.vocabulary` writes them next to the labels
(`prototypes.safetensors`), clusters a corpus's prototypes into global classes and maps labels to them.

Serialised layout (safetensors: loading runs no code):
    labels   (L,) int64     the final label ids, ascending
    features (L, C) float32 the mean feature of each label
    cells    (L,) int64     feature-grid cells that carried the label, over the frames seen
    frames   (L, T) uint8   1 where the label appears in frame t of the video
    class_scores (L, C) float32  optional (class names given, `naming.py`): each label's mean class
                            score over its cells
    score_range  (2, C) float32  optional: the smallest and largest score of each class in the video
    metadata (str -> str)   video_id, settings_hash, format version; `class_names` (JSON list) with
                            class scores
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

FORMAT_VERSION = "1"
TENSORS = ("labels", "features", "cells", "frames")
SCORE_TENSORS = ("class_scores", "score_range")


class PrototypeError(ValueError):
    """Prototypes that are missing, unreadable or inconsistent (the message names them and the fix)."""


@dataclass
class VideoPrototypes:
    """The prototypes of one video (see the module docstring for the fields); `to_bytes` gives the
    same bytes for the same prototypes (the header's metadata sorted)."""

    video_id: str
    labels: torch.Tensor
    features: torch.Tensor
    cells: torch.Tensor
    frames: torch.Tensor
    settings_hash: str = ""
    class_scores: torch.Tensor | None = None
    score_range: torch.Tensor | None = None
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        shapes_ok = (
            self.labels.dim() == 1
            and self.features.dim() == 2
            and self.features.shape[0] == n
            and tuple(self.cells.shape) == (n,)
            and self.frames.dim() == 2
            and self.frames.shape[0] == n
        )
        if not shapes_ok:
            raise PrototypeError(
                f"Expected prototypes of video {self.video_id!r} to be labels (L,), features (L, C), cells "
                f"(L,), frames (L, T), but got {tuple(self.labels.shape)}, {tuple(self.features.shape)}, "
                f"{tuple(self.cells.shape)}, {tuple(self.frames.shape)}."
            )
        if self.class_scores is not None:
            c = len(self.class_names or ())
            scores_ok = (
                tuple(self.class_scores.shape) == (n, c)
                and self.score_range is not None
                and tuple(self.score_range.shape) == (2, c)
            )
            if not scores_ok:
                raise PrototypeError(
                    f"Expected class scores of video {self.video_id!r} to be (L, C) = ({n}, {c}) with a "
                    f"(2, C) score range for its {c} class names, but got "
                    f"{tuple(self.class_scores.shape)} and "
                    f"{None if self.score_range is None else tuple(self.score_range.shape)}."
                )

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def to_bytes(self) -> bytes:
        """The safetensors serialisation."""
        tensors = {
            "labels": self.labels.to(torch.int64).contiguous(),
            "features": self.features.to(torch.float32).contiguous(),
            "cells": self.cells.to(torch.int64).contiguous(),
            "frames": self.frames.to(torch.uint8).contiguous(),
        }
        meta = {"video_id": self.video_id, "settings_hash": self.settings_hash, "format": FORMAT_VERSION}
        if self.class_scores is not None:
            tensors["class_scores"] = self.class_scores.to(torch.float32).contiguous()
            tensors["score_range"] = self.score_range.to(torch.float32).contiguous()
            meta["class_names"] = json.dumps(list(self.class_names or ()))
        return stable_safetensors(save(tensors, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes, metadata: dict[str, str], where: str) -> VideoPrototypes:
        """Parse `to_bytes` output (`metadata`: the file's header metadata; `where` names it in errors)."""
        try:
            tensors = load(data)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises is reported with its name
            raise PrototypeError(f"Expected {where} to be a safetensors prototypes file: {e}") from e
        missing = [k for k in TENSORS if k not in tensors]
        if missing:
            raise PrototypeError(f"Expected {where} to hold {list(TENSORS)}, but {missing} are missing.")
        scores = {}
        if "class_scores" in tensors:
            try:
                names = json.loads(metadata.get("class_names", "null"))
            except ValueError as e:
                raise PrototypeError(f"Expected {where} to record its class names as JSON: {e}") from e
            scores = {k: tensors.get(k) for k in SCORE_TENSORS} | {"class_names": names}
        return cls(
            video_id=metadata.get("video_id", ""),
            settings_hash=metadata.get("settings_hash", ""),
            **{k: tensors[k] for k in TENSORS},
            **scores,
        )


def stable_safetensors(data: bytes) -> bytes:
    """Safetensors bytes with the header's metadata in sorted order (the same tensors, offsets and
    values): `safetensors` writes its metadata map in a random order on each call, which would make
    identical prototypes differ byte for byte from one run to the next."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


class PrototypeAccumulator:
    """Sums features per label over the frames of a video as its batches are emitted.

    With class score maps (`naming.ClassNamer`), each label's score sums are kept beside its feature
    sum (the features and scores of a cell are one vector here), with each class's smallest and
    largest score over every cell added.

    Args:
        num_frames: frames of the video the frame masks index (default: up to the last frame added).
        class_names: the classes of the score maps `add` receives (None: no scores).
    """

    def __init__(self, num_frames: int | None = None, class_names: list[str] | None = None) -> None:
        self.num_frames = num_frames
        self.class_names = class_names
        self._sums: dict[int, torch.Tensor] = {}  # label -> (C [+ classes],) float64 on the CPU
        self._cells: dict[int, int] = {}
        self._frames: dict[int, set[int]] = {}
        self._last_frame = -1
        self._range: torch.Tensor | None = None  # (2, classes) float64: min and max score

    def add(
        self,
        features: torch.Tensor,
        coarse: torch.Tensor,
        frame_indices: list[int],
        scores: torch.Tensor | None = None,
    ) -> None:
        """Add emitted frames (one reduction on the features' device, then (L, C) to the CPU).

        Args:
            features: (n, h, w, C) aggregated, L-inf-normalised features of the emitted frames.
            coarse: (n, h, w) int refined coarse labels of the same frames (any device).
            frame_indices: (n,) index of each frame in the video.
            scores: (n, h, w, classes) class score maps of the same frames (with `class_names`).
        """
        if features.shape[:3] != coarse.shape or len(frame_indices) != coarse.shape[0]:
            raise ValueError(
                f"Expected features (n, h, w, C) and coarse labels (n, h, w) of {len(frame_indices)} frames, "
                f"but got {tuple(features.shape)} and {tuple(coarse.shape)}."
            )
        if (scores is None) != (self.class_names is None) or (
            scores is not None and tuple(scores.shape) != (*coarse.shape, len(self.class_names))
        ):
            raise ValueError(
                f"Expected class scores (n, h, w, {len(self.class_names or ())}) with class names, none "
                f"without, but got {None if scores is None else tuple(scores.shape)}."
            )
        if not frame_indices:
            return
        coarse = coarse.to(features.device)
        uniq, inverse = coarse.reshape(-1).unique(return_inverse=True)  # (L,), (n h w,)
        flat = features.reshape(-1, features.shape[-1]).float()  # (n h w, C)
        if scores is not None:
            flat_scores = scores.reshape(-1, scores.shape[-1]).to(flat)
            frame_range = torch.stack([flat_scores.amin(0), flat_scores.amax(0)]).double().cpu()
            self._range = frame_range if self._range is None else _combine_ranges(self._range, frame_range)
            flat = torch.cat([flat, flat_scores], 1)
        sums = torch.zeros((uniq.numel(), flat.shape[1]), device=flat.device).index_add_(0, inverse, flat)
        cells = torch.bincount(inverse, minlength=uniq.numel())
        present = (coarse.flatten(1)[:, None, :] == uniq[None, :, None]).any(2)  # (n, L)
        sums, cells, present = sums.double().cpu(), cells.cpu().tolist(), present.cpu()
        for j, label in enumerate(uniq.tolist()):
            frames = (frame_indices[i] for i in present[:, j].nonzero().flatten().tolist())
            self._add(label, sums[j], int(cells[j]), frames)
        self._last_frame = max(self._last_frame, *frame_indices)

    def _add(self, label: int, total: torch.Tensor, cells: int, frames: Iterable[int]) -> None:
        """Add one label's feature (and score) sum, cell count and frames."""
        self._sums[label] = self._sums[label] + total if label in self._sums else total.clone()
        self._cells[label] = self._cells.get(label, 0) + cells
        self._frames.setdefault(label, set()).update(frames)

    def merge(self, other: PrototypeAccumulator) -> None:
        """Add everything `other` accumulated (e.g. a clip's sums into its video's)."""
        for label, total in other._sums.items():
            self._add(label, total, other._cells[label], other._frames[label])
        self._last_frame = max(self._last_frame, other._last_frame)
        if other._range is not None:
            self._range = (
                other._range.clone() if self._range is None else _combine_ranges(self._range, other._range)
            )
        if self.class_names is None:
            self.class_names = other.class_names

    def remapped(self, mapping: dict[int, int]) -> PrototypeAccumulator:
        """The sums with each label replaced by `mapping[label]` (labels mapped to one id add up)."""
        out = PrototypeAccumulator(self.num_frames, self.class_names)
        for label, total in self._sums.items():
            out._add(mapping[label], total, self._cells[label], self._frames[label])
        out._last_frame = self._last_frame
        out._range = self._range
        return out

    def result(self, video_id: str, settings_hash: str = "") -> VideoPrototypes:
        """The prototypes of everything added so far (labels ascending)."""
        labels = sorted(self._sums)
        dim = next(iter(self._sums.values())).shape[0] if labels else 0
        num_frames = self.num_frames if self.num_frames is not None else self._last_frame + 1
        frames = torch.zeros((len(labels), num_frames), dtype=torch.uint8)
        for i, label in enumerate(labels):
            frames[i, sorted(self._frames[label])] = 1
        means = (
            torch.stack([self._sums[la] / self._cells[la] for la in labels]).float()
            if labels
            else torch.zeros((0, dim))
        )
        scores = {}
        if self.class_names is not None:
            c = len(self.class_names)
            score_range = self._range if self._range is not None else torch.zeros((2, c))
            means, class_scores = means[:, : means.shape[1] - c], means[:, means.shape[1] - c :]
            scores = {
                "class_scores": class_scores,
                "score_range": score_range.float(),
                "class_names": self.class_names,
            }
        return VideoPrototypes(
            video_id=video_id,
            labels=torch.tensor(labels, dtype=torch.int64),
            features=means,
            cells=torch.tensor([self._cells[la] for la in labels], dtype=torch.int64),
            frames=frames,
            settings_hash=settings_hash,
            **scores,
        )


def _combine_ranges(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The (2, C) min/max range covering two ranges."""
    return torch.stack([torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1])])
