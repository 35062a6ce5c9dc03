"""`vocabulary apply`: rewrite a corpus's labels as global class ids, without rerunning the pipeline.

    python -m vss_lightning.vocabulary apply --labels OUT --vocab VOCAB --out OUT2

Every finished video of OUT (png folders or label shards, see `corpus`) maps each local label to the
global class whose centroid is nearest to the label's prototype (cosine; several local labels may map
to one class), and its label PNGs are written under OUT2/<video>/ with the same frame names. Exactly
once and resumable like `predict`: every file is written to a temporary name and renamed, and
OUT2/<video>/DONE (the video's frame names and settings hash, the vocabulary's hash, the digest of
the source's completion record and the local -> global map) is written last, so a killed run leaves
no half video that a rerun would skip; a rerun skips the videos whose DONE names this vocabulary and
the same source labels.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vss_lightning.data.format import encode_png, validate_name
from vss_lightning.io.files import atomic_write, json_bytes
from vss_lightning.io.png_store import check_video_id

from . import kmeans
from .corpus import DONE, find_videos, record_digest
from .fit import load_vocabulary, vocabulary_identity
from .prototypes import PrototypeError, VideoPrototypes

log = logging.getLogger(__name__)


def global_map(prototypes: VideoPrototypes, centroids: torch.Tensor) -> dict[int, int]:
    """Local label id -> global class id (nearest centroid by cosine)."""
    if prototypes.dim != centroids.shape[1]:
        raise PrototypeError(
            f"Expected prototypes of {centroids.shape[1]} channels like the vocabulary, but video "
            f"{prototypes.video_id!r} has {prototypes.dim}: the vocabulary was fitted on another backbone "
            "or feature setting. Fit a vocabulary on this corpus."
        )
    if not prototypes.labels.numel():
        return {}
    index, _ = kmeans.assign(
        kmeans.normalize(prototypes.features.double()), kmeans.normalize(centroids.double())
    )
    return dict(zip(prototypes.labels.tolist(), index.tolist(), strict=True))


@dataclass
class ApplySummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def apply_vocabulary(labels: Path, vocab: Path, out: Path) -> ApplySummary:
    """Map every finished video of `labels` to global ids under `out` (see the module docstring)."""
    labels, out = Path(labels), Path(out)
    if out.resolve() == labels.resolve():
        raise ValueError(
            f"Expected `--out` to differ from `--labels` ({str(out)!r}): apply never rewrites its input."
        )
    centroids, meta = load_vocabulary(vocab)
    vhash = vocabulary_identity(centroids, meta)
    num_classes = centroids.shape[0]
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    out.mkdir(parents=True, exist_ok=True)
    summary = ApplySummary()
    for video in find_videos([labels]):
        vid = video.video_id
        digest = record_digest(video)
        if meta.get("settings_hash") and video.settings_hash() != meta["settings_hash"]:
            raise PrototypeError(
                f"Expected {video.where} to come from the settings the vocabulary was fitted on "
                f"({meta['settings_hash']}), but it records {video.settings_hash()!r}. Fit a vocabulary on "
                "this corpus, or apply this one to labels of its own settings."
            )
        target = out / check_video_id(vid)
        done_path = target / DONE
        if done_path.is_file():
            previous = json.loads(done_path.read_bytes())
            if previous.get("vocabulary_hash") == vhash and previous.get("source_done") == digest:
                summary.skipped.append(vid)
                continue
        mapping = global_map(video.prototypes(), centroids)
        lut = np.zeros(max([*mapping, 0]) + 1, dtype=np.int64)
        for local, g in mapping.items():
            lut[local] = g
        target.mkdir(exist_ok=True)
        done_path.unlink(missing_ok=True)
        for stale in target.glob(".*.tmp"):  # left by a killed run: only this run writes here
            stale.unlink(missing_ok=True)
        names = video.frame_names()
        for name in names:
            validate_name(name, f"frame name of video {vid!r}")
            arr = video.label(name)
            unknown = np.setdiff1d(np.unique(arr), np.asarray(list(mapping), dtype=arr.dtype))
            if unknown.size:
                raise PrototypeError(
                    f"Expected every label of frame {name!r} of {video.where} to have a prototype, but "
                    f"{unknown.tolist()} have none. Relabel the video (delete its DONE and rerun `predict`)."
                )
            atomic_write(target / f"{name}.png", encode_png(lut[arr].astype(dtype)))
        done = {
            "video_id": vid,
            "frame_names": names,
            "frames": len(names),
            "settings_hash": video.settings_hash(),
            "vocabulary_hash": vhash,
            "source_done": digest,
            "global_ids": {str(k): v for k, v in mapping.items()},
            "label_mode": "vocabulary",
        }
        atomic_write(done_path, json_bytes(done))
        summary.written.append(vid)
    log.info(
        f"vocabulary apply: {len(summary.written)} videos written, "
        f"{len(summary.skipped)} skipped as complete."
    )
    return summary
