"""Convert video segmentation datasets into WebDataset shards (`python -m data_tools --help`).

Sources: `vspw`, `cityscapes`, `camvid`, `frames` (a folder per video) and `video` (video files). Each
scans its layout into a `common.Scan`; `writer.convert` checks every video, splits long ones into
clips and writes the shards in the schema of `vss_lightning.data.format` plus a `manifest.json`.
"""

from .common import ConversionError, DatasetInfo, FrameSpec, Scan, VideoSpec
from .writer import ShardWriter, convert

__all__ = ["ConversionError", "DatasetInfo", "FrameSpec", "Scan", "ShardWriter", "VideoSpec", "convert"]
