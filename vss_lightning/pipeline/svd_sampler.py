"""The Stable Video Diffusion family's sampler and conditioning (docs/method.md section 6).

Sampler. EDM Euler in sigma space with v-prediction (diffusers' `EulerDiscreteScheduler` as SVD
configures it: Karras sigmas from 700 to 0.002, rho 7, continuous timesteps 0.25 log sigma). The
UNet sees x / sqrt(sigma^2 + 1) concatenated (channels) with the VAE latent of the batch's first
frame; the denoised estimate is x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1); an Euler step is
x <- x + (sigma_{i+1} - sigma_i) (x - denoised) / sigma_i. Classifier-free guidance ramps linearly
over the frames, from `min_guidance_scale` (frame 0) to the segmenter's `sampling.guidance_scale`.

Conditioning (`condition`, computed from the batch's first resized frame and handed to the passes):
the CLIP image embedding of the clean frame (the unconditional branch gets zeros), the unscaled VAE
posterior mode of the frame plus `cond_aug` * Gaussian noise (zeros for the unconditional branch),
and `added_time_ids` = [fps_id, motion_bucket_id, cond_aug]. `fps_id` is the raw id (diffusers'
pipeline passes its `fps` argument minus one; the reference passes 14).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel

from .attention import AttentionControl, decoder_attention_layers
from .sampler import LoadedModels, PassRecord, Sampler, prepared


@dataclass
class SVDSettings:
    """Image conditioning and guidance ramp of SVD (the reference's values are the defaults).

    Attributes:
        fps_id: raw frame-rate id of `added_time_ids` (diffusers' pipeline `fps` argument minus 1).
        motion_bucket_id: motion bucket id of `added_time_ids`.
        cond_aug: std of the Gaussian noise added to the conditioning frame before VAE encoding
            (also the third `added_time_ids` entry).
        min_guidance_scale: guidance of the batch's first frame; it ramps linearly to the
            segmenter's `sampling.guidance_scale` at the last frame.
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

    @classmethod
    def ready(cls, unet, vae, image_encoder, scheduler, mean, std, device, dtype) -> LoadedVideoBackbone:
        """Models in `dtype` on `device` in eval mode, with the CLIP input normalisation."""
        mods = [prepared(m, device, dtype) for m in (unet, vae, image_encoder)]
        mean = torch.tensor(mean, dtype=torch.float32, device=device)
        std = torch.tensor(std, dtype=torch.float32, device=device)
        return cls(*mods, scheduler, mean, std)


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


class SVDSampler(Sampler):
    """CFG EDM-Euler sampling of one video batch over a window of steps, with attention control.

    The UNet mixes the frames of a batch through its
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
        qk_layers: layers whose q/k the unmodulated pass keeps for injection (default: every decoder
            self-attention; the family passes those its modulation injects).
    """

    vae_decode_frames = 1  # the temporal decoder decodes each frame on its own, as the reference

    def __init__(
        self,
        backbone: LoadedVideoBackbone,
        num_inference_steps: int = 25,
        start_step: int = 17,
        guidance_scale: float = 2.5,
        max_batch_images: int = 56,
        vae_batch_images: int = 8,
        conditioning: SVDSettings | None = None,
        qk_layers: list[str] | None = None,
    ) -> None:
        layers = decoder_attention_layers(backbone.unet)
        if qk_layers is None:  # self-attentions (a cross-attention to one token ignores its q/k)
            qk_layers = [n for n in layers if n.endswith("attn1")]
        super().__init__(
            backbone,
            num_inference_steps,
            start_step,
            guidance_scale,
            max_batch_images,
            vae_batch_images,
            qk_layers,
        )
        self.settings = conditioning if conditioning is not None else SVDSettings()

    # -- VAE and conditioning -----------------------------------------------------------------------
    @contextmanager
    def encoding_dtype(self) -> Iterator[torch.dtype]:
        """The VAE in float32 while encoding when its config asks (`force_upcast`), as diffusers does."""
        vae, dtype = self.bb.vae, self.bb.vae_dtype
        upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:
            vae.float()  # (not `.to(dtype)`, which makes diffusers log a warning at every call)
        try:
            yield torch.float32 if upcast else dtype
        finally:
            if upcast:
                vae.half()

    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> VideoConditioning:
        """The SVD conditioning of a batch: from its first (3, H, W) frame in [-1, 1].

        Args:
            images: (B, 3, H, W) resized frames in [-1, 1].
        """
        from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
            _resize_with_antialiasing,
        )

        bb, s = self.bb, self.settings
        x = images[0].to(bb.device, torch.float32)[None]  # (1, 3, H, W)
        # CLIP input as the SVD pipeline builds it: antialiased bicubic resize in [-1, 1], then [0, 1].
        clip_in = (_resize_with_antialiasing(x, (bb.image_size, bb.image_size)) + 1.0) / 2.0
        clip_in = (clip_in - bb.image_mean.view(1, 3, 1, 1)) / bb.image_std.view(1, 3, 1, 1)
        embedding = bb.image_encoder(clip_in.to(bb.dtype)).image_embeds[:, None]  # (1, 1, D)
        gen = torch.Generator().manual_seed(s.noise_seed)
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(bb.device)
        with self.encoding_dtype() as enc_dtype:
            latent = bb.vae.encode((x + s.cond_aug * noise).to(enc_dtype)).latent_dist.mode()
        ids = torch.tensor([[s.fps_id, s.motion_bucket_id, s.cond_aug]], device=bb.device, dtype=bb.dtype)
        return VideoConditioning(embedding, latent.to(bb.dtype), ids)

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

    def _frames_per_forward(self, num_frames: int) -> int:
        return num_frames  # the temporal attention mixes the frames: one forward holds the batch

    def _pass_step(self, x: torch.Tensor, step: int, cond: VideoConditioning) -> torch.Tensor:
        return self.cfg_step(x[None], step, cond)[0]  # the batch is one video

    def unmodulated_pass(
        self,
        z_start: torch.Tensor,
        cond: VideoConditioning,
        control: AttentionControl,
        feature_layers: list[str],
        feature_step: int,
        captures: dict[int, list[str]] | None = None,
    ) -> PassRecord:
        """`Sampler.unmodulated_pass` of one video batch; `cond` must be the batch's conditioning."""
        if cond.image_latent.shape[-2:] != z_start.shape[-2:]:
            raise ValueError(
                f"Expected `cond` to be the conditioning of the batch's frames (latent size "
                f"{tuple(z_start.shape[-2:])}), but its latent is {tuple(cond.image_latent.shape[-2:])}. "
                "Compute it with `condition(frames)`."
            )
        return super().unmodulated_pass(z_start, cond, control, feature_layers, feature_step, captures)
