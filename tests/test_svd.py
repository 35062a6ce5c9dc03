"""The Stable Video Diffusion backbone: layer names, loading, sampler and conditioning against diffusers,
controlled processors, modulation identities and layout, configs, and the method end to end on swan."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from shards import one_torch_thread
from tolerance import assert_equal_up_to_rounding

from vss_lightning import cli
from vss_lightning.pipeline.attention import AttentionControl, installed_processors
from vss_lightning.pipeline.backbone import BackboneNotFoundError
from vss_lightning.pipeline.modulation import decoder_block_layer
from vss_lightning.pipeline.random_backbones import (
    SVD_SCHEDULER_CONFIG,
    RandomStableVideoDiffusion,
    TinyStableDiffusion,
    TinyStableVideoDiffusion,
)
from vss_lightning.pipeline.sd import SDModulation, SDSampler
from vss_lightning.pipeline.segmenter import VideoSegmenter
from vss_lightning.pipeline.settings import ContextSettings, SamplingSettings, SpeedSettings
from vss_lightning.pipeline.svd import StableVideoDiffusion, SVDSampler, SVDSettings, svd_block_layer
from vss_lightning.pipeline.svd_modulation import SVDModulation, svd_modulation_settings

FEATS = [svd_block_layer(b, "self") for b in (6, 7, 8)]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the tiny models gain little from two, and on a busy machine the OpenMP
    threads of parallel test processes thrash (measured: 12 s instead of 97 s for two tests)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny_svd():
    return TinyStableVideoDiffusion(seed=0).load("cpu")


def _frames(n: int, h: int = 64, w: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# Runs of the random tiny SVD that differ only in batch shape agree to rounding, amplified by the
# 8 EDM steps: the random network is chaotic (a float32 rounding difference grows to ~1e-2 relative),
# so identities are checked in float64, where the differences measured on x86-64 reach 6e-8 relative
# (~3e8 eps). The budget, 5e10 eps = 1.1e-5 relative, leaves ~200x for other CPUs' kernels, and is
# still 100x below what the defects these tests guard against do (a modulation, a misplaced or
# missing injection: > 1e-3 relative, see the `not allclose(..., atol=1e-3)` checks).
SVD_FLOAT64_AMPLIFICATION = 5e10


@pytest.fixture(scope="module")
def batch():
    """An unmodulated pass over 2 random 64x128 frames (latent 8x16, feature grid 4x8), in float64.

    The random tiny UNet amplifies float32 rounding (which depends on the batch size) over the 8
    steps to ~1e-2, so identities between runs of different batch sizes are checked in float64.
    """
    bb = TinyStableVideoDiffusion(seed=0).load("cpu")
    for m in (bb.unet, bb.vae, bb.image_encoder):
        m.to(torch.float64)
    # the family's sampler for the paper's settings: records the temporal self-attention q/k
    sm = TinyStableVideoDiffusion().make_sampler(
        bb, svd_modulation_settings(), SpeedSettings(max_batch_images=64, reuse_prefix=False), start_step=17
    )
    x = _frames(2).double()
    z0 = sm.encode(x)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zt = sm.add_noise(z0, noise)
    record = sm.unmodulated_pass(zt, sm.condition(x), AttentionControl(), FEATS, 24)
    return sm, record


# -- layer names and backbones ------------------------------------------------------------------------
def test_block_numbers_map_to_diffusers_svd_layer_names(tiny_svd):
    assert svd_block_layer(8, "self") == "up_blocks.2.attentions.2.transformer_blocks.0.attn1"
    assert (
        svd_block_layer(8, "self", "temporal")
        == "up_blocks.2.attentions.2.temporal_transformer_blocks.0.attn1"
    )
    assert (
        svd_block_layer(3, "cross", "temporal")
        == "up_blocks.1.attentions.0.temporal_transformer_blocks.0.attn2"
    )
    names = tiny_svd.unet.attn_processors
    # The tiny SVD has attention at the 1/16 and 1/32 levels only (decoder blocks 3-8; cheap on a CPU),
    # the real one also at 1/8 (blocks 9-11).
    for block in range(3, 12):
        for attention in ("self", "cross"):
            for kind in ("spatial", "temporal"):
                assert (svd_block_layer(block, attention, kind) + ".processor" in names) == (block < 9)
    assert TinyStableVideoDiffusion().attention_layer(7, "self") == decoder_block_layer(7, "self")
    with pytest.raises(ValueError, match="decoder block"):
        svd_block_layer(2, "self")
    with pytest.raises(ValueError, match="'spatial' or 'temporal'"):
        svd_block_layer(8, "self", "time")


def test_tiny_backbone_is_seeded_and_full_size_random_has_the_svd_architecture(tiny_svd):
    a, b, c = (TinyStableVideoDiffusion(seed=s).load() for s in (3, 3, 4))
    pa, pb, pc = (torch.cat([p.flatten() for p in x.unet.parameters()]) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert tiny_svd.vae_scale_factor == 8 and len(tiny_svd.unet.up_blocks) == 4
    full = RandomStableVideoDiffusion(dtype="float32").load("meta")
    assert sum(p.numel() for p in full.unet.parameters()) == 1_524_623_082
    assert sum(p.numel() for p in full.image_encoder.parameters()) == 632_076_800  # CLIP ViT-H/14 + proj
    assert full.unet.config.cross_attention_dim == full.image_encoder.config.projection_dim == 1024
    assert full.vae_scale_factor == 8 and full.image_size == 224
    assert "fps14" in TinyStableVideoDiffusion().description


def _save_tiny_checkpoint(path, safe: bool = True):
    from transformers import CLIPImageProcessor

    bb = TinyStableVideoDiffusion(seed=5).load()
    bb.unet.save_pretrained(path / "unet", safe_serialization=safe)
    bb.vae.save_pretrained(path / "vae", safe_serialization=safe)
    bb.image_encoder.save_pretrained(path / "image_encoder", safe_serialization=safe)
    CLIPImageProcessor().save_pretrained(path / "feature_extractor")
    bb.scheduler.save_pretrained(path / "scheduler")
    return bb


def test_loads_a_local_diffusers_folder_and_refuses_pickles(tmp_path):
    saved = _save_tiny_checkpoint(tmp_path / "ok")
    bb = StableVideoDiffusion(str(tmp_path / "ok"), dtype="float32").load("cpu")
    for p, q in zip(saved.unet.parameters(), bb.unet.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(saved.image_encoder.parameters(), bb.image_encoder.parameters(), strict=True):
        assert torch.equal(p, q)
    assert bb.scheduler.config.use_karras_sigmas and bb.scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(bb.image_mean, saved.image_mean)
    _save_tiny_checkpoint(tmp_path / "bin", safe=False)
    with pytest.raises(BackboneNotFoundError, match="safetensors"):
        StableVideoDiffusion(str(tmp_path / "bin"), dtype="float32").load("cpu")


def test_missing_weights_fail_fast_with_a_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError, match="no unet/ folder"):
        StableVideoDiffusion(str(tmp_path)).load("cpu")
    t0 = time.perf_counter()
    with pytest.raises(BackboneNotFoundError, match="cannot be reached") as e:
        StableVideoDiffusion().load("cpu")
    assert time.perf_counter() - t0 < 10
    assert "stabilityai/stable-video-diffusion-img2vid" in str(e.value)
    assert "configs/smoke_svd.yaml" in str(e.value)


# -- sampler and conditioning against diffusers ------------------------------------------------------
def test_schedule_and_noising_match_diffusers(tiny_svd):
    sm = SVDSampler(tiny_svd, start_step=17)
    ramp = torch.linspace(0, 1, 25, dtype=torch.float64)
    edm = (700.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 700.0 ** (1 / 7))) ** 7  # EDM, rho 7
    assert torch.allclose(sm.sigmas[:25], edm, rtol=1e-5) and sm.sigmas[25] == 0
    assert list(sm.steps) == list(range(17, 25))
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    sched.set_timesteps(25)
    assert torch.equal(sm.sigmas[17:].float(), sched.sigmas[17:])
    assert torch.allclose(sm.timesteps, 0.25 * sched.sigmas[:-1].log())
    z0, noise = torch.randn(3, 4, 8, 16), torch.randn(3, 4, 8, 16)
    ref = sched.add_noise(z0, noise, sched.timesteps[17].repeat(3))
    # z0 + sigma * noise in float32 either way (elementwise: no reduction order to differ).
    assert_equal_up_to_rounding(sm.add_noise(z0, noise), ref, 4, "noised latents")


def test_conditioning_equals_the_diffusers_pipeline(tiny_svd):
    from transformers import CLIPImageProcessor

    settings = SVDSettings(fps_id=14, motion_bucket_id=127, cond_aug=0.02, noise_seed=3)
    sm = SVDSampler(tiny_svd, start_step=17, conditioning=settings)
    pipe = StableVideoDiffusionPipeline(
        vae=tiny_svd.vae,
        image_encoder=tiny_svd.image_encoder,
        unet=tiny_svd.unet,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessor(),
    )
    arr = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
    cond = sm.condition(x[None])
    with torch.no_grad():
        embedding = pipe._encode_image(Image.fromarray(arr), "cpu", 1, False)
        noise = torch.randn((1, 3, 64, 128), generator=torch.Generator().manual_seed(3))
        latent = pipe._encode_vae_image(x[None] + 0.02 * noise, "cpu", 1, False)
    # The same modules on the same inputs in the same shapes; the inputs differ by the resize path
    # (ours in torch, the pipeline's in PIL/NumPy), a few float32 rounding units of the pixels.
    assert_equal_up_to_rounding(cond.image_embedding, embedding, 100, "CLIP image embedding")
    assert_equal_up_to_rounding(cond.image_latent, latent, 100, "conditioning latent")
    # The pipeline turns its `fps` argument into the id `fps - 1` before `_get_add_time_ids`.
    ids = pipe._get_add_time_ids(15 - 1, 127, 0.02, torch.float32, 1, 1, False)
    assert torch.equal(cond.added_time_ids, ids)
    assert torch.allclose(sm.guidance(14), torch.linspace(1.0, 2.5, 14))


def test_vae_sample_is_seeded_and_the_conditioning_stays_the_mode(tiny_svd):
    sm = SVDSampler(tiny_svd, start_step=17)
    x = _frames(2)
    mean = sm.encode(x)
    cond = sm.condition(x).image_latent
    a = sm.encode(x, torch.Generator().manual_seed(3))
    # the first-frame conditioning is the posterior mode, whatever `encode` draws
    assert torch.equal(sm.condition(x).image_latent, cond)
    b = sm.encode(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, mean, atol=1e-3)


def test_one_cfg_step_equals_the_pipeline_loop_with_scheduler_step(tiny_svd):
    sm = SVDSampler(tiny_svd, start_step=17)
    g = torch.Generator().manual_seed(4)
    cond = sm.condition(_frames(1))
    x = torch.randn(1, 3, 4, 8, 16, generator=g) * float(sm.sigmas[19])
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    sched.set_timesteps(25)
    t = sched.timesteps[19]
    with torch.no_grad():  # the body of StableVideoDiffusionPipeline.__call__'s loop
        model_in = sched.scale_model_input(torch.cat([x, x]), t)
        image_latents = torch.cat([torch.zeros_like(cond.image_latent), cond.image_latent])
        model_in = torch.cat([model_in, image_latents[:, None].repeat(1, 3, 1, 1, 1)], dim=2)
        emb = torch.cat([torch.zeros_like(cond.image_embedding), cond.image_embedding])
        ids = cond.added_time_ids.repeat(2, 1)
        v = tiny_svd.unet(model_in, t, encoder_hidden_states=emb, added_time_ids=ids).sample
        v_u, v_c = v.chunk(2)
        v = v_u + torch.linspace(1.0, 2.5, 3).view(1, 3, 1, 1, 1) * (v_c - v_u)
        ref = sched.step(v, t, x).prev_sample
    out = sm.cfg_step(x, 19, cond)
    # One UNet evaluation; ours batches the CFG branches in another shape than the pipeline: float32
    # rounding through one step of the tiny SVD (its chaos needs several steps to grow).
    assert_equal_up_to_rounding(out, ref, 1000, "one CFG step")


# -- controlled processors ----------------------------------------------------------------------------
def _unet_out(bb, x, cond_seed=0):
    g = torch.Generator().manual_seed(cond_seed)
    emb = torch.randn(x.shape[0], 1, bb.unet.config.cross_attention_dim, generator=g)
    ids = torch.tensor([[14.0, 127.0, 0.02]]).repeat(x.shape[0], 1)
    with torch.no_grad():
        return bb.unet(x, torch.tensor(0.3), encoder_hidden_states=emb, added_time_ids=ids).sample


def test_processors_reproduce_default_attention_and_self_injection_is_identity(tiny_svd):
    bb = tiny_svd
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(2, 3, 8, 8, 16, generator=g), torch.randn(2, 3, 8, 8, 16, generator=g)
    assert all(isinstance(p, AttnProcessor2_0) for p in bb.unet.attn_processors.values())
    ref1, ref2 = _unet_out(bb, x1), _unet_out(bb, x2)
    every = [k[: -len(".processor")] for k in bb.unet.attn_processors]
    temporal_self = [n for n in every if "temporal" in n and n.endswith("attn1")]
    cross = [n for n in every if n.endswith("attn2")]
    control = AttentionControl()
    with installed_processors(bb.unet, every, control):
        assert torch.equal(_unet_out(bb, x1), ref1)  # empty control = AttnProcessor2_0
        control.record = set(every)
        _unet_out(bb, x1)
        rec = dict(control.recorded)
        first = next(n for n in temporal_self if n.startswith("down_blocks.1."))  # at 1/2 latent size
        q, k = rec[first]
        assert q.shape[0] == 2 * 4 * 8 and q.shape[2] == 3  # (videos x pixels, heads, frames, d)
        control.reset()
        control.inject = {n: rec[n] for n in temporal_self}
        assert torch.equal(_unet_out(bb, x1), ref1)  # self-injection is the identity
        control.inject = {n: rec[n] for n in cross}  # another input's cross-attention q/k ...
        # ... change nothing: with one key the softmax is exactly 1 whatever q and k are, so only the
        # kernel's path may differ; a few rounding units of float32 at most.
        assert_equal_up_to_rounding(_unet_out(bb, x2), ref2, amplification=64, what="one-key cross")
        control.inject = {n: rec[n] for n in temporal_self}
        assert not torch.allclose(_unet_out(bb, x2), ref2, atol=1e-3)


# -- modulation ---------------------------------------------------------------------------------------
def test_modulation_terms_follow_the_unet_layouts(batch):
    sm, _ = batch
    mm = SVDModulation(svd_modulation_settings(strength=2.0), sm)
    g = torch.Generator().manual_seed(6)
    masks = (torch.rand(2, 3, 4, 8, generator=g) > 0.5).float()  # (U, F, h, w)
    signs = torch.tensor([1.0, -1.0])
    terms = mm._terms(masks, signs, 32)
    spatial, temporal = (terms[svd_block_layer(8, "self", t)] for t in ("spatial", "temporal"))
    assert spatial.shape == (2 * 2 * 3, 32, 1) and temporal.shape == (2 * 2 * 32, 3, 1)
    for branch in range(2):
        for u in range(2):
            for f in range(3):
                for s in range(32):
                    want = 2.0 * float(signs[u]) * float(masks[u, f, s // 8, s % 8])
                    assert spatial[(branch * 2 + u) * 3 + f, s, 0] == want
                    assert temporal[(branch * 2 + u) * 32 + s, f, 0] == want


def test_zero_strength_with_injection_reproduces_the_unmodulated_pass(batch):
    sm, record = batch
    mm = SVDModulation(svd_modulation_settings(strength=0.0), sm)
    masks = (torch.rand(2, 2, 4, 8, generator=torch.Generator().manual_seed(7)) > 0.5).double()
    out = mm.run_units(record, masks, torch.tensor([1.0, -1.0]))
    assert out.shape == (2, 2, 4, 8, 16)
    assert set(record.qk[17]) == set(sm.qk_layers) and all("temporal" in n for n in sm.qk_layers)
    for u in range(2):
        assert_equal_up_to_rounding(out[u], record.latents[24], SVD_FLOAT64_AMPLIFICATION, f"unit {u}")


def test_modulated_units_batch_freely_and_blending_keeps_the_outside(batch):
    sm, record = batch
    mm = SVDModulation(svd_modulation_settings(strength=50.0), sm)
    masks = torch.zeros(2, 2, 4, 8, dtype=torch.float64)
    masks[0, :, :2] = 1  # top half in every frame
    masks[1, 1, :, 4:] = 1  # right half of frame 1 only
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64)
    both = mm.run_units(record, masks, signs)
    alone = torch.cat([mm.run_units(record, masks[i : i + 1], signs[i : i + 1]) for i in range(2)])
    assert_equal_up_to_rounding(both, alone, SVD_FLOAT64_AMPLIFICATION, "batched vs one at a time")
    lat_mask = torch.nn.functional.interpolate(masks.flatten(0, 1)[:, None], size=(8, 16))
    lat_mask = lat_mask.view(2, 2, 1, 8, 16)  # (U, F, 1, h8, w8)
    outside = (1 - lat_mask).expand_as(both).bool()
    orig = record.latents[24][None].expand_as(both)
    assert torch.equal(both[outside], orig[outside])  # blended after the last step
    assert not torch.allclose(both[~outside], orig[~outside], atol=1e-3)


def test_settings_are_checked(batch, tiny_backbone):
    sm, record = batch
    with pytest.raises(ValueError, match="modulation.steps"):
        SVDModulation(svd_modulation_settings(steps=[3]), sm)
    with pytest.raises(ValueError, match="layer_types"):
        SVDModulation(svd_modulation_settings(layer_types=[]), sm)
    with pytest.raises(ValueError, match="layer_types"):  # SD has no temporal attention
        SDModulation(svd_modulation_settings(steps=[22], blend_steps=[22]), SDSampler(tiny_backbone))
    other_size = sm.condition(_frames(1, 128, 128).double())
    with pytest.raises(ValueError, match="conditioning of the batch"):
        sm.unmodulated_pass(record.start_latent, other_size, AttentionControl(), FEATS, 24)


def test_the_family_gives_its_sampler_the_injected_layers(batch):
    sm, _ = batch
    family = TinyStableVideoDiffusion()
    temporal = family.make_sampler(sm.bb, svd_modulation_settings(), start_step=17)
    assert temporal.qk_layers and all(".temporal_transformer_blocks." in n for n in temporal.qk_layers)
    assert all(n.endswith(".attn1") for n in temporal.qk_layers)
    both = family.make_sampler(sm.bb, svd_modulation_settings(inject_layer_types=["spatial", "temporal"]))
    assert set(both.qk_layers) == {n for n in both.layers if n.endswith(".attn1")}
    assert family.make_sampler(sm.bb, svd_modulation_settings(inject=False), start_step=17).qk_layers == []
    assert isinstance(family.make_modulation(svd_modulation_settings(), temporal), SVDModulation)


@pytest.mark.parametrize("name", ["reuse_prefix", "channels_last", "vae_tiling"])
def test_a_setting_the_video_family_ignores_is_an_error(name):
    speed = SpeedSettings(**{"reuse_prefix": False, name: True})
    with pytest.raises(ValueError, match=rf"`speed.{name}` to be false .*speed.{name} false"):
        VideoSegmenter(TinyStableVideoDiffusion(), modulation=svd_modulation_settings(), speed=speed)
    VideoSegmenter(TinyStableDiffusion(), speed=speed)  # the image family runs it


def test_temporal_layer_types_with_an_image_backbone_are_an_error():
    with pytest.raises(ValueError, match="modulation.layer_types"):
        VideoSegmenter(
            TinyStableDiffusion(), modulation=svd_modulation_settings(steps=[22], blend_steps=[22])
        )


# -- configs and the method end to end --------------------------------------------------------------
@pytest.mark.parametrize("name", ["smoke_svd.yaml", "vspw_svd.yaml"])
def test_configs_parse_without_loading_weights(name, capsys, monkeypatch):
    from jsonargparse import ArgumentParser

    for cls in (StableVideoDiffusion, TinyStableVideoDiffusion):
        monkeypatch.setattr(cls, "load", lambda self, device="cpu": pytest.fail("weights were loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--config", f"configs/{name}", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    seg_config = config["model"]["segmenter"]
    parser = ArgumentParser()
    parser.add_argument("--segmenter", type=VideoSegmenter)
    seg = parser.instantiate_classes(parser.parse_object({"segmenter": seg_config})).segmenter
    assert (
        type(seg.backbone)
        is {"smoke_svd.yaml": TinyStableVideoDiffusion, "vspw_svd.yaml": StableVideoDiffusion}[name]
    )
    assert seg.sampling.noise_step == 17 and seg.feature_layers == FEATS
    assert seg.modulation.layer_types == ["spatial", "temporal"] and seg.modulation.steps == [17]
    assert seg.modulation.blend_steps == list(range(17, 25)) and seg.modulation.block == 8


def test_swan_segments_with_full_size_labels(swan_frames):
    # The real clip, downscaled so the CPU run takes seconds; 80x150 is resized to 64x128 inside.
    # Seven frames in one batch of seven. Run to run determinism: tests/test_golden.py pins the labels
    # of the SVD smoke config (in another process, so across runs).
    frames = swan_frames[:7]
    small = torch.nn.functional.interpolate(frames.float(), size=(80, 150), mode="area").round().byte()
    seg = VideoSegmenter(
        backbone=TinyStableVideoDiffusion(seed=0),
        sampling=SamplingSettings(noise_step=17, guidance_scale=2.5),
        context=ContextSettings(batch_size=7, num_clusters=3, kmeans_n_init=2),
        modulation=svd_modulation_settings(),
        speed=SpeedSettings(max_batch_images=56, reuse_prefix=False),
    ).load("cpu")
    a = seg.segment(small, key="swan:0")
    assert a.labels.shape == (7, 80, 150) and a.coarse.shape == (7, 4, 8)
    for f in range(7):
        assert set(a.labels[f].unique().tolist()) <= set(a.coarse[f].unique().tolist())
    assert set(a.coarse.unique().tolist()) <= set(range(3))


def test_injected_qk_is_gathered_inside_each_layer_with_the_same_latents(batch, monkeypatch):
    """The processors receive the record's own temporal q/k (one unit per forward: its rows are a view
    of them, no copy) and the latents are bit for bit those of gathering every layer's q/k up front."""
    import vss_lightning.pipeline.modulation as modulation
    from vss_lightning.pipeline.attention import ControlledAttnProcessor

    sm, record = batch
    recorded = {id(t) for layers in record.qk.values() for qk in layers.values() for t in qk}
    seen: list[tuple[bool, bool]] = []  # (received the record's tensors, its rows share their storage)
    real_call = ControlledAttnProcessor.__call__

    def call(self, attn, *args, **kwargs):
        ctl = self.control
        if self.name in ctl.inject:
            q, k = ctl.inject[self.name]
            rows = ctl.inject_rows(q) if ctl.inject_rows is not None else q
            seen.append(
                (
                    id(q) in recorded and id(k) in recorded,
                    rows.untyped_storage().data_ptr() == q.untyped_storage().data_ptr(),
                )
            )
        return real_call(self, attn, *args, **kwargs)

    monkeypatch.setattr(ControlledAttnProcessor, "__call__", call)
    mm = SVDModulation(svd_modulation_settings(strength=50.0), sm)
    masks = (torch.rand(1, 2, 4, 8, generator=torch.Generator().manual_seed(3)) > 0.5).double()
    signs = torch.tensor([1.0], dtype=torch.float64)
    z = mm.run_units(record, masks, signs)
    assert len(seen) == len(sm.qk_layers) * len(sm.steps) and all(a and b for a, b in seen)

    class Eager(AttentionControl):  # the earlier path: every layer's rows gathered when the step is set
        def __setattr__(self, name, value):
            if name == "inject_rows" and value is not None:
                super().__setattr__("inject", {n: (value(q), value(k)) for n, (q, k) in self.inject.items()})
                value = None
            super().__setattr__(name, value)

    seen.clear()
    monkeypatch.setattr(modulation, "AttentionControl", Eager)
    assert torch.equal(mm.run_units(record, masks, signs), z)
    assert seen and not any(a for a, _ in seen)
