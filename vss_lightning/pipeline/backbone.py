"""Backbones: the settings and loader of a diffusion family, and the real Stable Diffusion 2.1 one.

A backbone holds settings only; `load(device)` does the heavy work and returns the family's loaded
models (here `sd.LoadedBackbone`: UNet, VAE, Euler scheduler, prompt embeddings). This keeps `--help`
and `--print_config` instant when a backbone is part of a LightningCLI config.

`Backbone` is what the segmenter knows of a family: layer naming (`attention_layer`), the settings it
accepts (`check_settings`: a setting the family would ignore is an error), and its sampler and
modulation (`make_sampler`, `make_modulation`), which the family configures from the modulation and
speed settings (e.g. which layers' q/k the unmodulated pass keeps). `SDBackbone` is the Stable Diffusion
family, `svd.SVDBackbone` the Stable Video Diffusion one; tiny and full-size random-weight backbones
for tests and benchmarks are in `random_backbones.py`.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from .attention import decoder_block_layer
from .modulation import Modulation, ModulationSettings
from .naming import PromptEncoder
from .sampler import LoadedModels, Sampler
from .sd import LoadedBackbone, SDModulation, SDSampler, check_spatial_only
from .settings import SpeedSettings

DTypeName = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

SD21_BASE_ID = "stabilityai/stable-diffusion-2-1-base"


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


@contextmanager
def loading_errors(family: str, model_id: str, hub_id: str, offline_config: str) -> Iterator[None]:
    """Turn the hub's and `from_pretrained`'s errors inside into a `BackboneNotFoundError` with the fix.

    Args:
        family: the checkpoint's family, e.g. "Stable Diffusion" (for the message).
        model_id: the hub id or local folder being loaded.
        hub_id: the hub id of the reference checkpoint (for the message).
        offline_config: the config that works without the hub (for the message).
    """
    try:
        yield
    except (OSError, ValueError) as e:  # hub errors are OSError subclasses
        raise BackboneNotFoundError(
            f"Expected `model_id` to name a loadable {family} checkpoint (hub id or local folder, "
            f"safetensors weights), but loading {model_id!r} failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"Fix: on a machine with hub access run `hf download {hub_id} --local-dir DIR` and pass "
            "`--model.segmenter.init_args.backbone.init_args.model_id DIR`; a checkpoint with only "
            ".bin/.ckpt weights must first be converted to safetensors (load it with diffusers on a "
            "trusted machine and `save_pretrained(DIR, safe_serialization=True)`); or try the tool "
            f"offline with `{offline_config}` (tiny random backbone)."
        ) from e


def resolve_dtype(dtype: DTypeName, device: torch.device) -> torch.dtype:
    """The torch dtype of a backbone's `dtype` setting on `device`."""
    if dtype not in _DTYPES:
        raise ValueError(f"Expected `dtype` to be one of {sorted(_DTYPES)}, but got {dtype!r}.")
    if device.type == "cpu" and dtype == "float16":
        # fp16 convolutions are slow or missing on CPU; compute in fp32 there.
        return torch.float32
    return _DTYPES[dtype]


class Backbone(ABC):
    """Settings of a diffusion backbone; `load` builds it on a device; the family's parts."""

    @abstractmethod
    def load(self, device: torch.device | str = "cpu") -> LoadedModels:
        """Build or load the models on `device`."""

    @property
    @abstractmethod
    def description(self) -> str:
        """A short, stable description (used in the settings hash of outputs)."""

    @abstractmethod
    def attention_layer(self, block: int, attention: Literal["self", "cross"]) -> str:
        """The layer name of a decoder block's attention (paper numbering of decoder blocks) whose
        query is a feature (spatial self-attention)."""

    @abstractmethod
    def check_settings(self, modulation: ModulationSettings, speed: SpeedSettings) -> None:
        """Refuse a setting this family would ignore or cannot run, naming it and the fix.

        Raises:
            ValueError: e.g. temporal layer types for an image backbone, or an SD-only speed-up
                for a video backbone.
        """

    @abstractmethod
    def make_sampler(
        self,
        loaded: LoadedModels,
        modulation: ModulationSettings,
        speed: SpeedSettings | None = None,
        **schedule,
    ) -> Sampler:
        """The family's sampler of `loaded`, recording what `modulation` needs.

        Args:
            loaded: the loaded models (`load`).
            modulation: the modulation settings the sampler's passes are for.
            speed: the memory budget (`max_batch_images`, `vae_batch_images`) and speed-ups
                (default: `SpeedSettings()`).
            **schedule: the sampler's schedule (`num_inference_steps`, `start_step`, `guidance_scale`).
        """

    @abstractmethod
    def make_modulation(self, settings: ModulationSettings, sampler: Sampler) -> Modulation:
        """The family's full-resolution step."""

    @property
    def has_text_encoder(self) -> bool:
        """Whether the loaded models carry a tokenizer and text encoder (`prompts`) for
        open-vocabulary naming (`naming.py`)."""
        return False


class SDBackbone(Backbone):
    """Base of the Stable Diffusion backbones: layer names, sampler and modulation of the SD family."""

    def attention_layer(self, block: int, attention: Literal["self", "cross"]) -> str:
        return decoder_block_layer(block, attention)

    def check_settings(self, modulation: ModulationSettings, speed: SpeedSettings) -> None:
        check_spatial_only(modulation)  # SD has no temporal attention

    def make_sampler(
        self,
        loaded: LoadedBackbone,
        modulation: ModulationSettings,
        speed: SpeedSettings | None = None,
        **schedule,
    ) -> SDSampler:
        # Injection reads q/k of every decoder attention; prefix reuse keeps the modulated layer's prefix.
        speed = speed if speed is not None else SpeedSettings()
        inject = modulation.enabled and modulation.inject
        reuse = modulation.enabled and speed.reuse_prefix is not False  # None: on (SD has it)
        return SDSampler(
            loaded,
            max_batch_images=speed.max_batch_images,
            vae_batch_images=speed.vae_batch_images,
            qk_layers=None if inject else [],
            prefix_layer=modulation.layer if reuse else None,
            **schedule,
        )

    def make_modulation(self, settings: ModulationSettings, sampler: SDSampler) -> SDModulation:
        return SDModulation(settings, sampler)


class StableDiffusion(SDBackbone):
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

    @property
    def has_text_encoder(self) -> bool:
        return True

    def load(self, device: torch.device | str = "cpu") -> LoadedBackbone:
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device)
        dtype = resolve_dtype(self.dtype, device)
        source, offline = resolve_source(
            self.model_id,
            self.revision,
            self.local_files_only,
            folders="unet/, vae/, text_encoder/, tokenizer/ and scheduler/",
            save_hint="StableDiffusionPipeline.save_pretrained(DIR)",
            offline_config="configs/smoke.yaml",
        )
        kw = dict(revision=self.revision, local_files_only=offline)
        with loading_errors("Stable Diffusion", self.model_id, SD21_BASE_ID, "configs/smoke.yaml"):
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
        # The text encoder stays on the CPU in float32 (about 1.4 GB of host memory for SD 2.1) for
        # open-vocabulary naming, which encodes its class prompts once per job.
        prompts = PromptEncoder(tokenizer, text_encoder.eval().requires_grad_(False))
        return LoadedBackbone.ready(unet, vae, scheduler, cond, device, dtype, prompts)
