"""Noising, Euler CFG steps and the unmodulated pass against diffusers' scheduler."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_equal_up_to_rounding

from vss_lightning.pipeline.attention import AttentionControl
from vss_lightning.pipeline.sampler import resize_to_multiple
from vss_lightning.pipeline.sd import SDSampler


def test_resize_to_multiple_floors_sizes():
    frames = torch.randint(0, 256, (2, 3, 480, 854), dtype=torch.uint8)
    x = resize_to_multiple(frames)
    assert x.shape == (2, 3, 448, 832)
    assert x.min() >= -1 and x.max() <= 1
    same = resize_to_multiple(torch.full((1, 3, 128, 192), 255, dtype=torch.uint8))
    assert same.shape == (1, 3, 128, 192) and torch.all(same == 1)
    with pytest.raises(ValueError, match="at least 64x64"):
        resize_to_multiple(torch.zeros((1, 3, 50, 200), dtype=torch.uint8))


def test_schedule_is_trailing_and_noising_matches_diffusers(tiny_backbone):
    sm = SDSampler(tiny_backbone)
    assert sm.timesteps.tolist() == [999 - 40 * i for i in range(25)]
    assert list(sm.steps) == [22, 23, 24]
    z0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    sched = tiny_backbone.scheduler
    ref = sched.add_noise(z0, noise, sched.timesteps[22:23])
    torch.testing.assert_close(sm.add_noise(z0, noise), ref)


def test_cfg_step_equals_diffusers_euler_step(tiny_backbone):
    bb = tiny_backbone
    sm = SDSampler(bb, guidance_scale=5.0)
    sched = bb.scheduler
    x = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    ours = sm.cfg_step(x, 22, sm.condition(torch.zeros(3, 3, 64, 96)))
    sched.set_timesteps(25)
    sched.set_begin_index(22)
    t = sched.timesteps[22]
    inp = sched.scale_model_input(torch.cat([x, x]), t)
    emb = torch.cat([bb.uncond_embedding.expand(3, -1, -1), bb.cond_embedding.expand(3, -1, -1)])
    with torch.no_grad():
        eps = bb.unet(inp, t, encoder_hidden_states=emb).sample
    eu, ec = eps.chunk(2)
    ref = sched.step(eu + 5.0 * (ec - eu), t, x).prev_sample
    # One UNet evaluation in float32, our CFG batch vs the reference's: rounding of other shapes.
    assert_equal_up_to_rounding(ours, ref, 1000, "one CFG step")


def test_unmodulated_pass_records_every_decoder_layer_and_is_chunk_invariant(tiny_backbone):
    z = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    feat = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
    big_sm, small_sm = (SDSampler(tiny_backbone, max_batch_images=n) for n in (64, 2))
    cond = big_sm.condition(torch.zeros(3, 3, 64, 96))
    big = big_sm.unmodulated_pass(z, cond, AttentionControl(), [feat], 24)
    small = small_sm.unmodulated_pass(z, cond, AttentionControl(), [feat], 24)
    assert sorted(big.qk) == [22, 23, 24] and sorted(big.latents) == [22, 23, 24]
    # 6 decoder transformer blocks (the tiny UNet's up_blocks.1-2; SD 2.1 has 9) x (self, cross)
    assert len(big.qk[22]) == 12 and all(n.startswith(("up_blocks.1.", "up_blocks.2.")) for n in big.qk[22])
    q, k = big.qk[23][feat]
    assert q.shape[:2] == (2, 3)  # (branch, frame, heads, tokens, head_dim)
    assert big.features[feat].shape == (3, 4 * 6, q.shape[2] * q.shape[4])
    # Chunk sizes change only the kernels' blocking: float32 rounding, which the tiny SD UNet hardly
    # amplifies over 3 steps (measured on x86-64: 3e-7 relative on latents, 1e-6 on features, i.e.
    # < 10 eps); a budget of 1000 eps (1.2e-4 relative) leaves 100x for other CPUs.
    for step in (22, 23, 24):
        assert_equal_up_to_rounding(big.latents[step], small.latents[step], 1000, f"latents {step}")
        assert_equal_up_to_rounding(big.qk[step][feat][0], small.qk[step][feat][0], 1000, f"q {step}")
    assert_equal_up_to_rounding(big.features[feat], small.features[feat], 1000, "features")


def test_the_pass_records_only_the_qk_layers_it_is_given(tiny_backbone):
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    feat = "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
    sm = SDSampler(tiny_backbone, qk_layers=[])
    record = sm.unmodulated_pass(z, sm.condition(torch.zeros(2, 3, 64, 96)), AttentionControl(), [feat], 24)
    assert record.qk == {} and record.features[feat].shape[0] == 2 and record.conditioning is not None
    with pytest.raises(ValueError, match="qk_layers"):
        SDSampler(tiny_backbone, qk_layers=["down_blocks.1.attentions.0.transformer_blocks.0.attn1"])
    with pytest.raises(ValueError, match="start_step"):
        SDSampler(tiny_backbone, start_step=25)
