"""The Stable Video Diffusion backbone (docs/method.md section 6): layer names, loader and family.

`StableVideoDiffusion` loads the real SVD img2vid checkpoint (tiny and full-size random-weight ones
for tests and benchmarks are in `random_backbones.py`). Like the SD backbones it holds settings only;
`load(device)` returns a `LoadedVideoBackbone`. `SVDBackbone` implements the `Backbone` family
interface with `svd_sampler.SVDSampler` and `svd_modulation.SVDModulation`, so `VideoSegmenter` runs
it unchanged.

Layer names. The paper numbers the 12 decoder ("output") blocks 0..11 as the original SVD code
(`sgm` `VideoUNet.output_blocks`) does: three per UNet level, from the coarsest level. In diffusers
block n is `up_blocks[n // 3]`'s n % 3-th ResNet + attention; `up_blocks.0` has no attention, so
blocks 3..11 have one. Block n's `TransformerSpatioTemporalModel` is `up_blocks.{n//3}.attentions.{n%3}`:
its spatial attention is `.transformer_blocks.0.attn1` (self) / `.attn2` (cross, to the CLIP image
embedding) and its temporal attention is `.temporal_transformer_blocks.0.attn1` / `.attn2`. Blocks
6, 7, 8 are `up_blocks.2` (1/16 of the frame, 640 channels in SVD), e.g. block 8's spatial
self-attention is `up_blocks.2.attentions.2.transformer_blocks.0.attn1` (`svd_block_layer`).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel

from .attention import decoder_attention_layers, svd_block_layer
from .backbone import Backbone, DTypeName, loading_errors, resolve_dtype, resolve_source
from .modulation import ModulationSettings
from .settings import SpeedSettings
from .svd_modulation import SVDModulation, svd_inject_layers
from .svd_sampler import LoadedVideoBackbone, SVDSampler, SVDSettings

SVD_ID = "stabilityai/stable-video-diffusion-img2vid"


class SVDBackbone(Backbone):
    """Base of the SVD backbones: layer names, sampler and modulation of the video family."""

    settings: SVDSettings

    def attention_layer(self, block: int, attention: Literal["self", "cross"]) -> str:
        """The spatial attention of a decoder block (features and CBR use spatial self-attention)."""
        return svd_block_layer(block, attention, "spatial")

    def check_settings(self, modulation: ModulationSettings, speed: SpeedSettings) -> None:
        """Refuse the SD-only speed settings, which this family would ignore or cannot run."""
        sd_only = {
            "reuse_prefix": "prefix reuse is an SD speed-up; the SVD modulation recomputes every step",
            "channels_last": "SVD's 5-D video weights keep their layout, so it would change nothing",
            "vae_tiling": "SVD's temporal VAE decoder has no tiled decoding",
        }
        for name, why in sd_only.items():
            if getattr(speed, name):
                raise ValueError(
                    f"Expected `speed.{name}` to be false for a Stable Video Diffusion backbone ({why}), "
                    f"but got true. Set `speed: {{{name}: false}}` in the segmenter's config or pass "
                    f"`--model.segmenter.init_args.speed.{name} false`."
                )

    def make_sampler(
        self,
        loaded: LoadedVideoBackbone,
        modulation: ModulationSettings,
        speed: SpeedSettings | None = None,
        **schedule,
    ) -> SVDSampler:
        # The unmodulated pass keeps q/k of exactly the layers the modulation injects.
        speed = speed if speed is not None else SpeedSettings()
        inject = modulation.enabled and modulation.inject
        qk_layers = svd_inject_layers(decoder_attention_layers(loaded.unet), modulation) if inject else []
        return SVDSampler(
            loaded,
            max_batch_images=speed.max_batch_images,
            vae_batch_images=speed.vae_batch_images,
            conditioning=self.settings,
            qk_layers=qk_layers,
            **schedule,
        )

    def make_modulation(self, settings: ModulationSettings, sampler: SVDSampler) -> SVDModulation:
        return SVDModulation(settings, sampler)

    def _describe(self, head: str) -> str:
        s = self.settings
        return (
            f"{head},fps{s.fps_id},motion{s.motion_bucket_id},aug{s.cond_aug},"
            f"gmin{s.min_guidance_scale},nseed{s.noise_seed})"
        )


class StableVideoDiffusion(SVDBackbone):
    """Stable Video Diffusion img2vid (or a compatible checkpoint) from the hub or a local folder.

    Args:
        model_id: hub id (e.g. "stabilityai/stable-video-diffusion-img2vid") or a local folder in
            diffusers layout (unet/, vae/, image_encoder/, feature_extractor/, scheduler/).
        dtype: compute dtype on GPU ("float16" is computed as float32 on CPU).
        variant: weight file variant (e.g. "fp16"), or None for the default files.
        revision: hub revision (branch, tag or commit), or None.
        local_files_only: never touch the network (use the local cache or folder only).
        settings: image conditioning and guidance ramp (default: `SVDSettings()`).
    """

    def __init__(
        self,
        model_id: str = SVD_ID,
        dtype: DTypeName = "float16",
        variant: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        settings: SVDSettings | None = None,
    ) -> None:
        self.model_id = model_id
        self.dtype = dtype
        self.variant = variant
        self.revision = revision
        self.local_files_only = local_files_only
        self.settings = settings if settings is not None else SVDSettings()

    @property
    def description(self) -> str:
        rev = f"{self.model_id}@{self.revision or 'main'},{self.variant or 'default'}"
        return self._describe(f"StableVideoDiffusion({rev}")

    def load(self, device: torch.device | str = "cpu") -> LoadedVideoBackbone:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        device = torch.device(device)
        dtype = resolve_dtype(self.dtype, device)
        source, offline = resolve_source(
            self.model_id,
            self.revision,
            self.local_files_only,
            folders="unet/, vae/, image_encoder/, feature_extractor/ and scheduler/",
            save_hint="StableVideoDiffusionPipeline.save_pretrained(DIR)",
            offline_config="configs/smoke_svd.yaml",
        )
        kw = dict(revision=self.revision, local_files_only=offline)
        weights = dict(variant=self.variant, use_safetensors=True, **kw)
        with loading_errors("Stable Video Diffusion", self.model_id, SVD_ID, "configs/smoke_svd.yaml"):
            unet = UNetSpatioTemporalConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=dtype, **weights
            )
            vae = AutoencoderKLTemporalDecoder.from_pretrained(
                source, subfolder="vae", torch_dtype=dtype, **weights
            )
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                source, subfolder="image_encoder", **weights
            )
            processor = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor", **kw)
            sched_cfg = EulerDiscreteScheduler.load_config(source, subfolder="scheduler", **kw)
        scheduler = EulerDiscreteScheduler.from_config(sched_cfg)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        return LoadedVideoBackbone.ready(unet, vae, image_encoder, scheduler, mean, std, device, dtype)
