"""Preprocessing, VAE encode/decode, forward noising and the classifier-free-guided Euler steps.

The schedule is diffusers' `EulerDiscreteScheduler` with trailing spacing (25 steps: t = 999 - 40 i).
Latents live in the scheduler's sigma space: x = z0 + sigma * eps; the UNet sees x / sqrt(sigma^2 + 1);
an Euler step is x <- x + (sigma_{i+1} - sigma_i) * eps_cfg, with sigma_25 = 0.

`unmodulated_pass` runs steps start..end-1 once for a batch of frames and keeps, in memory, the
query/key of every decoder attention at every step and the latent after every step, plus the features.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .attention import AttentionControl, decoder_attention_layers, installed_processors
from .backbone import LoadedBackbone
from .prefix import PrefixCache

ResizeMode = Literal["bicubic", "bilinear"]
VaeEncode = Literal["mean", "sample"]


def resize_to_multiple(
    frames: torch.Tensor, multiple: int = 64, mode: ResizeMode = "bicubic"
) -> torch.Tensor:
    """Resize frames so height and width are floored to multiples of `multiple`.

    Args:
        frames: (B, 3, H, W) uint8 RGB.
        multiple: the size granularity (64 for SD: latent /8, feature grid /16 stays integral).
        mode: "bicubic" resizes the uint8 values with antialiased bicubic interpolation (Keys
            a = -0.5), width then height, rounding to uint8 after each pass, as PIL's default
            `Image.resize` does (the reference's resize; equal within 1 grey level), then scales to
            [-1, 1]; "bilinear" scales to [-1, 1] first and resizes the floats with antialiased
            bilinear interpolation in one pass (no rounding).

    Returns:
        (B, 3, H', W') float in [-1, 1].
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"Expected `resize` to be 'bicubic' or 'bilinear', but got {mode!r}.")
    _, _, h, w = frames.shape
    th, tw = (h // multiple) * multiple, (w // multiple) * multiple
    if th == 0 or tw == 0:
        raise ValueError(
            f"Expected frames of at least {multiple}x{multiple} pixels, but got {h}x{w}. Upscale the video."
        )
    if (th, tw) == (h, w):
        return frames.float() / 127.5 - 1.0
    if mode == "bicubic":
        # PIL resizes 8-bit images in two passes, width then height, rounding and clipping to uint8
        # after each; doing the same (rather than one 2-D pass) keeps bicubic overshoot at strong
        # edges from reaching the second pass: within 1 grey level of PIL instead of up to 14.
        x = frames.float()
        for size in ((h, tw), (th, tw)):
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
                x = x.round().clamp(0.0, 255.0)
        return x / 127.5 - 1.0
    x = frames.float() / 127.5 - 1.0
    x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0)


