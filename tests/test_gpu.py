"""GPU checks (marker `gpu`, run with `pytest -m gpu`; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from vss_lightning.pipeline.backbone import RandomStableDiffusion
from vss_lightning.pipeline.segmenter import VideoSegmenter

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def test_fp16_agrees_with_fp32_on_a_real_clip(cuda, swan_frames):
    """Full-size SD 2.1-base architecture (random weights), the real swan clip, the full method."""
    frames = swan_frames[:6]
    out = {}
    for dtype in ("float32", "float16"):
        seg = VideoSegmenter(backbone=RandomStableDiffusion(dtype=dtype), batch_size=6, num_clusters=8)
        seg.load(cuda)
        out[dtype] = seg.segment(frames, key="swan:0")
        del seg
        torch.cuda.empty_cache()
    coarse = (out["float16"].coarse == out["float32"].coarse).float().mean().item()
    full = (out["float16"].labels == out["float32"].labels).float().mean().item()
    print(f"fp16 vs fp32 agreement: coarse {coarse:.4f}, full {full:.4f}")
    assert coarse >= 0.99
    assert full >= 0.99


def test_gpu_batched_equals_small_budget(cuda, swan_frames):
    frames = swan_frames[:4]
    labels = []
    for budget in (64, 4):
        seg = VideoSegmenter(
            backbone=RandomStableDiffusion(dtype="float16"),
            batch_size=4,
            num_clusters=6,
            max_batch_images=budget,
        ).load(cuda)
        labels.append(seg.segment(frames, key="swan:0").labels)
        del seg
        torch.cuda.empty_cache()
    agree = (labels[0] == labels[1]).float().mean().item()
    print(f"budget 64 vs 4 agreement: {agree:.5f}")
    assert agree >= 0.999
