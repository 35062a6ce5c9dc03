"""Per-video label prototypes: the mean feature of each final label, for a corpus vocabulary.

For every final label of a video the pipeline keeps the mean of the aggregated, L-inf-normalised
features (docs/method.md section 1) over the feature-grid cells that carry the label in the video's
refined coarse masks, with the cell count and the frames where the label appears. No extra UNet
work: the features exist anyway. They are written next to the labels as `prototypes.safetensors`
(`<output_dir>/<video>/prototypes.safetensors`) and are what `vocabulary fit` clusters into global
classes and `vocabulary apply` maps to them.

File layout (safetensors, so loading runs no code):
    labels   (L,) int64     the final label ids, ascending
    features (L, C) float32 the mean feature of each label
    cells    (L,) int64     feature-grid cells that carried the label, over the whole video
    frames   (L, T) uint8   1 where the label appears in frame t (T = frames of the video)
    metadata (str -> str)   video_id, settings_hash, format version
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vss_lightning.io.files import atomic_write

PROTOTYPES = "prototypes.safetensors"
FORMAT_VERSION = "1"
_TENSORS = ("labels", "features", "cells", "frames")


class PrototypeError(ValueError):
    """A prototypes file that is missing, unreadable or inconsistent (the message names it)."""


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
        """The safetensors file's bytes."""
        tensors = {
            "labels": self.labels.to(torch.int64).contiguous(),
            "features": self.features.to(torch.float32).contiguous(),
            "cells": self.cells.to(torch.int64).contiguous(),
            "frames": self.frames.to(torch.uint8).contiguous(),
        }
        meta = {"video_id": self.video_id, "settings_hash": self.settings_hash, "format": FORMAT_VERSION}
        return save(tensors, metadata=meta)

    def save(self, path: Path) -> None:
        """Write atomically (a temporary file renamed over `path`): a reader sees the old or the new file."""
        atomic_write(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> VideoPrototypes:
        """Read a prototypes file.

        Raises:
            PrototypeError: if it is missing, not safetensors, or lacks a field.
        """
        path = Path(path)
        if not path.is_file():
            raise PrototypeError(
                f"Expected the prototypes file {str(path)!r}, but it does not exist. Label the video with "
                "this version of vss_lightning (`predict` writes it next to the labels) and rerun."
            )
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise PrototypeError(f"Expected {str(path)!r} to be a safetensors prototypes file: {e}") from e
        missing = [k for k in _TENSORS if k not in tensors]
        if missing:
            raise PrototypeError(
                f"Expected {str(path)!r} to hold {list(_TENSORS)}, but {missing} are missing."
            )
        return cls(
            video_id=meta.get("video_id", path.parent.name),
            settings_hash=meta.get("settings_hash", ""),
            **{k: tensors[k] for k in _TENSORS},
        )


class PrototypeAccumulator:
    """Sums features per label over the frames of a video as its batches are emitted.

    Args:
        num_frames: frames of the video (or clip sequence) the frame masks index.
    """

    def __init__(self, num_frames: int) -> None:
        self.num_frames = num_frames
        self._sums: dict[int, torch.Tensor] = {}
        self._cells: dict[int, int] = {}
        self._frames: dict[int, set[int]] = {}

    def add(self, features: torch.Tensor, coarse: torch.Tensor, frame_indices: list[int]) -> None:
        """Add emitted frames.

        Args:
            features: (n, h, w, C) aggregated, L-inf-normalised features of the emitted frames.
            coarse: (n, h, w) int refined coarse labels of the same frames.
            frame_indices: (n,) index of each frame in the video.
        """
        if features.shape[:3] != coarse.shape or len(frame_indices) != coarse.shape[0]:
            raise ValueError(
                f"Expected features (n, h, w, C) and coarse labels (n, h, w) of {len(frame_indices)} frames, "
                f"but got {tuple(features.shape)} and {tuple(coarse.shape)}."
            )
        flat = features.reshape(-1, features.shape[-1]).to(torch.float64)  # (n h w, C)
        labels = coarse.reshape(-1)
        for label in labels.unique().tolist():
            sel = labels == label
            total = flat[sel].sum(0).cpu()
            self._sums[label] = self._sums[label] + total if label in self._sums else total
            self._cells[label] = self._cells.get(label, 0) + int(sel.sum())
            present = (coarse == label).flatten(1).any(1).nonzero().flatten().tolist()
            self._frames.setdefault(label, set()).update(frame_indices[i] for i in present)

    def result(self, video_id: str, settings_hash: str = "") -> VideoPrototypes:
        """The prototypes of everything added so far (labels ascending)."""
        labels = sorted(self._sums)
        dim = next(iter(self._sums.values())).shape[0] if labels else 0
        frames = torch.zeros((len(labels), self.num_frames), dtype=torch.uint8)
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
