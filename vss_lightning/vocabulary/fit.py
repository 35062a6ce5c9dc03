"""`vocabulary fit`: cluster the prototypes of a labelled corpus into G global classes.

    python -m vss_lightning.vocabulary fit --labels OUT [OUT ...] --num_classes G --out VOCAB

Reads every finished video's prototypes under the output folders (png or label shards, see `corpus`;
streaming: memory is the initialisation sample plus G centroids, whatever the corpus size), clusters
them with weighted cosine K-Means (weights: cell counts), and writes
    VOCAB/vocabulary.safetensors  centroids (G, C) float32; metadata: settings hash, seed, counts
    VOCAB/vocabulary.json         per global class: cells, videos, mean share of a video's pixels
    VOCAB/sheets/, VOCAB/index.html  the naming sheet (see `sheet`)
Every video of a corpus must come from one settings hash (features of different settings or
backbones are not comparable): a mismatch is an error naming both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from vss_lightning.io.files import atomic_write, json_bytes

from . import kmeans
from .corpus import Corpus, FrameSource
from .prototypes import PrototypeError
from .sheet import log_to_wandb, write_sheets

VOCABULARY = "vocabulary.safetensors"
VOCABULARY_JSON = "vocabulary.json"


def vocabulary_identity(centroids: torch.Tensor, meta: dict[str, str]) -> str:
    """The identity of a loaded vocabulary: a hash of its centroids and metadata (not of the file's
    bytes: safetensors may order its header differently from one write to the next)."""
    digest = hashlib.sha256(centroids.contiguous().numpy().tobytes())
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def vocabulary_hash(folder: Path) -> str:
    """`vocabulary_identity` of the vocabulary in `folder`."""
    return vocabulary_identity(*load_vocabulary(folder))


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
    wandb_project: str | None = None,
) -> dict:
    """Fit and write a vocabulary and its naming sheet; returns the contents of vocabulary.json.

    Args:
        labels: output folders of `predict` (png or label shards) whose videos hold prototypes.
        num_classes: G, the number of global classes.
        out: the vocabulary folder (created).
        seed: seed of the initialisation sample and the k-means++ draws.
        sample_size, n_init, passes: see `kmeans.fit_streaming`.
        frame_source: (video id, frame name) -> the source frame, for the naming sheet's overlays
            (None: the examples show the label's mask on grey).
        examples_per_class: typical examples on each class's contact sheet.
        shards: the corpus's input shards, read once for the naming sheet's frames (when no
            `frame_source` is given).
        wandb_project: also log the naming sheet as a W&B table to this project (`sheet.log_to_wandb`).
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
    blob = save(
        {"centroids": centroids.float().contiguous()},
        metadata={
            "settings_hash": corpus.settings_hash,
            "num_classes": str(num_classes),
            "dim": str(corpus.dim),
            "seed": str(seed),
            "videos": str(n_videos),
            "prototypes": str(total),
        },
    )
    atomic_write(out / VOCABULARY, blob)
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
    atomic_write(out / VOCABULARY_JSON, json_bytes(record))
    write_sheets(out, corpus, centroids, classes, frame_source, examples_per_class, shards)
    if wandb_project:
        log_to_wandb(out, classes, wandb_project)
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
