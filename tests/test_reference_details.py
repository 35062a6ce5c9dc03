"""The details where the method follows the reference implementation (issue 15, docs/method.md):
PIL-equivalent frame resize, clamped decodes, the argmax at the frame's own resolution, the VAE
posterior mean or a seeded posterior sample, and a VAE kept in float32 beside a low-precision UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vss_lightning.pipeline.modulation import ModulationSettings
from vss_lightning.pipeline.random_backbones import TinyStableDiffusion
from vss_lightning.pipeline.sampler import resize_to_multiple
from vss_lightning.pipeline.scoring import LabelVote, difference_maps, filter_by_mask, upsample_labels
from vss_lightning.pipeline.sd import SDModulation, SDSampler
from vss_lightning.pipeline.segmenter import VideoSegmenter, noise_seed
from vss_lightning.pipeline.settings import ContextSettings, FrameSettings


# -- resize -------------------------------------------------------------------------------------------
def _pil_resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's default `Image.resize` (bicubic, antialiased) of (T, 3, H, W) uint8 frames to (H', W')."""
    out = [np.asarray(Image.fromarray(f.permute(1, 2, 0).numpy()).resize((size[1], size[0]))) for f in frames]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _check_against_pil(frames: torch.Tensor, want_size: tuple[int, int]) -> None:
    x = resize_to_multiple(frames)
    assert tuple(x.shape[-2:]) == want_size
    ours = ((x + 1) * 127.5).round().to(torch.int16)  # exact: x = v / 127.5 - 1 for integer v
    ref = _pil_resize(frames, want_size).to(torch.int16)
    diff = (ours - ref).abs()
    # Measured on x86-64: max 1 grey level, on 0.015% (swan) and 0.014% (CamVid) of the values;
    # the one-pass 2-D bicubic gives up to 6 (swan) and 14 (CamVid) levels, the old float bilinear
    # up to 20 and 37. 2 levels and 0.1% leave room for other CPUs' rounding.
    assert diff.max() <= 2, f"max difference to PIL {int(diff.max())} grey levels"
    assert (diff > 0).float().mean() < 1e-3, f"{float((diff > 0).float().mean()):.2%} of values differ"


def test_bicubic_resize_equals_pil_on_swan(swan_frames):
    _check_against_pil(swan_frames, (448, 832))  # 854x480 -> 832x448


def test_bicubic_resize_equals_pil_on_camvid(camvid_clip):
    _check_against_pil(camvid_clip[0], (320, 448))  # 480x360 -> 448x320


def test_bilinear_resize_is_kept_as_an_option():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 70, 150), dtype=torch.uint8, generator=g)
    x = frames.float() / 127.5 - 1
    want = F.interpolate(x, size=(64, 128), mode="bilinear", align_corners=False, antialias=True).clamp(-1, 1)
    assert torch.equal(resize_to_multiple(frames, mode="bilinear"), want)
    bicubic = resize_to_multiple(frames)
    assert not torch.equal(bicubic, want)
    levels = (bicubic + 1) * 127.5  # the bicubic result lies on the uint8 grid
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="Expected `resize`"):
        resize_to_multiple(frames, mode="nearest")


# -- clamped decodes --------------------------------------------------------------------------------
def test_difference_maps_clamp_decoded_outliers():
    g = torch.Generator().manual_seed(0)
    plus = torch.rand(2, 3, 32, 40, generator=g) * 1.6 - 0.8
    minus = plus.clone()
    minus[:, :, 8:16, 8:16] -= 0.5  # the real difference: a square of 0.5 per channel
    clean = difference_maps(plus, minus, 5, 3.0)
    spiky = plus.clone()
    spiky[0, :, 30, 35] = 40.0  # fp16-decode outliers far outside [-1, 1]
    spiky[1, :, 2, 2] = -25.0
    spiky_minus = minus.clone()
    spiky_minus[1, :, 2, 2] = -1.0  # same pixel clamped to -1 in both: no difference
    got = difference_maps(spiky, spiky_minus, 5, 3.0)
    want = difference_maps(spiky.clamp(-1, 1), spiky_minus.clamp(-1, 1), 5, 3.0)
    assert torch.equal(got, want)
    # the square still holds the maximum; the outlier neither tops the map nor flattens the square
    assert got[0, 10:14, 10:14].min() > 0.9 and got[1, 10:14, 10:14].min() > 0.9
    assert got[0, 28:, 33:].max() < 1.0
    assert got[1, :5, :5].max() < 1e-6
    # without the clamp the outlier would own the map
    raw = (spiky - spiky_minus).pow(2).sum(1).sqrt()
    assert raw[0].argmax() == 30 * 40 + 35
    assert torch.allclose(clean[:, 10:14, 10:14], got[:, 10:14, 10:14], atol=0.2)


