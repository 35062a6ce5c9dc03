"""Issue #19 speed settings: decode chunks without padding, the compiled decoder's dynamic shapes, its
persistent cache, `max_batch_images: auto` from the free GPU memory, and the context stage's clocks.

No GPU is needed: the compiled decoder runs with the "eager" backend (Dynamo traces, nothing is
code-generated), counted by a backend that records each compile; the cards are simulated by
monkeypatching `torch.cuda`.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from diffusers import AutoencoderKL

from vss_lightning.pipeline import segmenter as segmenter_module
from vss_lightning.pipeline.budget import GIB, MemoryModel, free_device_memory
from vss_lightning.pipeline.context import CONTEXT_CLOCKS
from vss_lightning.pipeline.modulation import ModulationSettings
from vss_lightning.pipeline.random_backbones import TinyStableDiffusion
from vss_lightning.pipeline.sampler import (
    COMPILE_CACHE_ENV,
    compile_decoder,
    decode_in_chunks,
    use_compile_cache_dir,
)
from vss_lightning.pipeline.segmenter import VideoSegmenter
from vss_lightning.pipeline.settings import DEFAULT_COMPILE_CACHE_DIR, ContextSettings, SpeedSettings

NO_MODULATION = ModulationSettings(enabled=False)  # the budget and clocks need no modulated runs


class CompileCounter:
    """A `torch.compile` backend that runs the traced graph eagerly and counts the compiles."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _random_frames(n: int, size: tuple[int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=g)


