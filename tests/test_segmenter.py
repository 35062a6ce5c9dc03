"""End-to-end pipeline on CPU with the tiny backbone, on real frames when present."""

from __future__ import annotations

import pytest
import torch

from vss_lightning.pipeline.modulation import ModulationSettings
from vss_lightning.pipeline.random_backbones import TinyStableDiffusion
from vss_lightning.pipeline.segmenter import VideoSegmenter, VideoState, batch_starts
from vss_lightning.pipeline.settings import (
    LABEL_SETTINGS,
    ContextSettings,
    FeatureSettings,
    FrameSettings,
    RefinementSettings,
    SamplingSettings,
    SpeedSettings,
)

NO_MODULATION = ModulationSettings(enabled=False)


def _segmenter(batch_size: int = 14, num_clusters: int = 4, **kw) -> VideoSegmenter:
    context = ContextSettings(batch_size=batch_size, num_clusters=num_clusters, kmeans_n_init=2)
    kw.setdefault("context", context)
    return VideoSegmenter(backbone=TinyStableDiffusion(seed=0), **kw).load("cpu")


def test_batch_starts_cover_every_frame_once_with_an_overlapping_last_batch():
    assert batch_starts(5, 14) == [0]
    assert batch_starts(28, 14) == [0, 14]
    assert batch_starts(30, 14) == [0, 14, 16]


def test_swan_one_batch_at_full_size(swan_frames):
    seg = _segmenter(modulation=NO_MODULATION)
    res = seg.segment(swan_frames, key="swan:0")
    assert res.labels.shape == (14, 480, 854)
    assert res.coarse.shape == (14, 28, 52)  # 1/16 of 448x832
    assert set(res.coarse.unique().tolist()) <= set(range(4))
    assert set(res.seconds) >= {"encode", "features", "context", "cbr", "modulation"}


def test_swan_full_method_picks_each_frames_labels_among_its_coarse_labels(swan_frames):
    # The modulated method on the real clip, downscaled so that the CPU run takes seconds. Determinism
    # run to run is pinned by tests/test_golden.py (in another process) and test_module.py (in one).
    small = torch.nn.functional.interpolate(swan_frames.float(), size=(128, 256), mode="area").round().byte()
    seg = _segmenter(speed=SpeedSettings(max_batch_images=64))
    a = seg.segment(small, key="swan:0")
    assert a.labels.shape == (14, 128, 256) and a.coarse.shape == (14, 8, 16)
    for t in range(14):
        assert set(a.labels[t].unique().tolist()) <= set(a.coarse[t].unique().tolist())
    assert len(a.labels.unique()) >= 2


def test_camvid_several_batches_first_frame_gt(camvid_clip):
    frames, gt = camvid_clip
    frames = frames[:18]  # batches start at 0, 8 and 10 (the last overlaps)
    seg = _segmenter(batch_size=8, modulation=NO_MODULATION)
    emitted, classes = [], set()
    state = VideoState()
    for out in seg.iter_segment(frames, first_frame_gt=gt[0], state=state, key="0006R0:0"):
        emitted.extend(out.indices)
        assert out.labels.shape[1:] == (360, 480)
        classes |= set(out.labels.unique().tolist())
    assert emitted == list(range(18))
    assert classes <= set(gt[0].unique().tolist()) - {255}  # the first frame's classes only
    # the context memory is one batch: 8 frames x (20 x 28) grid points at most
    assert state.context and int(state.context["memory_labels"].numel()) <= 8 * 20 * 28


def test_camvid_modulated_labels_are_a_subset_of_the_coarse_labels(camvid_clip):
    frames, _ = camvid_clip
    half = torch.nn.functional.interpolate(frames[:6].float(), size=(180, 240), mode="area").round().byte()
    seg = _segmenter(batch_size=4, speed=SpeedSettings(max_batch_images=64))
    res = seg.segment(half, key="0006R0:0")  # batches at 0 and 2 (overlap)
    assert res.labels.shape == (6, 180, 240)
    for t in range(6):
        assert set(res.labels[t].unique().tolist()) <= set(res.coarse[t].unique().tolist())


def test_clips_carry_the_context_memory(camvid_clip):
    frames, _ = camvid_clip
    seg = _segmenter(batch_size=4, modulation=NO_MODULATION)
    state = VideoState()
    first = seg.segment(frames[:8], state=state, key="v:0")
    second = seg.segment(frames[8:16], state=state, key="v:8")
    assert set(second.labels.unique().tolist()) <= set(first.coarse.unique().tolist())


def test_per_frame_kmeans_baseline_and_ablation_switches(camvid_clip):
    frames, _ = camvid_clip
    seg = _segmenter(
        context=ContextSettings(method="per_frame_kmeans", batch_size=4, num_clusters=4, kmeans_n_init=2),
        refinement=RefinementSettings(enabled=False),
        features=FeatureSettings(aggregate=False),
        modulation=NO_MODULATION,
    )
    res = seg.segment(frames[:4], key="v:0")
    assert res.labels.shape == (4, 360, 480)
    assert all(len(res.coarse[t].unique()) <= 4 for t in range(4))