# -- argmax at the frame's own resolution -------------------------------------------------------------
def _ramps(width: int, cross: float) -> torch.Tensor:
    """(2, 8, width) maps linear in x that cross at x = `cross` (decoded-pixel coordinates)."""
    x = torch.arange(width, dtype=torch.float32).expand(8, width)
    d1 = 0.5 + (x - cross) / (4 * width)
    return torch.stack([1 - d1, d1])


@pytest.mark.parametrize(("cross", "old_differs"), [(20.3, False), (21.4, True), (43.85, False)])
def test_edges_land_where_the_maps_cross_at_full_resolution(cross, old_differs):
    # Maps at the decoded width 64, frame width 70: the edge falls where the bilinearly resized maps
    # cross, not at the nearest resize of a decoded-size argmax (nor on the 8-px latent grid).
    w_img, w_out = 64, 70
    vote = LabelVote(1, (8, w_out), "cpu")
    vote.add(torch.tensor([0, 0]), _ramps(w_img, cross), torch.tensor([3, 7]))
    row = vote.best[0, 4]
    u = torch.arange(w_out, dtype=torch.float64)
    p = (u + 0.5) * w_img / w_out - 0.5  # output pixel centre in decoded coordinates
    want = torch.where(p > cross, 7, 3)
    assert torch.equal(row, want)
    assert set(vote.best.unique().tolist()) == {3, 7}
    first = int((row == 7).nonzero()[0])
    assert (first - 1) * w_img / w_out - 0.5 < cross  # previous pixel is still on the other side
    # the old way: argmax at 64 px, nearest to 70 px
    old = torch.where(torch.arange(w_img) > cross, 7, 3)[(torch.arange(w_out) * w_img / w_out).floor().long()]
    assert torch.equal(old, want) != old_differs  # when it differs, one output pixel moves


def test_label_vote_ties_go_to_the_label_added_first_and_frames_may_repeat():
    vote = LabelVote(2, (4, 6), "cpu")
    same = torch.full((4, 6), 0.5)
    higher = same.clone()
    higher[:, 3:] = 0.75
    vote.add(torch.tensor([0, 0, 1]), torch.stack([same, same, same]), torch.tensor([1, 4, 4]))
    vote.add(torch.tensor([0]), higher[None], torch.tensor([9]))
    assert torch.equal(vote.best[0, :, :3], torch.full((4, 3), 1))
    assert torch.equal(vote.best[0, :, 3:], torch.full((4, 3), 9))
    assert torch.equal(vote.best[1], torch.full((4, 6), 4))


def test_mask_filter_then_resize_equals_the_filter_at_the_decoded_size():
    g = torch.Generator().manual_seed(2)
    d = torch.rand(3, 32, 48, generator=g)
    masks = (torch.rand(3, 2, 3, generator=g) > 0.5).float()
    smooth = F.interpolate(masks[:, None], size=(32, 48), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(filter_by_mask(d, masks, 0.7), d * smooth + 0.7 * d * (1 - smooth))


def test_no_modulation_baseline_is_one_bilinear_upsampling_to_the_frame_size():
    g = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 5, (3, 4, 6), generator=g) * 3  # labels 0, 3, ..., 12
    size = (70, 100)  # the frame's own size (not a multiple of the grid)
    got = upsample_labels(coarse, size)
    values = coarse.unique()
    onehot = (coarse[:, None] == values.view(1, -1, 1, 1)).float()
    want = values[F.interpolate(onehot, size=size, mode="bilinear", align_corners=False).argmax(1)]
    assert got.shape == (3, 70, 100)
    assert torch.equal(got, want)


