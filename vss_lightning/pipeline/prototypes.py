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
    metadata (str -> str)   video_id, settings_hash, format version
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

FORMAT_VERSION = "1"
TENSORS = ("labels", "features", "cells", "frames")


class PrototypeError(ValueError):
    """Prototypes that are missing, unreadable or inconsistent (the message names them and the fix)."""


@dataclass
class VideoPrototypes:
    """The prototypes of one video (see the module docstring for the fields)."""

    video_id: str
    labels: torch.Tensor
    features: torch.Tensor
    cells: torch.Tensor
    frames: torch.Tensor
    settings_hash: str = ""

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
        return save(tensors, metadata=meta)

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
        return cls(
            video_id=metadata.get("video_id", ""),
            settings_hash=metadata.get("settings_hash", ""),
            **{k: tensors[k] for k in TENSORS},
        )


class PrototypeAccumulator:
    """Sums features per label over the frames of a video as its batches are emitted.

    Args:
        num_frames: frames of the video the frame masks index (default: up to the last frame added).
    """

    def __init__(self, num_frames: int | None = None) -> None:
        self.num_frames = num_frames
        self._sums: dict[int, torch.Tensor] = {}  # label -> (C,) float64 on the CPU
        self._cells: dict[int, int] = {}
        self._frames: dict[int, set[int]] = {}
        self._last_frame = -1

    def add(self, features: torch.Tensor, coarse: torch.Tensor, frame_indices: list[int]) -> None:
        """Add emitted frames (one reduction on the features' device, then (L, C) to the CPU).

        Args:
            features: (n, h, w, C) aggregated, L-inf-normalised features of the emitted frames.
            coarse: (n, h, w) int refined coarse labels of the same frames (any device).
            frame_indices: (n,) index of each frame in the video.
        """
        if features.shape[:3] != coarse.shape or len(frame_indices) != coarse.shape[0]:
            raise ValueError(
                f"Expected features (n, h, w, C) and coarse labels (n, h, w) of {len(frame_indices)} frames, "
                f"but got {tuple(features.shape)} and {tuple(coarse.shape)}."
            )
        if not frame_indices:
            return
        coarse = coarse.to(features.device)
        uniq, inverse = coarse.reshape(-1).unique(return_inverse=True)  # (L,), (n h w,)
        flat = features.reshape(-1, features.shape[-1]).float()  # (n h w, C)
        sums = torch.zeros((uniq.numel(), flat.shape[1]), device=flat.device).index_add_(0, inverse, flat)
        cells = torch.bincount(inverse, minlength=uniq.numel())
        present = (coarse.flatten(1)[:, None, :] == uniq[None, :, None]).any(2)  # (n, L)
        sums, cells, present = sums.double().cpu(), cells.cpu().tolist(), present.cpu()
        for j, label in enumerate(uniq.tolist()):
            frames = (frame_indices[i] for i in present[:, j].nonzero().flatten().tolist())
            self._add(label, sums[j], int(cells[j]), frames)
        self._last_frame = max(self._last_frame, *frame_indices)

    def _add(self, label: int, total: torch.Tensor, cells: int, frames: Iterable[int]) -> None:
        """Add one label's feature sum, cell count and frames."""
        self._sums[label] = self._sums[label] + total if label in self._sums else total.clone()
        self._cells[label] = self._cells.get(label, 0) + cells
        self._frames.setdefault(label, set()).update(frames)

    def merge(self, other: PrototypeAccumulator) -> None:
        """Add everything `other` accumulated (e.g. a clip's sums into its video's)."""
        for label, total in other._sums.items():
            self._add(label, total, other._cells[label], other._frames[label])
        self._last_frame = max(self._last_frame, other._last_frame)

    def remapped(self, mapping: dict[int, int]) -> PrototypeAccumulator:
        """The sums with each label replaced by `mapping[label]` (labels mapped to one id add up)."""
        out = PrototypeAccumulator(self.num_frames)
        for label, total in self._sums.items():
            out._add(mapping[label], total, self._cells[label], self._frames[label])
        out._last_frame = self._last_frame
        return out

    def result(self, video_id: str, settings_hash: str = "") -> VideoPrototypes:
        """The prototypes of everything added so far (labels ascending)."""
        labels = sorted(self._sums)
        dim = next(iter(self._sums.values())).shape[0] if labels else 0
        num_frames = self.num_frames if self.num_frames is not None else self._last_frame + 1
        frames = torch.zeros((len(labels), num_frames), dtype=torch.uint8)
        for i, label in enumerate(labels):
            frames[i, sorted(self._frames[label])] = 1
        features = (
            torch.stack([self._sums[la] / self._cells[la] for la in labels]).float()
            if labels
            else torch.zeros((0, dim))
        )
        return VideoPrototypes(
            video_id=video_id,
            labels=torch.tensor(labels, dtype=torch.int64),
            features=features,
            cells=torch.tensor([self._cells[la] for la in labels], dtype=torch.int64),
            frames=frames,
            settings_hash=settings_hash,
        )
