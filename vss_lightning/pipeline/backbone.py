"""Stable Diffusion backbones: the real SD 2.1-base checkpoint, a tiny random one for tests, and a
full-size random one for benchmarks.

A backbone object holds settings only; `load(device)` does the heavy work and returns a
`LoadedBackbone` (UNet, VAE, Euler scheduler, prompt embeddings). This keeps `--help` and
`--print_config` instant when a backbone is part of a LightningCLI config.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

DTypeName = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

SD21_BASE_ID = "stabilityai/stable-diffusion-2-1-base"

# The SD 2.1-base architecture (unet/config.json, vae/config.json, scheduler of the hub checkpoint).
SD21_UNET_CONFIG = dict(
    act_fn="silu",
    attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    use_linear_projection=True,
    upcast_attention=False,
)
SD21_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="trailing",
)
SD21_TEXT_LENGTH = 77
SD21_TEXT_DIM = 1024


class BackboneNotFoundError(RuntimeError):
    """The weights of a backbone cannot be found or loaded."""


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint (so a machine without access fails in seconds)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(model_id: str, revision: str | None) -> bool:
    """Whether the checkpoint's UNet config is already in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "unet/config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's generators while random weights are built; the CPU generator is restored after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def resolve_source(
    model_id: str,
    revision: str | None,
    local_files_only: bool,
    folders: str,
    save_hint: str,
    offline_config: str,
) -> tuple[str, bool]:
    """Where to load a checkpoint from, and whether to stay offline; fails fast with the fix.

    Args:
        model_id: hub id or local folder.
        revision: hub revision.
        local_files_only: never touch the network.
        folders: the subfolders a local checkpoint must have (for the message).
        save_hint: how to write such a folder (for the message).
        offline_config: the config that works without the hub (for the message).

    Returns:
        (source for `from_pretrained`, offline flag).
    """
    local = Path(model_id).expanduser()
    if local.exists() and not (local / "unet").is_dir():
        raise BackboneNotFoundError(
            f"Expected `model_id` {model_id!r} to be a diffusers folder with {folders}, but it has no unet/ "
            f"folder. Save the checkpoint with `{save_hint}` or `hf download <hub id> --local-dir DIR`."
        )
    offline = local_files_only or local.exists() or _in_hub_cache(model_id, revision)
    if not offline and not _hub_reachable():
        raise BackboneNotFoundError(
            f"Expected to download `model_id` {model_id!r} from the Hugging Face hub, but the hub "
            f"({_hub_endpoint()}) cannot be reached from this machine and the model is not in the local "
            f"cache.\nFix: download it on a machine with access (`hf download {model_id} --local-dir DIR`), "
            "copy DIR here and pass it as `model_id` (`--model.segmenter.init_args.backbone.init_args."
            f"model_id DIR`); or try the tool offline with `{offline_config}` (tiny random backbone, CPU)."
        )
    return (str(local) if local.exists() else model_id), offline


class LoadedModels:
    """Device, dtype and VAE scale of loaded `unet` and `vae` attributes (shared by SD and SVD)."""

    unet: torch.nn.Module
    vae: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's dtype (the UNet's, unless the segmenter keeps the VAE in float32)."""
        return next(self.vae.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass
class LoadedBackbone(LoadedModels):
    """A backbone ready to run.

    Attributes:
        unet: the denoiser (eval mode, no grad).
        vae: the autoencoder.
        scheduler: an `EulerDiscreteScheduler` with trailing timestep spacing (its noise schedule is
            the checkpoint's).
        cond_embedding: (1, S, D) text embedding of the empty prompt (conditional CFG branch).
        uncond_embedding: (1, S, D) all-zero embedding (unconditional CFG branch).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: EulerDiscreteScheduler
    cond_embedding: torch.Tensor
    uncond_embedding: torch.Tensor


def _finish(unet, vae, scheduler, cond, device, dtype) -> LoadedBackbone:
    for m in (unet, vae):
        if next(m.parameters()).dtype != dtype:
            m.to(dtype=dtype)
    unet = unet.to(device=device).eval().requires_grad_(False)
    vae = vae.to(device=device).eval().requires_grad_(False)
    cond = cond.to(device=device, dtype=dtype)
    return LoadedBackbone(unet, vae, scheduler, cond, torch.zeros_like(cond))


def _resolve_dtype(dtype: DTypeName, device: torch.device) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"Expected `dtype` to be one of {sorted(_DTYPES)}, but got {dtype!r}.")
    if device.type == "cpu" and dtype == "float16":
        # fp16 convolutions are slow or missing on CPU; compute in fp32 there.
        return torch.float32
    return _DTYPES[dtype]