def test_modulated_labels_come_at_the_requested_output_size(tiny_backbone):
    from vss_lightning.pipeline.attention import AttentionControl

    sm = SDSampler(tiny_backbone, max_batch_images=64)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 128, generator=g) * 2 - 1
    zt = sm.add_noise(sm.encode(x), torch.randn(2, 4, 8, 16))
    feat = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
    record = sm.unmodulated_pass(zt, sm.condition(x), AttentionControl(), [feat], 24)
    coarse = torch.zeros(2, 4, 8, dtype=torch.long)
    coarse[:, :, 4:] = 2
    mm = SDModulation(ModulationSettings(), sm)
    at_frame = mm.labels(record, coarse, (64, 128), (75, 150))
    at_image = mm.labels(record, coarse, (64, 128))
    assert at_frame.shape == (2, 75, 150) and at_image.shape == (2, 64, 128)
    assert set(at_frame.unique().tolist()) <= {0, 2}
    # same maps, only sampled at other pixel centres: the label layout agrees almost everywhere
    near = F.interpolate(at_image[:, None].float(), size=(75, 150), mode="nearest")[:, 0].long()
    assert (near == at_frame).float().mean() > 0.9


# -- VAE posterior: mean or seeded sample -------------------------------------------------------------
def test_vae_sample_is_seeded_and_differs_from_the_mean(tiny_backbone):
    sm = SDSampler(tiny_backbone, vae_batch_images=2)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = sm.encode(x)
    a = sm.encode(x, torch.Generator().manual_seed(5))
    b = SDSampler(tiny_backbone, vae_batch_images=8).encode(x, torch.Generator().manual_seed(5))
    c = sm.encode(x, torch.Generator().manual_seed(6))
    assert torch.equal(sm.encode(x), mean)
    # same seed, other chunking: the same eps, the encoder's float32 rounding only
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, mean, atol=1e-3) and not torch.allclose(a, c, atol=1e-3)
    # a sample is mean + std * eps with eps ~ N(0, 1)
    dist = tiny_backbone.vae.encode(x).latent_dist
    eps = (a / tiny_backbone.vae.config.scaling_factor - dist.mean) / dist.std
    assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1) < 0.2


def _segmenter(batch_size: int = 14, **kw) -> VideoSegmenter:
    kw.setdefault("context", ContextSettings(batch_size=batch_size, num_clusters=3, kmeans_n_init=1))
    return VideoSegmenter(backbone=TinyStableDiffusion(seed=0), **kw).load("cpu")


def test_vae_sample_is_seeded_from_the_video_key(monkeypatch):
    seg = _segmenter(
        batch_size=2, frames=FrameSettings(vae_encode="sample"), modulation=ModulationSettings(enabled=False)
    )
    seeds, latents = [], []
    real = seg.sampler.encode

    def spy(x, generator=None):
        seeds.append(None if generator is None else generator.initial_seed())
        z = real(x, generator)
        latents.append(z)
        return z

    monkeypatch.setattr(seg.sampler, "encode", spy)
    frames = torch.randint(
        0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    a = seg.segment(frames, key="video-a:0")
    assert seeds == [noise_seed(0, "video-a:0", s, "vae") for s in (0, 1)]  # batches at 0 and 1
    assert len(set(seeds) | {noise_seed(0, "video-a:0", 0)}) == 3  # not the noising stream
    b = seg.segment(frames, key="video-a:0")
    assert torch.equal(a.labels, b.labels) and torch.equal(latents[0], latents[2])
    seg.segment(frames, key="video-b:0")
    assert seeds[4] != seeds[0] and not torch.allclose(latents[4], latents[0], atol=1e-3)
    seg.frames.vae_encode = "mean"
    seg.segment(frames, key="video-a:0")
    assert seeds[6] is None and not torch.allclose(latents[6], latents[0], atol=1e-3)


# -- VAE dtype --------------------------------------------------------------------------------------------
def test_vae_can_stay_float32_beside_a_low_precision_unet():
    # bfloat16 is computed as such on the CPU (float16 is not), so it stands in for a GPU's float16.
    seg = VideoSegmenter(
        backbone=TinyStableDiffusion(seed=0, dtype="bfloat16"),
        context=ContextSettings(num_clusters=2, kmeans_n_init=1),
        frames=FrameSettings(vae_dtype="float32"),
    ).load("cpu")
    loaded = seg._loaded
    assert loaded.dtype == torch.bfloat16 and loaded.vae_dtype == torch.float32
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = seg.sampler.encode(x)
    assert z.dtype == torch.float32
    assert seg.sampler.decode(z).dtype == torch.float32
    auto = VideoSegmenter(backbone=TinyStableDiffusion(seed=0, dtype="bfloat16")).load("cpu")
    assert auto._loaded.vae_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Expected `frames.vae_dtype`"):
        FrameSettings(vae_dtype="float16")
    with pytest.raises(ValueError, match="Expected `frames.vae_encode`"):
        FrameSettings(vae_encode="mode")