def encode_latents(
    vae: torch.nn.Module,
    images: torch.Tensor,
    chunk_size: int,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """VAE-encode images `chunk_size` at a time to scaled latents (shared by the SD and SVD samplers).

    Args:
        vae: the autoencoder (its parameters' device is used).
        images: (B, 3, H, W) in [-1, 1].
        chunk_size: most images per encoder call.
        dtype: the dtype the images are fed in.
        generator: None for the posterior mean; else the posterior is sampled, mean + std * eps, with
            eps drawn in float32 on the CPU from this generator for the whole batch at once (so the
            sample depends on neither the device nor the chunking).

    Returns:
        (B, 4, H/8, W/8) scaled latents (the VAE's dtype for the mean, float32 for a sample).
    """
    device = next(vae.parameters()).device
    means, stds = [], []
    for chunk in images.split(chunk_size):
        dist = vae.encode(chunk.to(device, dtype)).latent_dist
        means.append(dist.mean)
        if generator is not None:
            stds.append(dist.std)
    mean = torch.cat(means)
    if generator is None:
        return mean * vae.config.scaling_factor
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return (mean.float() + torch.cat(stds).float() * eps) * vae.config.scaling_factor


def check_window(start_step: int, num_inference_steps: int, max_batch_images: int) -> None:
    """Validate a sampler's step window and memory budget (shared by the SD and SVD samplers)."""
    if not 0 <= start_step < num_inference_steps:
        raise ValueError(f"Expected `start_step` to be in [0, {num_inference_steps}), but got {start_step}.")
    if max_batch_images < 2:
        raise ValueError(f"Expected `max_batch_images` to be at least 2, but got {max_batch_images}.")


def decode_in_chunks(
    latents: torch.Tensor,
    chunk_size: int,
    decoder: torch.nn.Module,
    decode: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Decode latents `chunk_size` at a time; with a compiled `decoder` the last chunk is padded to one
    input shape (instead of recompiling) and the padding is dropped from the output.

    Args:
        latents: (N, ...) latents.
        chunk_size: most latents per call of `decode`.
        decoder: the VAE's decoder module (checked for `torch.compile`).
        decode: maps a chunk of latents to float32 images.

    Returns:
        (N, 3, H, W) images.
    """
    compiled = isinstance(decoder, torch._dynamo.OptimizedModule)
    out = []
    for chunk in latents.split(chunk_size):
        n = chunk.shape[0]
        if compiled and n < chunk_size:
            chunk = torch.cat([chunk, chunk[-1:].expand(chunk_size - n, *chunk.shape[1:])])
        out.append(decode(chunk)[:n])
    return torch.cat(out)


@dataclass
class PassRecord:
    """What the unmodulated pass keeps for the modulated runs, all on the compute device.

    Attributes:
        qk: step index -> layer name -> (query, key), each (2, B, heads, tokens, head_dim), branch 0
            unconditional, branch 1 conditional.
        latents: step index -> (B, 4, h, w) latent after that step.
        start_latent: (B, 4, h, w) the noised latent the runs start from.
        features: layer name -> (B, tokens, channels) conditional-branch query at the feature step.
        prefix: the UNet prefix outputs of the first step, when asked for (see `prefix.py`).
    """

    qk: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    latents: dict[int, torch.Tensor]
    start_latent: torch.Tensor
    features: dict[str, torch.Tensor]
    prefix: PrefixCache | None = None


class DiffusionSampler:
    """CFG Euler sampling over a window of steps, with attention control.

    Args:
        backbone: the loaded backbone.
        num_inference_steps: length of the schedule (25).
        start_step: index of the first step run (noising level; 22 -> t = 119).
        guidance_scale: classifier-free guidance scale (5).
        max_batch_images: most images per UNet/VAE forward (each CFG branch counts); bounds memory.
    """

    def __init__(
        self,
        backbone: LoadedBackbone,
        num_inference_steps: int = 25,
        start_step: int = 22,
        guidance_scale: float = 5.0,
        max_batch_images: int = 56,
        vae_batch_images: int = 8,
    ) -> None:
        check_window(start_step, num_inference_steps, max_batch_images)
        self.bb = backbone
        self.guidance_scale = guidance_scale
        self.max_batch_images = max_batch_images
        self.vae_batch_images = max(1, vae_batch_images)
        self.start_step = start_step
        self.num_steps = num_inference_steps
        sched = backbone.scheduler
        sched.set_timesteps(num_inference_steps, device="cpu")
        self.timesteps = sched.timesteps.clone()
        self.sigmas = sched.sigmas.clone().double()  # (steps + 1,), last = 0
        self.layers = decoder_attention_layers(backbone.unet)

    @property
    def steps(self) -> range:
        return range(self.start_step, self.num_steps)

    # -- VAE ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents: the posterior mean, or a
        posterior sample drawn with `generator` (see `encode_latents`)."""
        return encode_latents(self.bb.vae, images, self.vae_batch_images, self.bb.vae_dtype, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, 8h, 8w) float32 images in about [-1, 1]."""
        vae = self.bb.vae
        return decode_in_chunks(
            latents,
            self.vae_batch_images,
            vae.decoder,
            lambda z: vae.decode(z.to(self.bb.vae_dtype) / vae.config.scaling_factor).sample.float(),
        )

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising to the start step: z = z0 + sigma[start] * eps."""
        return z0 + float(self.sigmas[self.start_step]) * noise.to(z0)

    # -- UNet -----------------------------------------------------------------------------------
    def _embeddings(self, n: int) -> torch.Tensor:
        # (2n, S, D): n unconditional then n conditional.
        return torch.cat(
            [self.bb.uncond_embedding.expand(n, -1, -1), self.bb.cond_embedding.expand(n, -1, -1)]
        )

    @torch.no_grad()
    def cfg_step(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """One CFG Euler step of a batch whose two branches are computed in one UNet forward.

        Attention control (injection, modulation, recording) must be set up by the caller for the
        layout [unconditional x N, conditional x N].

        Args:
            x: (N, 4, h, w) latents at `step`.
            step: the step index.

        Returns:
            (N, 4, h, w) latents after the step.
        """
        n = x.shape[0]
        sigma = float(self.sigmas[step])
        model_in = (x / (sigma**2 + 1) ** 0.5).to(self.bb.dtype)
        model_in = torch.cat([model_in, model_in])
        t = self.timesteps[step].to(self.bb.device)
        eps = self.bb.unet(model_in, t, encoder_hidden_states=self._embeddings(n)).sample
        eps_u, eps_c = eps.float().chunk(2)
        eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        return (x.float() + (float(self.sigmas[step + 1]) - sigma) * eps).to(x.dtype)

    @torch.no_grad()
    def unmodulated_pass(
        self,
        z_start: torch.Tensor,
        control: AttentionControl,
        feature_layers: list[str],
        feature_step: int,
        keep_qk: bool = True,
        prefix_layer: str | None = None,
    ) -> PassRecord:
        """Run steps start..end-1 on a batch of frames, recording q/k, latents and features.

        Args:
            z_start: (B, 4, h, w) noised latents.
            control: the attention control state (processors must not be installed yet).
            feature_layers: layer names whose conditional-branch query is the feature.
            feature_step: the step whose queries are the features.
            keep_qk: record q/k of every decoder attention (needed for injection).
            prefix_layer: if given, keep the outputs of the UNet modules that run before this layer
                at the first step, so modulated runs can reuse them (`record.prefix`).

        Returns:
            The record; tensors stay on the compute device.
        """
        if feature_step not in self.steps:
            raise ValueError(f"Expected `feature_step` to be in {list(self.steps)}, but got {feature_step}.")
        chunk = max(1, self.max_batch_images // 2)
        record = PassRecord(qk={}, latents={}, start_latent=z_start, features={})
        if prefix_layer is not None:
            record.prefix = PrefixCache(self.bb.unet, prefix_layer)
        layers = sorted(set(self.layers) | set(feature_layers))
        x = z_start
        with installed_processors(self.bb.unet, layers, control):
            for step in self.steps:
                outs, qk_parts, feat_parts = [], [], []
                keep_prefix = record.prefix is not None and record.prefix.enabled and step == self.start_step
                with record.prefix.recording() if keep_prefix else nullcontext():
                    for xc in x.split(chunk):
                        control.reset()
                        control.record = set(self.layers) if keep_qk else set()
                        control.capture = set(feature_layers) if step == feature_step else set()
                        outs.append(self.cfg_step(xc, step))
                        n = xc.shape[0]
                        qk_parts.append(
                            {
                                k: (q.unflatten(0, (2, n)), kk.unflatten(0, (2, n)))
                                for k, (q, kk) in control.recorded.items()
                            }
                        )
                        feat_parts.append({k: v[n:] for k, v in control.captured.items()})  # conditional
                x = torch.cat(outs)
                record.latents[step] = x
                if keep_qk:
                    record.qk[step] = {
                        k: (
                            torch.cat([p[k][0] for p in qk_parts], 1),
                            torch.cat([p[k][1] for p in qk_parts], 1),
                        )
                        for k in qk_parts[0]
                    }
                if step == feature_step:
                    record.features = {k: torch.cat([p[k] for p in feat_parts]) for k in feature_layers}
            control.reset()
        return record
