"""Backbone loading: tiny random, full-size random (shapes only), local folders and clear errors."""

from __future__ import annotations

import time

import pytest
import torch

from vss_lightning.pipeline.backbone import BackboneNotFoundError, StableDiffusion
from vss_lightning.pipeline.random_backbones import RandomStableDiffusion, TinyStableDiffusion


def test_tiny_backbone_is_deterministic_and_has_sd_layer_names():
    a, b = TinyStableDiffusion(seed=3).load(), TinyStableDiffusion(seed=3).load()
    c = TinyStableDiffusion(seed=4).load()
    pa, pb, pc = (torch.cat([p.flatten() for p in x.unet.parameters()]) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    names = a.unet.attn_processors
    for i in range(3):
        assert f"up_blocks.2.attentions.{i}.transformer_blocks.0.attn1.processor" in names
    assert a.vae_scale_factor == 8
    assert torch.count_nonzero(a.uncond_embedding) == 0 and a.cond_embedding.abs().sum() > 0


def test_full_size_random_backbone_has_the_sd21_base_architecture():
    bb = RandomStableDiffusion(dtype="float32").load("meta")
    assert sum(p.numel() for p in bb.unet.parameters()) == 865_910_724
    assert bb.unet.config.cross_attention_dim == 1024 and bb.cond_embedding.shape == (1, 77, 1024)
    assert bb.vae_scale_factor == 8


def _save_tiny_checkpoint(path, with_weights="safetensors"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bb = TinyStableDiffusion(seed=5).load()
    safe = with_weights == "safetensors"
    bb.unet.save_pretrained(path / "unet", safe_serialization=safe)
    bb.vae.save_pretrained(path / "vae", safe_serialization=safe)
    bb.scheduler.save_pretrained(path / "scheduler")
    torch.manual_seed(0)
    CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=100
        )
    ).save_pretrained(path / "text_encoder", safe_serialization=safe)
    tok = CLIPTokenizer(
        vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}, merges=[], model_max_length=77
    )
    tok.save_pretrained(path / "tokenizer")
    return bb


def test_loads_a_local_diffusers_folder(tmp_path):
    saved = _save_tiny_checkpoint(tmp_path)
    bb = StableDiffusion(str(tmp_path), dtype="float32").load("cpu")
    for p, q in zip(saved.unet.parameters(), bb.unet.parameters(), strict=True):
        assert torch.equal(p, q)
    assert bb.cond_embedding.shape == (1, 77, 16)
    assert bb.scheduler.config.timestep_spacing == "trailing"


def test_refuses_pickle_only_checkpoints(tmp_path):
    _save_tiny_checkpoint(tmp_path, with_weights="bin")
    with pytest.raises(BackboneNotFoundError, match="safetensors"):
        StableDiffusion(str(tmp_path), dtype="float32").load("cpu")


def test_missing_weights_fail_fast_with_a_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneNotFoundError, match="no unet/ folder"):
        StableDiffusion(str(tmp_path)).load("cpu")
    t0 = time.perf_counter()
    with pytest.raises(BackboneNotFoundError) as e:
        StableDiffusion("stabilityai/stable-diffusion-2-1-base", local_files_only=True).load("cpu")
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert "stabilityai/stable-diffusion-2-1-base" in msg and "smoke.yaml" in msg and "hf download" in msg


def test_unreachable_hub_fails_in_seconds_naming_the_offline_config(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(BackboneNotFoundError, match="cannot be reached") as e:
        StableDiffusion("stabilityai/stable-diffusion-2-1-base").load("cpu")
    assert time.perf_counter() - t0 < 10
    assert "configs/smoke.yaml" in str(e.value)
