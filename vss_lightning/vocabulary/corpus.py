"""The prototype files of a labelled corpus: found, checked, and read again on each pass.

A corpus is one or more png output folders of `predict`; each finished video (`<video>/DONE`) holds
`prototypes.safetensors`. `Corpus.scan` checks them all from their headers (one settings hash and
one feature size for the whole corpus); `videos()` and `chunks()` stream them, never all in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from vss_lightning.io.png_store import DONE

from .prototypes import PROTOTYPES, PrototypeError, VideoPrototypes, load_prototypes

FrameSource = Callable[[str, str], "np.ndarray | None"]  # (video id, frame name) -> (H, W, 3) uint8


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
            yield load_prototypes(path)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for p in self.videos():
            if p.labels.numel():
                yield p.features, p.cells.to(torch.float64)