class Backbone(ABC):
    """Settings of a diffusion backbone; `load` builds it on a device."""

    @abstractmethod
    def load(self, device: torch.device | str = "cpu") -> LoadedBackbone:
        """Build or load the models on `device`."""

    @property
    @abstractmethod
    def description(self) -> str:
        """A short, stable description (used in the settings hash of outputs)."""

    # Extension points: a backbone family (SD, SVD) names its layers and builds its own sampler and
    # modulation; the segmenter only talks to these interfaces.
    def attention_layer(self, block: int, attention: str) -> str:
        """The layer name of a decoder block's attention (paper numbering of decoder blocks)."""
        from .modulation import decoder_block_layer

        return decoder_block_layer(block, attention)

    def make_sampler(self, loaded: LoadedBackbone, **settings):
        """The sampler of this backbone family (`DiffusionSampler` for SD)."""
        from .sampler import DiffusionSampler

        return DiffusionSampler(loaded, **settings)

    def make_modulation(self, settings, sampler):
        """The full-resolution step of this backbone family (`MaskedModulation` for SD)."""
        from .modulation import MaskedModulation

        return MaskedModulation(settings, sampler)


class StableDiffusion(Backbone):
    """Stable Diffusion 2.1-base (or a compatible checkpoint) from the hub or a local folder.

    Args:
        model_id: hub id (e.g. "stabilityai/stable-diffusion-2-1-base") or a local folder in diffusers
            layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
        dtype: compute dtype on GPU ("float16" is computed as float32 on CPU).
        variant: weight file variant (e.g. "fp16"), or None for the default files.
        revision: hub revision (branch, tag or commit), or None.
        local_files_only: never touch the network (use the local cache or folder only).
    """

    def __init__(
        self,
        model_id: str = SD21_BASE_ID,
        dtype: DTypeName = "float16",
        variant: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> None:
        self.model_id = model_id
        self.dtype = dtype
        self.variant = variant
        self.revision = revision
        self.local_files_only = local_files_only

    @property
    def description(self) -> str:
        return f"StableDiffusion({self.model_id}@{self.revision or 'main'},{self.variant or 'default'})"

    def load(self, device: torch.device | str = "cpu") -> LoadedBackbone:
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device)
        dtype = _resolve_dtype(self.dtype, device)
        source, offline = resolve_source(
            self.model_id,
            self.revision,
            self.local_files_only,
            folders="unet/, vae/, text_encoder/, tokenizer/ and scheduler/",
            save_hint="StableDiffusionPipeline.save_pretrained(DIR)",
            offline_config="configs/smoke.yaml",
        )
        kw = dict(revision=self.revision, local_files_only=offline)
        try:
            unet = UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=dtype, variant=self.variant, use_safetensors=True, **kw
            )
            vae = AutoencoderKL.from_pretrained(
                source, subfolder="vae", torch_dtype=dtype, variant=self.variant, use_safetensors=True, **kw
            )
            text_encoder = CLIPTextModel.from_pretrained(
                source, subfolder="text_encoder", variant=self.variant, use_safetensors=True, **kw
            )
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
            sched_cfg = EulerDiscreteScheduler.load_config(source, subfolder="scheduler", **kw)
        except (OSError, ValueError) as e:  # hub errors are OSError subclasses
            raise BackboneNotFoundError(
                f"Expected `model_id` to name a loadable Stable Diffusion checkpoint (hub id or local "
                f"folder, safetensors weights), but loading {self.model_id!r} failed: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
                "Fix: on a machine with hub access run `hf download stabilityai/stable-diffusion-2-1-base "
                "--local-dir DIR` and pass `--model.segmenter.init_args.backbone.init_args.model_id DIR`; "
                "a checkpoint with only .bin/.ckpt weights must first be converted to safetensors "
                "(load it with diffusers on a trusted machine and `save_pretrained(DIR, "
                "safe_serialization=True)`); or try the tool offline with `configs/smoke.yaml` "
                "(tiny random backbone)."
            ) from e
        scheduler = EulerDiscreteScheduler.from_config(sched_cfg, timestep_spacing="trailing")
        with torch.no_grad():
            ids = tokenizer(
                [""],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            cond = text_encoder(ids)[0]
        del text_encoder
        return _finish(unet, vae, scheduler, cond, device, dtype)


class TinyStableDiffusion(Backbone):
    """A tiny random-weight backbone of the same diffusers classes and layer names as SD 2.1-base.

    Four UNet levels with two layers per block, so `up_blocks.2.attentions.{0,1,2}` exist and the
    feature grid is 1/16 of the frame; an 8x VAE. Cheap on a CPU: 8-16 channels, attention only at
    the 1/16 and 1/32 levels (SD 2.1 also attends at 1/8, where a 448x320 frame has 2,240 tokens)
    and none in the VAE's middle block. Built from `seed` in code: no download, no files.
    A tiny CLIP text encoder gives the empty-prompt embedding from its special-token ids (no
    tokenizer files needed).

    Args:
        seed: seed of the random weights.
        dtype: compute dtype ("float16" is computed as float32 on CPU).
    """

    def __init__(self, seed: int = 0, dtype: DTypeName = "float32") -> None:
        self.seed = seed
        self.dtype = dtype

    @property
    def description(self) -> str:
        return f"TinyStableDiffusion(seed={self.seed})"

    def load(self, device: torch.device | str = "cpu") -> LoadedBackbone:
        from transformers import CLIPTextConfig, CLIPTextModel

        device = torch.device(device)
        dtype = _resolve_dtype(self.dtype, device)
        with seeded(self.seed):
            unet = UNet2DConditionModel(
                block_out_channels=(8, 8, 16, 16),
                layers_per_block=2,
                sample_size=32,
                in_channels=4,
                out_channels=4,
                # attention at the 1/16 and 1/32 levels only (SD 2.1 also has it at 1/8, which costs
                # a CPU most of the tiny model's time); the feature blocks up_blocks.2 are there
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=16,
                attention_head_dim=(1, 2, 2, 2),
                norm_num_groups=4,
                use_linear_projection=True,
            )
            vae = AutoencoderKL(
                block_out_channels=[4, 4, 8, 8],
                in_channels=3,
                out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=4,
                norm_num_groups=2,
                layers_per_block=1,
                mid_block_add_attention=False,
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    bos_token_id=0,
                    eos_token_id=2,
                    pad_token_id=1,
                    hidden_size=16,
                    intermediate_size=32,
                    num_attention_heads=2,
                    num_hidden_layers=2,
                    vocab_size=100,
                    max_position_embeddings=77,
                )
            ).eval()
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
        ids = torch.tensor([[0, 2] + [1] * 75])  # <bos> <eos> <pad>...: the empty prompt
        with torch.no_grad():
            cond = text_encoder(ids)[0]
        return _finish(unet, vae, scheduler, cond, device, dtype)


class RandomStableDiffusion(Backbone):
    """The full-size SD 2.1-base UNet and VAE with random weights, built from their configs.

    Costs the same time and memory as the real checkpoint: this is how speed and memory are measured
    without a download. The empty-prompt embedding is a seeded random (1, 77, 1024) tensor.

    Args:
        seed: seed of the random weights.
        dtype: compute dtype.
    """

    def __init__(self, seed: int = 0, dtype: DTypeName = "float16") -> None:
        self.seed = seed
        self.dtype = dtype

    @property
    def description(self) -> str:
        return f"RandomStableDiffusion(seed={self.seed})"

    def load(self, device: torch.device | str = "cpu") -> LoadedBackbone:
        device = torch.device(device)
        dtype = _resolve_dtype(self.dtype, device)
        with seeded(self.seed):
            with device:
                unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
                vae = AutoencoderKL(**SD21_VAE_CONFIG)
            cond = torch.randn(1, SD21_TEXT_LENGTH, SD21_TEXT_DIM)
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
        return _finish(unet, vae, scheduler, cond, device, dtype)
