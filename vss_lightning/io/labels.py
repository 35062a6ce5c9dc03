"""What is stored of one labelled clip, in both output formats: its label array and its record.

The record (`labels.json` in a label tar, `clip-<k>.done`/`DONE` in a png folder) names the clip
(`clip_identity`), where it came from and the settings that made it; the completeness check of a
rerun compares it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from vss_lightning.data.format import VideoMeta

from .summary import VideoLabels


def clip_identity(meta: VideoMeta) -> str:
    """A digest of what tells one clip of a video from another: id, clip layout, frame names and sizes.

    Frame pixels are not hashed: the completeness check sees only the metadata, and decoded pixels can
    change with the image library, which must not make a finished video look like another one.
    """
    record = [meta.video_id, meta.clip_index, meta.num_clips, meta.frame_offset, list(meta.frame_names),
              [list(size) for size in meta.sizes]]  # fmt: skip
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:32]


def label_array(labels: torch.Tensor) -> np.ndarray:
    """(T, H, W) integer labels -> uint8 array, or uint16 when an id exceeds 255.

    Raises:
        ValueError: on negative ids or ids above 65535 (not storable in a PNG label map).
    """
    if labels.numel() == 0:
        return labels.numpy().astype(np.uint8)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"Expected label ids in [0, 65535] to write PNG label maps, but got [{lo}, {hi}].")
    return labels.numpy().astype(np.uint8 if hi <= 255 else np.uint16)


def label_record(res: VideoLabels, arr: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
    """The record of one labelled clip.

    Args:
        res: the clip's labels.
        arr: its label array (`label_array`).
        info: the module's `output_info()` (settings hash, label mode, backbone).
    """
    meta = res.meta
    return {
        "video_id": meta.video_id,
        "identity": [clip_identity(meta)],  # per clip; the whole video's in DONE
        "sources": [res.url],
        "keys": [res.key],
        "frame_names": list(meta.frame_names),
        "frames": res.frames,
        "clip_index": meta.clip_index,
        "num_clips": meta.num_clips,
        "frame_offset": meta.frame_offset,
        "dtype": str(arr.dtype),
        "settings_hash": str(info.get("settings_hash", "")),
        "label_mode": info.get("label_mode"),
        "backbone": info.get("backbone"),
    }