def test_user_errors_are_clear():
    seg = _segmenter(modulation=NO_MODULATION)
    with pytest.raises(ValueError, match="at least one frame"):
        seg.segment(torch.zeros((0, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 channels"):
        seg.segment(torch.zeros((2, 4, 64, 64), dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        seg.segment(torch.zeros((2, 3, 64, 64)))
    with pytest.raises(ValueError, match="first_frame_gt"):
        seg.segment(torch.zeros((2, 3, 64, 64), dtype=torch.uint8), first_frame_gt=torch.zeros(32, 32))
    with pytest.raises(ValueError, match="num_clusters"):
        _segmenter(num_clusters=50, modulation=NO_MODULATION).segment(
            torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
        )  # 1 frame of 64x64 = 4x4 = 16 feature points < 50 clusters
    with pytest.raises(RuntimeError, match="load"):
        VideoSegmenter(backbone=TinyStableDiffusion()).segment(torch.zeros((1, 3, 64, 64), dtype=torch.uint8))


# Every field of a settings group, classified: the label-affecting ones are `LABEL_SETTINGS` (they
# enter the settings hash); these change only speed or memory. A new field must be added to one of
# the two (the test below fails until it is).
SPEED_ONLY = {
    "speed": {
        "max_batch_images",
        "vae_batch_images",
        "channels_last",
        "compile_vae_decoder",
        "compile_cache_dir",
        "reuse_prefix",
        "kmeans_backend",  # the same clusters (tests/test_torch_kmeans.py), except at exact ties
    },
}
GROUPS = {
    "frames": FrameSettings,
    "sampling": SamplingSettings,
    "features": FeatureSettings,
    "context": ContextSettings,
    "refinement": RefinementSettings,
    "modulation": ModulationSettings,
    "speed": SpeedSettings,
}


def test_every_settings_field_is_classified_as_label_affecting_or_speed_only():
    import dataclasses
    import inspect

    groups = set(inspect.signature(VideoSegmenter).parameters) - {"backbone", "seed"}
    assert groups == set(GROUPS) == set(LABEL_SETTINGS)
    for group, cls in GROUPS.items():
        label, speed = set(LABEL_SETTINGS[group]), SPEED_ONLY.get(group, set())
        assert not label & speed, (group, label & speed)
        assert {f.name for f in dataclasses.fields(cls)} == label | speed, (
            f"Classify the new fields of `{group}` in LABEL_SETTINGS (settings.py: they change the "
            "labels, so they enter the settings hash) or in SPEED_ONLY (here)."
        )
    assert "vae_tiling" in LABEL_SETTINGS["speed"]  # tiles change pixels at their seams


def test_settings_hash_ignores_speed_settings_only():
    def settings(backbone: TinyStableDiffusion | None = None, **groups) -> dict:
        return VideoSegmenter(backbone=backbone or TinyStableDiffusion(), **groups).settings()

    base = settings()
    speed = SpeedSettings(
        max_batch_images=8, channels_last=True, compile_vae_decoder=True, reuse_prefix=False
    )
    assert settings(speed=speed) == base
    assert settings(context=ContextSettings(num_clusters=7)) != base
    assert settings(speed=SpeedSettings(vae_tiling=True)) != base
    assert settings(seed=1) != base
    assert settings(TinyStableDiffusion(seed=1)) != base
    # the same settings written otherwise hash alike; an attribute outside the list changes nothing
    same = VideoSegmenter(
        backbone=TinyStableDiffusion(),
        sampling=SamplingSettings(guidance_scale=5),
        features=FeatureSettings(blocks=(6, 7, 8)),
    )
    same.something_new = 1
    assert same.settings() == base


@pytest.mark.parametrize(
    "setting",
    [
        {"frames": FrameSettings(resize="bilinear")},
        {"frames": FrameSettings(vae_encode="sample")},
        {"frames": FrameSettings(vae_dtype="float32")},
    ],
)
def test_reference_detail_settings_change_the_settings_hash(setting):
    from vss_lightning.module import ZeroShotVSS

    def digest(**kw) -> str:
        return ZeroShotVSS(segmenter=VideoSegmenter(backbone=TinyStableDiffusion(), **kw)).settings_hash()

    assert VideoSegmenter(backbone=TinyStableDiffusion()).frames.resize == "bicubic"
    assert digest(**setting) != digest()


def test_settings_are_checked_when_built():
    with pytest.raises(ValueError, match="sampling.noise_step"):
        VideoSegmenter(backbone=TinyStableDiffusion(), features=FeatureSettings(step=20))
    with pytest.raises(ValueError, match="context.batch_size"):
        ContextSettings(batch_size=0)
    with pytest.raises(ValueError, match="context.method"):
        ContextSettings(method="online")
    with pytest.raises(ValueError, match="frames.size_multiple"):
        FrameSettings(size_multiple=40)
    with pytest.raises(ValueError, match="refinement.jump_filter"):
        RefinementSettings(jump_filter="up")
    with pytest.raises(ValueError, match="speed.max_batch_images"):
        SpeedSettings(max_batch_images=1)


def test_channels_last_gives_the_same_labels(camvid_clip):
    frames, _ = camvid_clip
    half = torch.nn.functional.interpolate(frames[:2].float(), size=(180, 240), mode="area").round().byte()
    a = _segmenter(batch_size=2, speed=SpeedSettings(max_batch_images=64)).segment(half, key="v:0")
    speed = SpeedSettings(max_batch_images=64, channels_last=True)
    b = _segmenter(batch_size=2, speed=speed).segment(half, key="v:0")
    a, b = a.labels, b.labels
    assert (a == b).float().mean() > 0.999


@pytest.mark.slow
def test_compiled_vae_decoder_gives_the_same_labels():
    """torch.compile of the VAE decoder (slow: a CPU inductor compile) leaves the labels unchanged."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 3, 128, 192), dtype=torch.uint8, generator=g)
    speed = SpeedSettings(max_batch_images=64, vae_batch_images=4, compile_vae_decoder=False)
    a = _segmenter(batch_size=3, speed=speed).segment(frames, key="v:0").labels
    compiled = SpeedSettings(max_batch_images=64, vae_batch_images=4, compile_vae_decoder=True)
    b = _segmenter(batch_size=3, speed=compiled).segment(frames, key="v:0").labels
    assert (a == b).float().mean() > 0.999
