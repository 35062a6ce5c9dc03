"""`vocabulary name`: name a corpus vocabulary's global classes from the cross-attention class scores.

    python -m vss_lightning.vocabulary name --labels OUT --vocab VOCAB [--out VOCAB/names.yaml]

When `predict` ran in `cluster` mode with `--model.class_names`, every video's prototypes carry each
label's class scores (`pipeline.naming`: the attention of its cells to each class name in the UNet's
cross-attention). Each label belongs to the global class nearest to its prototype (as `apply` maps
it); a global class takes the class name with the highest cell-weighted mean of its labels' scores,
each video's scores normalised as `naming.normalize` does (min-max per class over the video by
default). The result is a `names.yaml` (`<global id>: <name>`) that `evaluate --names` reads and a
person only reviews (the naming page `index.html` shows the examples of every class).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vss_lightning.io.files import atomic_write
from vss_lightning.pipeline.naming import Normalize, normalized_scores

from .apply import global_map
from .corpus import Corpus
from .fit import load_vocabulary
from .prototypes import PrototypeError
from .sheet import NAMES_YAML


def name_vocabulary(
    labels: list[str | Path], vocab: str | Path, out: str | Path | None = None, normalize: Normalize = "video"
) -> dict[int, str]:
    """Name every global class of `vocab` from the class scores of the corpus's prototypes.

    Args:
        labels: output folders of `predict` (png or label shards) with class scores.
        vocab: the vocabulary folder (`fit`).
        out: the names.yaml to write (default: VOCAB/names.yaml).
        normalize: per-video normalisation of the class scores ("video", "frame" or "none", as
            `naming.normalize` of the run: "frame" scores are normalised already).

    Returns:
        global id -> class name, for every global class that holds a label of the corpus.

    Raises:
        PrototypeError: for prototypes without class scores, or videos scored for different class
            lists (naming the video and the fix).
    """
    centroids, _ = load_vocabulary(Path(vocab))
    corpus = Corpus.scan([Path(p) for p in labels])
    g = centroids.shape[0]
    totals: torch.Tensor | None = None  # (G, classes) cell-weighted sums of normalised scores
    class_names: list[str] | None = None
    for video, p in zip(corpus.files, corpus.videos(), strict=True):
        if p.class_scores is None:
            raise PrototypeError(
                f"Expected class scores in the prototypes of {video.where}, but it has none: it was labelled "
                "without class names. Label the corpus with `--model.label_mode cluster --model.class_names "
                "NAMES` (a list or a YAML/text file) to name a vocabulary."
            )
        if class_names is None:
            class_names, totals = (
                list(p.class_names),
                torch.zeros((g, len(p.class_names)), dtype=torch.float64),
            )
        elif list(p.class_names) != class_names:
            raise PrototypeError(
                f"Expected every video to be scored for the same class names, but {video.where} has "
                f"{len(p.class_names)} names ({p.class_names[:3]}...) and earlier videos {len(class_names)} "
                f"({class_names[:3]}...). Label the corpus with one --model.class_names."
            )
        if not p.labels.numel():
            continue
        scores = normalized_scores(p.class_scores, p.score_range, normalize)
        mapping = global_map(p, centroids)
        ids = torch.tensor([mapping[label] for label in p.labels.tolist()])
        totals.index_add_(0, ids, scores * p.cells.double()[:, None])
    if totals is None:
        raise PrototypeError(f"Expected labelled videos in {labels}, but found none.")
    named = {gid: class_names[int(totals[gid].argmax())] for gid in range(g) if totals[gid].sum() > 0}
    target = Path(out) if out is not None else Path(vocab) / NAMES_YAML
    text = "".join(f"{gid}: {json.dumps(name)}\n" for gid, name in named.items())  # JSON strings are YAML
    atomic_write(target, text.encode())
    return named
