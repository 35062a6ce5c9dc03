"""End-to-end pipeline on CPU with the tiny backbone, on real frames when present."""

from __future__ import annotations

import pytest
import torch

from vss_lightning.pipeline.modulation import ModulationSettings
from vss_lightning.pipeline.random_backbones import TinyStableDiffusion
from vss_lightning.pipeline.segmenter import VideoSegmenter, VideoState, batch_starts


def _segmenter(**kw) -> VideoSegmenter:
    kw.setdefault("num_clusters", 4)
    kw.setdefault("kmeans_n_init", 2)
    return VideoSegmenter(backbone=TinyStableDiffusion(seed=0), **kw).load("cpu")


def test_batch_starts_cover_every_frame_once_with_an_overlapping_last_batch():
    assert batch_starts(5, 14) == [0]
    assert batch_starts(28, 14) == [0, 14]
    assert batch_starts(30, 14) == [0, 14, 16]


def test_swan_one_batch_at_full_size(swan_frames):
    seg = _segmenter(modulation=ModulationSettings(enabled=False))
    res = seg.segment(swan_frames, key="swan:0")
    assert res.labels.shape == (14, 480, 854)
    assert res.coarse.shape == (14, 28, 52)  # 1/16 of 448x832
    assert set(res.coarse.unique().tolist()) <= set(range(4))
    assert set(res.seconds) >= {"encode", "features", "context", "cbr", "modulation"}


def test_swan_full_method_is_deterministic(swan_frames):
    # The modulated method on the real clip, downscaled so that the CPU run takes seconds.
    small = torch.nn.functional.interpolate(swan_frames.float(), size=(128, 256), mode="area").round().byte()
    seg = _segmenter(max_batch_images=64)
    a = seg.segment(small, key="swan:0")
    b = seg.segment(small, key="swan:0")
    assert a.labels.shape == (14, 128, 256) and a.coarse.shape == (14, 8, 16)
    assert torch.equal(a.labels, b.labels)
    for t in range(14):
        assert set(a.labels[t].unique().tolist()) <= set(a.coarse[t].unique().tolist())
    assert len(a.labels.unique()) >= 2
    c = seg.segment(small, key="another-video:0")  # other noise, same method
    assert c.labels.shape == a.labels.shape


def test_camvid_several_batches_first_frame_gt(camvid_clip):
    frames, gt = camvid_clip
    frames = frames[:18]  # batches start at 0, 8 and 10 (the last overlaps)
    seg = _segmenter(batch_size=8, modulation=ModulationSettings(enabled=False))
    emitted = []
    state = VideoState()
    for out in seg.iter_segment(frames, first_frame_gt=gt[0], state=state, key="0006R0:0"):
        emitted.extend(out.indices)
        assert out.labels.shape[1:] == (360, 480)
    assert emitted == list(range(18))
    res = seg.segment(frames, first_frame_gt=gt[0], key="0006R0:0")
    frame1_classes = set(gt[0].unique().tolist()) - {255}
    assert set(res.labels.unique().tolist()) <= frame1_classes
    # the context memory is one batch: 8 frames x (20 x 28) grid points at most
    assert state.context and int(state.context["memory_labels"].numel()) <= 8 * 20 * 28


def test_camvid_modulated_labels_are_a_subset_of_the_coarse_labels(camvid_clip):
    frames, _ = camvid_clip
    seg = _segmenter(batch_size=4, max_batch_images=64)
    res = seg.segment(frames[:6], key="0006R0:0")  # batches at 0 and 2 (overlap)
    assert res.labels.shape == (6, 360, 480)
    for t in range(6):
        assert set(res.labels[t].unique().tolist()) <= set(res.coarse[t].unique().tolist())


