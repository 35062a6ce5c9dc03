"""`vocabulary fit`: cluster the prototypes of a labelled corpus into G global classes.

    python -m vss_lightning.vocabulary fit --labels OUT [OUT ...] --num_classes G --out VOCAB

Reads every finished video's `prototypes.safetensors` under the output folders (streaming: memory is
the initialisation sample plus G centroids, whatever the corpus size), clusters them with weighted
cosine K-Means (weights: cell counts), and writes
    VOCAB/vocabulary.safetensors  centroids (G, C) float32; metadata: settings hash, seed, counts
    VOCAB/vocabulary.json         per global class: cells, videos, mean share of a video's pixels
    VOCAB/sheets/, VOCAB/index.html  the naming sheet (see `sheet`)
Every video of a corpus must come from one settings hash (features of different settings or
backbones are not comparable): a mismatch is an error naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import kmeans
from .prototypes import PROTOTYPES, PrototypeError, VideoPrototypes

FrameSource = Callable[[str, str], "np.ndarray | None"]  # (video id, frame name) -> (H, W, 3) uint8

VOCABULARY = "vocabulary.safetensors"
VOCABULARY_JSON = "vocabulary.json"
DONE = "DONE"  # the writer's completion marker of a video folder


def video_folders(labels: list[Path]) -> Iterator[Path]:
    """Finished video folders (with DONE) of png output folders, sorted by folder then video id."""
    for root in labels:
        root = Path(root)
        if not root.is_dir():
            raise PrototypeError(
                f"Expected `--labels` {str(root)!r} to be an output folder of `predict` (png format), but it "
                "is not a folder."
            )
        found = False
        for vdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
            if (vdir / DONE).is_file():
                found = True
                yield vdir
        if not found:
            raise PrototypeError(
                f"Expected finished videos (<video>/DONE) in {str(root)!r}, but found none. Run `predict` "
                "into it first (label shards are not read by this version: use --output_format png)."
            )


@dataclass
class Corpus:
    """The prototype files of a corpus, read again on each pass (never all in memory)."""

    files: list[Path]
    settings_hash: str
    dim: int

    @classmethod
    def scan(cls, labels: list[Path]) -> Corpus:
        """Find and check every prototypes file (header only: settings hash and feature size)."""
        files, hashes, dims = [], {}, {}
        for vdir in video_folders(labels):
            path = vdir / PROTOTYPES
            if not path.is_file():
                raise PrototypeError(
                    f"Expected {str(path)!r} next to the labels of video {vdir.name!r}, but it is missing. "
                    "Relabel the video with this version of vss_lightning (delete its DONE and rerun the "
                    "same `predict`)."
                )
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                dim = int(f.get_slice("features").get_shape()[1])
            hashes.setdefault(meta.get("settings_hash", ""), path)
            dims.setdefault(dim, path)
            files.append(path)
        if len(hashes) > 1:
            (h1, p1), (h2, p2) = list(hashes.items())[:2]
            raise PrototypeError(
                f"Expected every video of the corpus to come from one settings hash, but {str(p1)!r} has "
                f"{h1!r} and {str(p2)!r} has {h2!r}. Fit one vocabulary per settings (pass only the "
                "output folders of one configuration)."
            )
        if len(dims) > 1:
            raise PrototypeError(
                f"Expected one feature size in the corpus, but got {sorted(dims)} "
                f"({[str(p) for p in dims.values()][:2]}). Fit one vocabulary per backbone."
            )
        return cls(files, next(iter(hashes), ""), next(iter(dims), 0))

    def videos(self) -> Iterator[VideoPrototypes]:
        for path in self.files:
            yield VideoPrototypes.load(path)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for p in self.videos():
            if p.labels.numel():
                yield p.features, p.cells.to(torch.float64)


def vocabulary_hash(folder: Path) -> str:
    """The identity of a vocabulary: a hash of its centroid file's bytes."""
    return hashlib.sha256((Path(folder) / VOCABULARY).read_bytes()).hexdigest()[:16]


def fit_vocabulary(
    labels: list[Path],
    num_classes: int,
    out: Path,
    seed: int = 0,
    sample_size: int = 200_000,
    n_init: int = 4,
    passes: int = 10,
    frame_source: FrameSource | None = None,
    examples_per_class: int = 8,
    shards: str | list[str] | None = None,
) -> dict:
    """Fit and write a vocabulary and its naming sheet; returns the contents of vocabulary.json.

    Args:
        labels: output folders of `predict` (png format) whose videos hold prototypes.
        num_classes: G, the number of global classes.
        out: the vocabulary folder (created).
        seed: seed of the initialisation sample and the k-means++ draws.
        sample_size, n_init, passes: see `kmeans.fit_streaming`.
        frame_source: (video id, frame name) -> the source frame, for the naming sheet's overlays
            (None: the examples show the label's mask on grey).
        examples_per_class: typical examples on each class's contact sheet.
        shards: the corpus's input shards, read once for the naming sheet's frames (when no
            `frame_source` is given).
    """
    if num_classes < 1:
        raise ValueError(f"Expected `--num_classes` to be a positive integer, but got {num_classes}.")
    corpus = Corpus.scan([Path(p) for p in labels])
    centroids, inertia, total = kmeans.fit_streaming(
        corpus.chunks, num_classes, sample_size=sample_size, n_init=n_init, passes=passes, seed=seed
    )
    cells = torch.zeros(num_classes, dtype=torch.float64)
    videos = torch.zeros(num_classes, dtype=torch.int64)
    share = torch.zeros(num_classes, dtype=torch.float64)
    n_videos = 0
    for p in corpus.videos():
        n_videos += 1
        if not p.labels.numel():
            continue
        index, _ = kmeans.assign(kmeans.normalize(p.features.to(torch.float64)), centroids)
        c = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, index, p.cells.to(torch.float64))
        cells += c
        videos += (c > 0).long()
        share += c / c.sum()
    classes = [
        {
            "id": g,
            "cells": int(cells[g]),
            "videos": int(videos[g]),
            "mean_share": float(share[g] / max(n_videos, 1)),
        }
        for g in range(num_classes)
    ]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{VOCABULARY}.tmp"
    save_file(
        {"centroids": centroids.float().contiguous()},
        str(tmp),
        metadata={
            "settings_hash": corpus.settings_hash,
            "num_classes": str(num_classes),
            "dim": str(corpus.dim),
            "seed": str(seed),
            "videos": str(n_videos),
            "prototypes": str(total),
        },
    )
    os.replace(tmp, out / VOCABULARY)
    record = {
        "vocabulary_hash": vocabulary_hash(out),
        "settings_hash": corpus.settings_hash,
        "num_classes": num_classes,
        "dim": corpus.dim,
        "videos": n_videos,
        "prototypes": total,
        "inertia": inertia,
        "classes": classes,
    }
    tmp_json = out / f".{VOCABULARY_JSON}.tmp"
    tmp_json.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp_json, out / VOCABULARY_JSON)
    from .sheet import write_sheets  # (sheet imports this module)

    write_sheets(out, corpus, centroids, classes, frame_source, examples_per_class, shards)
    return record


def load_vocabulary(folder: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The (G, C) centroids of a vocabulary folder and its metadata.

    Raises:
        PrototypeError: if the folder holds no vocabulary.
    """
    path = Path(folder) / VOCABULARY
    if not path.is_file():
        raise PrototypeError(
            f"Expected a vocabulary at {str(path)!r}, but it does not exist. Make one with "
            "`python -m vss_lightning.vocabulary fit --labels OUT --num_classes G --out VOCAB`."
        )
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("centroids"), dict(f.metadata() or {})
