"""The controlled attention processor against diffusers' default processor."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from vss_lightning.pipeline.attention import (
    AttentionControl,
    ControlledAttnProcessor,
    decoder_attention_layers,
    installed_processors,
)


def _unet_out(bb, x, t=119):
    emb = torch.cat([bb.uncond_embedding, bb.cond_embedding]).repeat_interleave(x.shape[0] // 2, 0)
    with torch.no_grad():
        return bb.unet(x, t, encoder_hidden_states=emb).sample


def test_empty_control_reproduces_default_processor(tiny_backbone):
    bb = tiny_backbone
    bb.unet.set_attn_processor(AttnProcessor2_0())
    x = torch.randn(4, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    ref = _unet_out(bb, x)
    all_layers = [k[: -len(".processor")] for k in bb.unet.attn_processors]
    control = AttentionControl()
    with installed_processors(bb.unet, all_layers, control):
        out = _unet_out(bb, x)
    assert torch.equal(out, ref)


def test_processors_are_restored_and_unknown_layers_refused(tiny_backbone):
    unet = tiny_backbone.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    layers = decoder_attention_layers(unet)
    with installed_processors(unet, layers, AttentionControl()):
        assert all(
            isinstance(unet.attn_processors[n + ".processor"], ControlledAttnProcessor) for n in layers
        )
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    with (
        pytest.raises(KeyError, match="up_blocks.9"),
        installed_processors(
            unet, ["up_blocks.9.attentions.0.transformer_blocks.0.attn1"], AttentionControl()
        ),
    ):
        pass


def test_record_capture_and_self_injection_is_identity(tiny_backbone):
    bb = tiny_backbone
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    layers = decoder_attention_layers(bb.unet)
    control = AttentionControl()
    with installed_processors(bb.unet, layers, control):
        control.record = set(layers)
        control.capture = {layers[0]}
        ref = _unet_out(bb, x)
        recorded = dict(control.recorded)
        captured = control.captured[layers[0]]
        control.reset()
        control.inject = recorded
        out = _unet_out(bb, x)
    assert set(recorded) == set(layers)
    q, k = recorded[layers[0]]
    assert q.dim() == 4 and q.shape[0] == 2  # (batch, heads, tokens, head_dim)
    assert captured.shape[0] == 2 and captured.shape[1] == q.shape[2]
    assert torch.equal(out, ref)


def test_injection_and_modulation_change_the_output(tiny_backbone):
    bb = tiny_backbone
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 4, 16, 24, generator=g)
    layers = decoder_attention_layers(bb.unet)
    control = AttentionControl()
    with installed_processors(bb.unet, layers, control):
        control.record = set(layers)
        _unet_out(bb, x1)
        rec1 = dict(control.recorded)
        control.reset()
        plain2 = _unet_out(bb, x2)
        control.inject = rec1
        injected2 = _unet_out(bb, x2)
        control.reset()
        name = "up_blocks.2.attentions.1.transformer_blocks.0.attn2"
        control.modulation = {name: torch.full((1, 1, 1), 5.0)}
        modulated2 = _unet_out(bb, x2)
    assert not torch.allclose(injected2, plain2)
    assert not torch.allclose(modulated2, plain2)


def test_injection_shape_mismatch_is_a_clear_error(tiny_backbone):
    bb = tiny_backbone
    layers = decoder_attention_layers(bb.unet)
    control = AttentionControl()
    with installed_processors(bb.unet, layers, control):
        control.record = set(layers)
        _unet_out(bb, torch.randn(2, 4, 16, 24))
        rec = dict(control.recorded)
        control.reset()
        control.inject = rec
        with pytest.raises(ValueError, match="Expected injected q/k"):
            _unet_out(bb, torch.randn(4, 4, 16, 24))


def test_injected_layers_skip_their_q_k_projections_with_the_same_output(tiny_backbone):
    """An injected layer's own q/k would be replaced: they are not computed (no to_q/to_k call), and the
    output is bit-identical to computing them first (forced here by also recording the layer)."""
    bb = tiny_backbone
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 4, 16, 24, generator=g), torch.randn(2, 4, 16, 24, generator=g)
    layers = decoder_attention_layers(bb.unet)
    calls = []
    hooks = [
        bb.unet.get_submodule(f"{n}.{proj}").register_forward_hook(lambda *_: calls.append(1))
        for n in layers
        for proj in ("to_q", "to_k")
    ]
    control = AttentionControl()
    try:
        with installed_processors(bb.unet, layers, control):
            control.record = set(layers)
            _unet_out(bb, x1)
            recorded = dict(control.recorded)
            control.reset()
            control.inject, control.record = recorded, set(layers)  # computes q/k, then replaces them
            computed = _unet_out(bb, x2)
            control.reset()
            calls.clear()
            control.inject = recorded
            skipped = _unet_out(bb, x2)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    assert torch.equal(skipped, computed)
