"""Data layer: the shard sample schema (`format`), the tar reader that reads only its fields
(`reader`) and the DataModule that reads shards (`datamodule`).

`format` is imported eagerly (light: numpy, torch, Pillow); the DataModule (Lightning, WebDataset) is
imported on first use, so `data_tools` can use the schema without loading Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .format import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SAMPLE_PIXELS,
    IGNORE_INDEX,
    SCHEMA,
    FailedSample,
    SampleError,
    VideoMeta,
    VideoSample,
    decode_sample,
    encode_png,
    encode_sample,
    sample_key,
    validate_name,
)

if TYPE_CHECKING:
    from .datamodule import VideoShardDataModule, VideoShardDataset

_LAZY = {"VideoShardDataModule", "VideoShardDataset"}

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SAMPLE_PIXELS",
    "IGNORE_INDEX",
    "SCHEMA",
    "FailedSample",
    "SampleError",
    "VideoMeta",
    "VideoSample",
    "VideoShardDataModule",
    "VideoShardDataset",
    "decode_sample",
    "encode_png",
    "encode_sample",
    "sample_key",
    "validate_name",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