def test_clips_carry_the_context_memory(camvid_clip):
    frames, _ = camvid_clip
    seg = _segmenter(batch_size=4, modulation=ModulationSettings(enabled=False))
    state = VideoState()
    first = seg.segment(frames[:8], state=state, key="v:0")
    second = seg.segment(frames[8:16], state=state, key="v:8")
    assert set(second.labels.unique().tolist()) <= set(first.coarse.unique().tolist())


def test_per_frame_kmeans_baseline_and_ablation_switches(camvid_clip):
    frames, _ = camvid_clip
    seg = _segmenter(
        batch_size=4,
        context="per_frame_kmeans",
        cbr=False,
        aggregate_features=False,
        modulation=ModulationSettings(enabled=False),
    )
    res = seg.segment(frames[:4], key="v:0")
    assert res.labels.shape == (4, 360, 480)
    assert all(len(res.coarse[t].unique()) <= 4 for t in range(4))


def test_user_errors_are_clear():
    seg = _segmenter(modulation=ModulationSettings(enabled=False))
    with pytest.raises(ValueError, match="at least one frame"):
        seg.segment(torch.zeros((0, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        seg.segment(torch.zeros((2, 4, 64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        seg.segment(torch.zeros((2, 3, 64, 64)))
    with pytest.raises(ValueError, match="first_frame_gt"):
        seg.segment(torch.zeros((2, 3, 64, 64), dtype=torch.uint8), first_frame_gt=torch.zeros(32, 32))
    with pytest.raises(ValueError, match="num_clusters"):
        _segmenter(num_clusters=50, modulation=ModulationSettings(enabled=False)).segment(
            torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
        )  # 1 frame of 64x64 = 4x4 = 16 feature points < 50 clusters
    with pytest.raises(RuntimeError, match="load"):
        VideoSegmenter(backbone=TinyStableDiffusion()).segment(torch.zeros((1, 3, 64, 64), dtype=torch.uint8))


def test_settings_hash_ignores_speed_settings_only():
    base = VideoSegmenter(backbone=TinyStableDiffusion()).settings()
    fast = VideoSegmenter(
        backbone=TinyStableDiffusion(),
        max_batch_images=8,
        channels_last=True,
        modulation=ModulationSettings(reuse_prefix=False),
    ).settings()
    assert fast == base
    assert VideoSegmenter(backbone=TinyStableDiffusion(), num_clusters=7).settings() != base
    assert VideoSegmenter(backbone=TinyStableDiffusion(seed=1)).settings() != base


@pytest.mark.parametrize(
    "setting", [{"resize": "bilinear"}, {"vae_encode": "sample"}, {"vae_dtype": "float32"}]
)
def test_reference_detail_settings_change_the_settings_hash(setting):
    from vss_lightning.module import ZeroShotVSS

    def digest(**kw) -> str:
        return ZeroShotVSS(segmenter=VideoSegmenter(backbone=TinyStableDiffusion(), **kw)).settings_hash()

    assert VideoSegmenter(backbone=TinyStableDiffusion()).resize == "bicubic"
    assert digest(**setting) != digest()


def test_channels_last_gives_the_same_labels(camvid_clip):
    frames, _ = camvid_clip
    kw = dict(batch_size=2, max_batch_images=64)
    a = _segmenter(**kw).segment(frames[:2], key="v:0").labels
    b = _segmenter(channels_last=True, **kw).segment(frames[:2], key="v:0").labels
    assert (a == b).float().mean() > 0.999


@pytest.mark.slow
def test_compiled_vae_decoder_gives_the_same_labels():
    """torch.compile of the VAE decoder (slow: a CPU inductor compile) leaves the labels unchanged."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 3, 128, 192), dtype=torch.uint8, generator=g)
    kw = dict(batch_size=3, max_batch_images=64, vae_batch_images=4)  # 3 = a padded last chunk
    a = _segmenter(**kw).segment(frames, key="v:0").labels
    b = _segmenter(compile_vae_decoder=True, **kw).segment(frames, key="v:0").labels
    assert (a == b).float().mean() > 0.999
