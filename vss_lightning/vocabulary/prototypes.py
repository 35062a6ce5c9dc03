"""Prototype files: `<output_dir>/<video>/prototypes.safetensors` (see `pipeline.prototypes`)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from vss_lightning.io.files import atomic_write
from vss_lightning.io.png_store import PROTOTYPES
from vss_lightning.pipeline.prototypes import PrototypeError, VideoPrototypes

__all__ = ["PROTOTYPES", "PrototypeError", "VideoPrototypes", "load_prototypes", "save_prototypes"]


def save_prototypes(prototypes: VideoPrototypes, path: Path) -> None:
    """Write atomically (a temporary file renamed over `path`): a reader sees the old or the new file."""
    atomic_write(Path(path), prototypes.to_bytes())


def load_prototypes(path: Path) -> VideoPrototypes:
    """Read a prototypes file.

    Raises:
        PrototypeError: if it is missing, not safetensors, or lacks a field (naming it and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise PrototypeError(
            f"Expected the prototypes file {str(path)!r}, but it does not exist. Label the video with "
            "this version of vss_lightning (`predict` writes it next to the labels) and rerun."
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise PrototypeError(f"Expected {str(path)!r} to be a safetensors prototypes file: {e}") from e
    meta.setdefault("video_id", path.parent.name)
    return VideoPrototypes.from_bytes(path.read_bytes(), meta, repr(str(path)))
