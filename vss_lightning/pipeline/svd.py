"""Stable Video Diffusion backbones and their sampler (docs/method.md section 6).

Backbones: the real SVD img2vid checkpoint (`StableVideoDiffusion`), a tiny random one for tests
(`TinyStableVideoDiffusion`) and a full-size random one for benchmarks (`RandomStableVideoDiffusion`).
Like the SD backbones they hold settings only; `load(device)` returns a `LoadedVideoBackbone`. They
override the `Backbone` extension points, so `VideoSegmenter` runs them unchanged.

Layer names. The paper numbers the 12 decoder ("output") blocks 0..11 as the original SVD code
(`sgm` `VideoUNet.output_blocks`) does: three per UNet level, from the coarsest level. In diffusers
block n is `up_blocks[n // 3]`'s n % 3-th ResNet + attention; `up_blocks.0` has no attention, so
blocks 3..11 have one. Block n's `TransformerSpatioTemporalModel` is `up_blocks.{n//3}.attentions.{n%3}`:
its spatial attention is `.transformer_blocks.0.attn1` (self) / `.attn2` (cross, to the CLIP image
embedding) and its temporal attention is `.temporal_transformer_blocks.0.attn1` / `.attn2`. Blocks
6, 7, 8 are `up_blocks.2` (1/16 of the frame, 640 channels in SVD), e.g. block 8's spatial
self-attention is `up_blocks.2.attentions.2.transformer_blocks.0.attn1`.

Sampler. EDM Euler in sigma space with v-prediction (diffusers' `EulerDiscreteScheduler` as SVD
configures it: Karras sigmas from 700 to 0.002, rho 7, continuous timesteps 0.25 log sigma). The
UNet sees x / sqrt(sigma^2 + 1) concatenated (channels) with the VAE latent of the batch's first
frame; the denoised estimate is x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1); an Euler step is
x <- x + (sigma_{i+1} - sigma_i) (x - denoised) / sigma_i. Classifier-free guidance ramps linearly
over the frames, from `min_guidance_scale` (frame 0) to the segmenter's `guidance_scale`.

Conditioning (`encode` computes it from the batch's first resized frame and keeps it for the next
`unmodulated_pass`, which stores it in its record): the CLIP image embedding of the clean frame (the
unconditional branch gets zeros), the unscaled VAE posterior mode of the frame plus `cond_aug` *
Gaussian noise (zeros for the unconditional branch), and `added_time_ids` = [fps_id, motion_bucket_id,
cond_aug]. `fps_id` is the raw id (diffusers' pipeline passes its `fps` argument minus one; the
reference passes 14).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel

from .attention import AttentionControl, decoder_attention_layers, installed_processors
from .backbone import (
    Backbone,
    BackboneNotFoundError,
    DTypeName,
    LoadedModels,
    _resolve_dtype,
    resolve_source,
    seeded,
)
from .modulation import decoder_block_layer
from .sampler import PassRecord, check_window, decode_in_chunks, encode_latents

SVD_ID = "stabilityai/stable-video-diffusion-img2vid"

# The SVD img2vid architecture (unet/, vae/, image_encoder/ configs and scheduler of the hub checkpoint).
SVD_UNET_CONFIG = dict(
    sample_size=96,
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=768,
    layers_per_block=2,
    cross_attention_dim=1024,
    transformer_layers_per_block=1,
    num_attention_heads=(5, 10, 20, 20),
    num_frames=14,
)
SVD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=768,
    scaling_factor=0.18215,
    force_upcast=True,
)
SVD_IMAGE_ENCODER_CONFIG = dict(  # OpenCLIP ViT-H/14 vision tower with its 1024-d projection
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=16,
    num_hidden_layers=32,
    patch_size=14,
    image_size=224,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
SVD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    use_karras_sigmas=True,
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

LayerType = Literal["spatial", "temporal"]


def svd_block_layer(block: int, attention: str, layer_type: LayerType = "spatial") -> str:
    """The diffusers layer name of an SVD decoder block's attention (paper block numbering, 3..11).

    Args:
        block: decoder ("output") block, 3..11.
        attention: "self" (attn1) or "cross" (attn2).
        layer_type: "spatial" (attention over the pixels of a frame) or "temporal" (over the frames
            at a pixel).
    """
    stack = {"spatial": "transformer_blocks", "temporal": "temporal_transformer_blocks"}.get(layer_type)
    if stack is None:
        raise ValueError(f"Expected a layer type 'spatial' or 'temporal', but got {layer_type!r}.")
    return decoder_block_layer(block, attention, stack=stack)


@dataclass
class SVDSettings:
    """Image conditioning and guidance ramp of SVD (the reference's values are the defaults).

    Attributes:
        fps_id: raw frame-rate id of `added_time_ids` (diffusers' pipeline `fps` argument minus 1).
        motion_bucket_id: motion bucket id of `added_time_ids`.
        cond_aug: std of the Gaussian noise added to the conditioning frame before VAE encoding
            (also the third `added_time_ids` entry).
        min_guidance_scale: guidance of the batch's first frame; it ramps linearly to the
            segmenter's `guidance_scale` at the last frame.
        noise_seed: seed of the `cond_aug` noise (the same noise every batch, as the reference).
    """

    fps_id: int = 14
    motion_bucket_id: int = 127
    cond_aug: float = 0.02
    min_guidance_scale: float = 1.0
    noise_seed: int = 0


@dataclass
class LoadedVideoBackbone(LoadedModels):
    """An SVD backbone ready to run.

    Attributes:
        unet: the spatio-temporal denoiser (eval mode, no grad).
        vae: the autoencoder with the temporal decoder.
        image_encoder: the CLIP vision model with projection (image embedding of the first frame).
        scheduler: the SVD `EulerDiscreteScheduler` (v-prediction, Karras sigmas, continuous timesteps).
        image_mean: (3,) CLIP input normalisation mean.
        image_std: (3,) CLIP input normalisation std.
    """

    unet: UNetSpatioTemporalConditionModel
    vae: AutoencoderKLTemporalDecoder
    image_encoder: torch.nn.Module
    scheduler: EulerDiscreteScheduler
    image_mean: torch.Tensor
    image_std: torch.Tensor

    @property
    def image_size(self) -> int:
        """Side of the square CLIP input."""
        return int(self.image_encoder.config.image_size)


def _finish(unet, vae, image_encoder, scheduler, mean, std, device, dtype) -> LoadedVideoBackbone:
    mods = []
    for m in (unet, vae, image_encoder):
        if next(m.parameters()).dtype != dtype:
            # (not `.to(dtype)`, which makes diffusers log a spurious float32 warning)
            {torch.float16: m.half, torch.bfloat16: m.bfloat16, torch.float32: m.float}[dtype]()
        mods.append(m.to(device=device).eval().requires_grad_(False))
    mean = torch.tensor(mean, dtype=torch.float32, device=device)
    std = torch.tensor(std, dtype=torch.float32, device=device)
    return LoadedVideoBackbone(*mods, scheduler, mean, std)


class VideoBackbone(Backbone):
    """Base of the SVD backbones: layer names, sampler and modulation of the video family."""

    settings: SVDSettings

    def attention_layer(self, block: int, attention: str) -> str:
        """The spatial attention of a decoder block (features and CBR use spatial self-attention)."""
        return svd_block_layer(block, attention, "spatial")

    def make_sampler(self, loaded: LoadedVideoBackbone, **settings) -> SVDSampler:
        return SVDSampler(loaded, conditioning=self.settings, **settings)

    def make_modulation(self, settings, sampler):
        from .svd_modulation import SVDModulation

        return SVDModulation(settings, sampler)

    def _describe(self, head: str) -> str:
        s = self.settings
        return (
            f"{head},fps{s.fps_id},motion{s.motion_bucket_id},aug{s.cond_aug},"
            f"gmin{s.min_guidance_scale},nseed{s.noise_seed})"
        )


class StableVideoDiffusion(VideoBackbone):
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
        dtype = _resolve_dtype(self.dtype, device)
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
        try:
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
        except (OSError, ValueError) as e:  # hub errors are OSError subclasses
            raise BackboneNotFoundError(
                f"Expected `model_id` to name a loadable Stable Video Diffusion checkpoint (hub id or local "
                f"folder, safetensors weights), but loading {self.model_id!r} failed: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
                f"Fix: on a machine with hub access run `hf download {SVD_ID} --local-dir DIR` and pass "
                "`--model.segmenter.init_args.backbone.init_args.model_id DIR`; a checkpoint with only "
                ".bin/.ckpt weights must first be converted to safetensors (load it with diffusers on a "
                "trusted machine and `save_pretrained(DIR, safe_serialization=True)`); or try the video "
                "backbone offline with `configs/smoke_svd.yaml` (tiny random backbone)."
            ) from e
        scheduler = EulerDiscreteScheduler.from_config(sched_cfg)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        return _finish(unet, vae, image_encoder, scheduler, mean, std, device, dtype)


class TinyStableVideoDiffusion(VideoBackbone):
    """A tiny random-weight SVD of the same diffusers classes and layer names as the real one.

    Four UNet levels with two layers per block (so decoder blocks 6-8, `up_blocks.2.attentions.{0,1,2}`,
    exist and the feature grid is 1/16 of the frame; attention only at the 1/16 and 1/32 levels, which
    keeps it cheap on a CPU), an 8x temporal-decoder VAE and a tiny CLIP
    vision encoder at 224 pixels (patch 14). 32 channels everywhere (diffusers' SVD blocks use 32
    norm groups). Built from `seed` in code: no download, no files.

    Args:
        seed: seed of the random weights.
        dtype: compute dtype ("float16" is computed as float32 on CPU).
        settings: image conditioning and guidance ramp (default: `SVDSettings()`).
    """

    def __init__(
        self, seed: int = 0, dtype: DTypeName = "float32", settings: SVDSettings | None = None
    ) -> None:
        self.seed = seed
        self.dtype = dtype
        self.settings = settings if settings is not None else SVDSettings()

    @property
    def description(self) -> str:
        return self._describe(f"TinyStableVideoDiffusion(seed={self.seed}")

    def load(self, device: torch.device | str = "cpu") -> LoadedVideoBackbone:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        device = torch.device(device)
        dtype = _resolve_dtype(self.dtype, device)
        with seeded(self.seed):
            unet = UNetSpatioTemporalConditionModel(
                sample_size=32,
                block_out_channels=(32, 32, 32, 32),
                layers_per_block=2,
                cross_attention_dim=32,
                num_attention_heads=(2, 2, 2, 2),
                down_block_types=(
                    "DownBlockSpatioTemporal",
                    "CrossAttnDownBlockSpatioTemporal",
                    "CrossAttnDownBlockSpatioTemporal",
                    "DownBlockSpatioTemporal",
                ),
                up_block_types=(
                    "UpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal",
                    "UpBlockSpatioTemporal",
                ),
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=24,
                num_frames=14,
            )
            vae = AutoencoderKLTemporalDecoder(
                block_out_channels=(32, 32, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 4,
                layers_per_block=1,
                latent_channels=4,
            )
            image_encoder = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=37,
                    num_attention_heads=4,
                    num_hidden_layers=2,
                    image_size=224,
                    patch_size=14,
                    projection_dim=32,
                )
            )
        scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
        return _finish(unet, vae, image_encoder, scheduler, CLIP_MEAN, CLIP_STD, device, dtype)


class RandomStableVideoDiffusion(VideoBackbone):
    """The full-size SVD img2vid UNet, VAE and CLIP ViT-H/14 image encoder with random weights.

    Costs the same time and memory as the real checkpoint: this is how speed and memory are measured
    without a download.

    Args:
        seed: seed of the random weights.
        dtype: compute dtype.
        settings: image conditioning and guidance ramp (default: `SVDSettings()`).
    """

    def __init__(
        self, seed: int = 0, dtype: DTypeName = "float16", settings: SVDSettings | None = None
    ) -> None:
        self.seed = seed
        self.dtype = dtype
        self.settings = settings if settings is not None else SVDSettings()

    @property
    def description(self) -> str:
        return self._describe(f"RandomStableVideoDiffusion(seed={self.seed}")

    def load(self, device: torch.device | str = "cpu") -> LoadedVideoBackbone:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        device = torch.device(device)
        dtype = _resolve_dtype(self.dtype, device)
        with seeded(self.seed), device:
            unet = UNetSpatioTemporalConditionModel(**SVD_UNET_CONFIG)
            vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER_CONFIG))
        scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
        return _finish(unet, vae, image_encoder, scheduler, CLIP_MEAN, CLIP_STD, device, dtype)


@dataclass
class VideoConditioning:
    """The first-frame conditioning of one batch, on the compute device.

    Attributes:
        image_embedding: (1, 1, D) CLIP image embedding of the clean first frame.
        image_latent: (1, 4, h, w) unscaled VAE posterior mode of the noise-augmented first frame.
        added_time_ids: (1, 3) [fps_id, motion_bucket_id, cond_aug].
    """

    image_embedding: torch.Tensor
    image_latent: torch.Tensor
    added_time_ids: torch.Tensor


@dataclass
class SVDPassRecord(PassRecord):
    """`PassRecord` of the SVD sampler (see `sampler.PassRecord`), plus the batch's conditioning.

    Here `qk[step][layer]` is (2, N, heads, L, head_dim): branch, then the layer's rows per branch
    (N = frames, L = pixels for a spatial layer; N = pixels, L = frames for a temporal one).
    """

    conditioning: VideoConditioning | None = None


@contextmanager
def _encoding_dtype(vae: AutoencoderKLTemporalDecoder, dtype: torch.dtype) -> Iterator[torch.dtype]:
    """The VAE in float32 while encoding when its config asks (`force_upcast`), as diffusers does."""
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.float()  # (not `.to(dtype)`, which makes diffusers log a warning at every call)
    try:
        yield torch.float32 if upcast else dtype
    finally:
        if upcast:
            vae.half()


class SVDSampler:
    """CFG EDM-Euler sampling of one video batch over a window of steps, with attention control.

    Same public interface as `DiffusionSampler`. The UNet mixes the frames of a batch through its
    temporal attention, so a forward always holds whole batches (both CFG branches: 2B images, even
    when `max_batch_images` is smaller); a larger `max_batch_images` runs several modulated units of
    a batch in one forward.

    Args:
        backbone: the loaded backbone.
        num_inference_steps: length of the schedule (25).
        start_step: index of the first step run (noising level; 17).
        guidance_scale: guidance of the batch's last frame (2.5); it ramps from
            `conditioning.min_guidance_scale` at the first frame.
        max_batch_images: most images per UNet forward (each CFG branch counts).
        vae_batch_images: most images per VAE encode/decode.
        conditioning: image conditioning settings (default: `SVDSettings()`).
    """

    def __init__(
        self,
        backbone: LoadedVideoBackbone,
        num_inference_steps: int = 25,
        start_step: int = 17,
        guidance_scale: float = 2.5,
        max_batch_images: int = 56,
        vae_batch_images: int = 8,
        conditioning: SVDSettings | None = None,
    ) -> None:
        check_window(start_step, num_inference_steps, max_batch_images)
        self.bb = backbone
        self.settings = conditioning if conditioning is not None else SVDSettings()
        self.guidance_scale = guidance_scale
        self.max_batch_images = max_batch_images
        self.vae_batch_images = max(1, vae_batch_images)
        self.start_step = start_step
        self.num_steps = num_inference_steps
        sched = backbone.scheduler
        sched.set_timesteps(num_inference_steps, device="cpu")
        self.timesteps = sched.timesteps.clone()  # 0.25 log(sigma)
        self.sigmas = sched.sigmas.clone().double()  # (steps + 1,), last = 0
        self.layers = decoder_attention_layers(backbone.unet)
        # Layers whose q/k the unmodulated pass keeps for injection (the modulation may narrow them).
        self.inject_layers = [n for n in self.layers if n.endswith("attn1")]
        self.conditioning: VideoConditioning | None = None

    @property
    def steps(self) -> range:
        return range(self.start_step, self.num_steps)

    # -- VAE and conditioning ---------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of a batch's frames; also computes the batch's conditioning from its first frame.

        Args:
            images: (B, 3, H, W) resized frames in [-1, 1].
            generator: None for the posterior mean; else the posterior is sampled with it (see
                `sampler.encode_latents`). The conditioning latent is the posterior mode either way.

        Returns:
            (B, 4, H/8, W/8) scaled latents (float32 when the VAE encodes upcast or a sample is
            drawn). The first frame's conditioning is kept in `self.conditioning` for the next
            `unmodulated_pass`.
        """
        with _encoding_dtype(self.bb.vae, self.bb.vae_dtype) as enc_dtype:
            out = encode_latents(self.bb.vae, images, self.vae_batch_images, enc_dtype, generator)
        self.conditioning = self.condition(images[0])
        return out

    @torch.no_grad()
    def condition(self, image: torch.Tensor) -> VideoConditioning:
        """The SVD conditioning of one (3, H, W) frame in [-1, 1]."""
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        bb, s = self.bb, self.settings
        x = image.to(bb.device, torch.float32)[None]  # (1, 3, H, W)
        # CLIP input as the SVD pipeline builds it: antialiased bicubic resize in [-1, 1], then [0, 1].
        clip_in = (_resize_with_antialiasing(x, (bb.image_size, bb.image_size)) + 1.0) / 2.0
        clip_in = (clip_in - bb.image_mean.view(1, 3, 1, 1)) / bb.image_std.view(1, 3, 1, 1)
        embedding = bb.image_encoder(clip_in.to(bb.dtype)).image_embeds[:, None]  # (1, 1, D)
        gen = torch.Generator().manual_seed(s.noise_seed)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(bb.device)
        with _encoding_dtype(self.bb.vae, self.bb.vae_dtype) as enc_dtype:
            latent = self.bb.vae.encode((x + s.cond_aug * noise).to(enc_dtype)).latent_dist.mode()
        ids = torch.tensor([[s.fps_id, s.motion_bucket_id, s.cond_aug]], device=bb.device, dtype=bb.dtype)
        return VideoConditioning(embedding, latent.to(bb.dtype), ids)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, 8h, 8w) float32 images; each frame decoded on its own.

        The reference decodes one frame at a time (the temporal decoder then mixes nothing), so the
        result does not depend on how frames are chunked.
        """
        vae = self.bb.vae
        return decode_in_chunks(
            latents,
            self.vae_batch_images,
            vae.decoder,
            lambda z: vae.decode(
                z.to(self.bb.device, self.bb.vae_dtype) / vae.config.scaling_factor, num_frames=1
            ).sample.float(),
        )

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising to the start step: z = z0 + sigma[start] * eps."""
        return z0 + float(self.sigmas[self.start_step]) * noise.to(z0)

    # -- UNet -------------------------------------------------------------------------------------
    def guidance(self, num_frames: int) -> torch.Tensor:
        """(num_frames,) guidance per frame, linear from `min_guidance_scale` to `guidance_scale`."""
        return torch.linspace(self.settings.min_guidance_scale, self.guidance_scale, num_frames)

    @torch.no_grad()
    def cfg_step(self, x: torch.Tensor, step: int, cond: VideoConditioning) -> torch.Tensor:
        """One CFG Euler step of U videos whose two branches are computed in one UNet forward.

        Attention control must be set up by the caller for the UNet's layout: batch rows
        [unconditional x U, conditional x U], each of F frames (a spatial layer sees (2U F, pixels, C),
        a temporal layer (2U pixels, F, C)).

        Args:
            x: (U, F, 4, h, w) latents at `step`.
            step: the step index.
            cond: the batch's conditioning.

        Returns:
            (U, F, 4, h, w) latents after the step.
        """
        u, f = x.shape[:2]
        dtype, dev = self.bb.dtype, self.bb.device
        sigma = float(self.sigmas[step])
        scaled = (x / (sigma**2 + 1) ** 0.5).to(dtype)
        image_latent = cond.image_latent.to(dtype)[:, None].expand(u, f, -1, -1, -1)  # (U, F, 4, h, w)
        model_in = torch.cat(
            [torch.cat([scaled, torch.zeros_like(image_latent)], 2), torch.cat([scaled, image_latent], 2)]
        )  # (2U, F, 8, h, w)
        emb = cond.image_embedding.to(dtype).expand(u, -1, -1)
        emb = torch.cat([torch.zeros_like(emb), emb])  # (2U, 1, D)
        ids = cond.added_time_ids.expand(2 * u, -1)
        t = self.timesteps[step].to(dev)
        v = self.bb.unet(model_in, t, encoder_hidden_states=emb, added_time_ids=ids).sample
        work = torch.promote_types(x.dtype, torch.float32)  # the update in float32 (or float64)
        v_u, v_c = v.to(work).chunk(2)
        g = self.guidance(f).to(dev, work).view(1, f, 1, 1, 1)
        v = v_u + g * (v_c - v_u)
        xf = x.to(work)
        denoised = v * (-sigma / (sigma**2 + 1) ** 0.5) + xf / (sigma**2 + 1)
        return (xf + (float(self.sigmas[step + 1]) - sigma) * (xf - denoised) / sigma).to(x.dtype)

    @torch.no_grad()
    def unmodulated_pass(
        self,
        z_start: torch.Tensor,
        control: AttentionControl,
        feature_layers: list[str],
        feature_step: int,
        keep_qk: bool = True,
    ) -> SVDPassRecord:
        """Run steps start..end-1 on a batch (one video), recording q/k, latents and features.

        Args:
            z_start: (B, 4, h, w) noised latents of the batch's frames.
            control: the attention control state (processors must not be installed yet).
            feature_layers: layer names whose conditional-branch query is the feature.
            feature_step: the step whose queries are the features.
            keep_qk: record q/k of `inject_layers` (needed for injection).

        Returns:
            The record (with the batch's conditioning); tensors stay on the compute device.
        """
        if feature_step not in self.steps:
            raise ValueError(f"Expected `feature_step` to be in {list(self.steps)}, but got {feature_step}.")
        cond = self.conditioning
        if cond is None or cond.image_latent.shape[-2:] != z_start.shape[-2:]:
            raise RuntimeError(
                "Expected `encode` to be called on this batch's frames before `unmodulated_pass` (it "
                "computes the first-frame conditioning), but no matching conditioning was found."
            )
        b = z_start.shape[0]
        record = SVDPassRecord(qk={}, latents={}, start_latent=z_start, features={}, conditioning=cond)
        record_layers = set(self.inject_layers) if keep_qk else set()
        x = z_start[None]  # (1, B, 4, h, w)
        with installed_processors(self.bb.unet, sorted(record_layers | set(feature_layers)), control):
            for step in self.steps:
                control.reset()
                control.record = record_layers
                control.capture = set(feature_layers) if step == feature_step else set()
                x = self.cfg_step(x, step, cond)
                record.latents[step] = x[0]
                if keep_qk:
                    record.qk[step] = {
                        k: (q.unflatten(0, (2, -1)), kk.unflatten(0, (2, -1)))
                        for k, (q, kk) in control.recorded.items()
                    }
                if step == feature_step:
                    record.features = {k: control.captured[k][b:] for k in feature_layers}  # conditional
            control.reset()
        return record