def _vae() -> AutoencoderKL:
    """A tiny SD-layout VAE with the mid-block attention (whose token count follows the frame size)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
    )
    return vae.eval().requires_grad_(False)


# -- decode chunks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_decode_chunks_divide_the_work_without_padding(chunk_size):
    for n in range(1, 30):
        sizes: list[int] = []

        def decode(z: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(z.shape[0])
            return z * 2

        latents = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
        out = decode_in_chunks(latents, chunk_size, decode)
        assert torch.equal(out, latents * 2)
        assert sum(sizes) == n  # every decoded image is used: no padding
        assert len(sizes) == math.ceil(n / chunk_size)
        assert max(sizes) <= chunk_size and max(sizes) - min(sizes) <= 1, (n, sizes)


# -- the compiled decoder ----------------------------------------------------------------------------
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_decoder_compiles_once_for_every_chunk_size_and_frame_size():
    vae = _vae()
    eager = vae.decoder
    counter = CompileCounter()
    compiled = compile_decoder(eager, backend=counter)
    seen: list[tuple[int, ...]] = []
    compiled.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    g = torch.Generator().manual_seed(0)
    for h, w in ((8, 12), (10, 6)):  # two frame sizes (latents)
        for n in (2, 5, 8, 13, 20):  # chunks of 2..7 latents with vae_batch_images 7
            z = torch.randn(n, 4, h, w, generator=g)
            with torch.no_grad():
                vae.decoder = eager
                expected = decode_in_chunks(z, 7, lambda c: vae.decode(c).sample)
                vae.decoder = compiled
                got = decode_in_chunks(z, 7, lambda c: vae.decode(c).sample)
            assert torch.equal(got, expected)  # the eager backend: exactly eager decoding
    assert counter.graphs == 1, f"compiled {counter.graphs} times for the input shapes {sorted(set(seen))}"
    assert {s[0] for s in seen} >= {2, 4, 5, 6, 7} and {s[2:] for s in seen} == {(8, 12), (10, 6)}
    assert sum(s[0] for s in seen) == 2 * sum((2, 5, 8, 13, 20))  # no padded decode


@pytest.mark.usefixtures("fresh_dynamo")
def test_the_segmenter_compiles_the_decoder_once_with_the_same_labels(monkeypatch, tmp_path):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)  # restored after the test
    counter = CompileCounter()
    monkeypatch.setattr(segmenter_module, "compile_decoder", lambda d: compile_decoder(d, backend=counter))
    context = ContextSettings(batch_size=3, num_clusters=3, kmeans_n_init=1)

    def segmenter(compile_vae_decoder: bool) -> VideoSegmenter:
        speed = SpeedSettings(
            max_batch_images=64, vae_batch_images=5, compile_vae_decoder=compile_vae_decoder,
            compile_cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        return VideoSegmenter(backbone=TinyStableDiffusion(seed=0), context=context, speed=speed).load("cpu")

    eager, compiled = segmenter(False), segmenter(True)
    assert isinstance(compiled.sampler.bb.vae.decoder, torch._dynamo.OptimizedModule)
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "cache")
    g = torch.Generator().manual_seed(0)
    for size in ((64, 128), (128, 64)):  # two frame sizes: one compile
        frames = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=g)
        a = eager.segment(frames, key="v:0").labels
        b = compiled.segment(frames, key="v:0").labels
        assert torch.equal(a, b)
    assert counter.graphs == 1


def test_compile_vae_decoder_auto_means_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert SpeedSettings().compile_vae_decoder == "auto"
    assert not SpeedSettings().compiles_vae_decoder(cpu)
    assert SpeedSettings().compiles_vae_decoder(cuda)
    assert SpeedSettings(compile_vae_decoder=True).compiles_vae_decoder(cpu)
    assert not SpeedSettings(compile_vae_decoder=False).compiles_vae_decoder(cuda)
    with pytest.raises(ValueError, match="speed.compile_vae_decoder"):
        SpeedSettings(compile_vae_decoder="yes")
    # on the CPU the default leaves the decoder eager
    seg = VideoSegmenter(backbone=TinyStableDiffusion(seed=0)).load("cpu")
    assert not isinstance(seg.sampler.bb.vae.decoder, torch._dynamo.OptimizedModule)


# -- the persistent compile cache --------------------------------------------------------------------
def test_compile_cache_dir_is_where_inductor_caches(monkeypatch, tmp_path):
    from torch._inductor.codecache import FxGraphCache
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    target = tmp_path / "compile"
    assert use_compile_cache_dir(str(target)) == str(target)
    assert target.is_dir()
    assert cache_dir() == str(target)  # what Inductor's FX graph, AOTAutograd and Triton caches use
    assert FxGraphCache._get_tmp_dir().startswith(str(target))
    assert triton_cache_dir(0).startswith(str(target))
    # the environment wins over the setting
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "from_env"))
    assert use_compile_cache_dir(str(target)) == str(tmp_path / "from_env")
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "from_env")
    # None leaves torch's default
    monkeypatch.delenv(COMPILE_CACHE_ENV)
    assert use_compile_cache_dir(None) is None and COMPILE_CACHE_ENV not in os.environ
    # the default setting: under the user's cache folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert SpeedSettings().compile_cache_dir == DEFAULT_COMPILE_CACHE_DIR
    expected = tmp_path / "home" / ".cache" / "vss_lightning" / "torch_compile"
    assert use_compile_cache_dir(DEFAULT_COMPILE_CACHE_DIR) == str(expected)


# -- max_batch_images: auto ---------------------------------------------------------------------------
SD21_WEIGHTS_BYTES = (865_910_724 + 83_653_863) * 2  # UNet + VAE parameters, float16
CARDS_GB = (24, 80, 141)
LATENT_832x448, LATENT_1280x704 = (56, 104), (88, 160)


def _simulate_card(monkeypatch, total_gb: float) -> None:
    """A CUDA card of `total_gb` (decimal GB) holding the SD 2.1 weights and a 0.5 GiB context."""
    total = int(total_gb * 1e9)
    free = total - SD21_WEIGHTS_BYTES - GIB // 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))


def test_memory_model_reproduces_the_measured_peak():
    model = MemoryModel(frames_per_batch=14, steps=3)

    def peak_gib(budget: int, latent: tuple[int, int]) -> float:
        return (model.workspace_bytes(budget, latent) + SD21_WEIGHTS_BYTES) / GIB

    # PERF-NOTES: 17.1 GiB peak at 832x448 with the default budget (56); 1280x704: ~38.8 GiB, ~27 at 28
    assert peak_gib(56, LATENT_832x448) == pytest.approx(17.1, abs=0.2)
    assert peak_gib(56, LATENT_1280x704) == pytest.approx(38.8, abs=0.3)
    assert peak_gib(28, LATENT_1280x704) == pytest.approx(27, abs=0.5)
    # float32 doubles it; no q/k (no injection) and no prefix leave the activations only
    assert MemoryModel(14, 3, dtype_bytes=4).workspace_bytes(8, LATENT_832x448) == pytest.approx(
        2 * model.workspace_bytes(8, LATENT_832x448)
    )
    bare = MemoryModel(14, 3, keeps_qk=False, keeps_prefix=False)
    assert bare.workspace_bytes(56, LATENT_832x448) == pytest.approx(9.8 * GIB)


@pytest.mark.parametrize("latent", [LATENT_832x448, LATENT_1280x704, (128, 256)])
def test_auto_budgets_are_monotone_in_the_card_and_fit_it(monkeypatch, latent):
    model = MemoryModel(frames_per_batch=14, steps=3)
    budgets = []
    for gb in CARDS_GB:
        _simulate_card(monkeypatch, gb)
        free = free_device_memory(torch.device("cuda"))
        budget = model.max_batch_images(free, latent)
        assert budget >= 2 and (budget == 2 or budget % 4 == 0)
        assert budget <= MemoryModel.ceiling(latent) <= 56
        if budget > 2:  # 2 is the floor even when nothing fits (2048x1024 on a 24 GB card)
            assert model.workspace_bytes(budget, latent) <= 0.9 * free - GIB
            bigger = budget + 4
            assert bigger > model.ceiling(latent) or model.workspace_bytes(bigger, latent) > 0.9 * free - GIB
        budgets.append(budget)
    assert budgets == sorted(budgets), budgets


def test_auto_budget_keeps_1280x704_under_40_gb_and_832x448_at_56(monkeypatch):
    model = MemoryModel(frames_per_batch=14, steps=3)
    _simulate_card(monkeypatch, 80)
    free = free_device_memory(torch.device("cuda"))
    budget = model.max_batch_images(free, LATENT_1280x704)
    assert budget == 20
    assert model.workspace_bytes(budget, LATENT_1280x704) + SD21_WEIGHTS_BYTES <= 40e9  # decimal GB
    for gb in CARDS_GB:  # the paper's size gets today's default on every card
        _simulate_card(monkeypatch, gb)
        assert model.max_batch_images(free_device_memory(torch.device("cuda")), LATENT_832x448) == 56


def test_auto_budget_on_the_cpu_is_the_old_default_and_is_fitted_per_frame_size():
    assert free_device_memory(torch.device("cpu")) is None
    context = ContextSettings(batch_size=2, num_clusters=3, kmeans_n_init=1)
    seg = VideoSegmenter(backbone=TinyStableDiffusion(seed=0), context=context, modulation=NO_MODULATION)
    seg.load("cpu")
    assert seg.speed.max_batch_images == "auto" and seg.sampler.max_batch_images == 56
    frames = _random_frames(2, (64, 128))
    seg.segment(frames)
    assert seg.sampler.max_batch_images == 56  # CPU: no memory model
    # the CUDA path's plumbing, with a simulated 24 GB reading at load
    model = MemoryModel(frames_per_batch=2, steps=3, dtype_bytes=4)
    seg._memory = (model, 1 * GIB)
    seg.segment(frames)
    fitted = model.max_batch_images(1 * GIB, (8, 16))
    assert seg.sampler.max_batch_images == fitted
    seg.sampler.max_batch_images = 2  # e.g. the OOM retry's halved budget: kept for the same size
    seg.segment(frames)
    assert seg.sampler.max_batch_images == 2
    seg.segment(torch.zeros((2, 3, 128, 128), dtype=torch.uint8))  # a new size is fitted again
    assert seg.sampler.max_batch_images == model.max_batch_images(1 * GIB, (16, 16))


def test_max_batch_images_values_are_checked():
    assert SpeedSettings().max_batch_images == "auto"
    assert SpeedSettings(max_batch_images=2).max_batch_images == 2
    for bad in (1, "big", True, 2.5):
        with pytest.raises(ValueError, match="speed.max_batch_images"):
            SpeedSettings(max_batch_images=bad)


# -- the context stage's clocks -----------------------------------------------------------------------
def test_context_stage_clocks_kmeans_and_knn_and_stays_their_total():
    context = ContextSettings(batch_size=2, num_clusters=3, kmeans_n_init=1)
    seg = VideoSegmenter(backbone=TinyStableDiffusion(seed=0), context=context, modulation=NO_MODULATION)
    seg.load("cpu")
    frames = _random_frames(3, (64, 128))
    res = seg.segment(frames, key="v:0")
    kmeans, knn = CONTEXT_CLOCKS
    assert {kmeans, knn, "context"} <= set(res.seconds)
    assert res.seconds["context"] == pytest.approx(res.seconds[kmeans] + res.seconds[knn], abs=1e-9)
    # without a dict: no clocks, the same labels
    labels = torch.cat([out.labels for out in seg.iter_segment(frames, key="v:0")])
    assert torch.equal(labels, res.labels)
    per_frame = VideoSegmenter(
        backbone=TinyStableDiffusion(seed=0),
        context=ContextSettings(method="per_frame_kmeans", batch_size=2, num_clusters=3, kmeans_n_init=1),
        modulation=NO_MODULATION,
    ).load("cpu")
    seconds = per_frame.segment(frames, key="v:0").seconds
    assert kmeans in seconds and knn not in seconds
    assert seconds["context"] == pytest.approx(seconds[kmeans], abs=1e-9)
