"""The shared base of the diffusion families' samplers: preprocessing, VAE, noising, the unmodulated pass.

A diffusion family (Stable Diffusion in `sd.py`, Stable Video Diffusion in `svd_sampler.py`)
implements `Sampler`: its conditioning (`condition`: an explicit object, handed to every CFG step)
and its CFG step (`cfg_step`). The window of steps, VAE encode/decode in chunks, forward noising and
the unmodulated pass are shared here.

The schedules are diffusers' `EulerDiscreteScheduler` (SD: trailing spacing, 25 steps, t = 999 - 40 i;
SVD: Karras sigmas). Latents live in the scheduler's sigma space: x = z0 + sigma * eps, with
sigma_25 = 0.

`unmodulated_pass` runs steps start..end-1 once for a batch of frames and keeps, in memory, the
query/key of the layers the family's modulation injects at every step and the latent after every
step, plus the features.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .attention import AttentionControl, decoder_attention_layers, installed_processors
from .prefix import PrefixCache

ResizeMode = Literal["bicubic", "bilinear"]
VaeEncode = Literal["mean", "sample"]
# The budget `speed.max_batch_images: auto` stands for until the segmenter fits it to a frame size
# (on CUDA; `budget.MemoryModel`), and off CUDA.
DEFAULT_MAX_BATCH_IMAGES = 56


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


def decode_in_chunks(
    latents: torch.Tensor, chunk_size: int, decode: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Decode n latents in ceil(n / `chunk_size`) chunks of near-equal size (sizes differ by at most
    one), with no padding: every image decoded is an image used.

    Args:
        latents: (N, ...) latents.
        chunk_size: most latents per call of `decode`.
        decode: maps a chunk of latents to float32 images.

    Returns:
        (N, 3, H, W) images.
    """
    chunks = math.ceil(latents.shape[0] / max(1, chunk_size))
    return torch.cat([decode(chunk) for chunk in latents.tensor_split(chunks)])


def _mark_dynamic_sizes(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of a compiled decoder: its input's batch, height and width are dynamic."""
    sample = args[0]  # (N, C, h, w)
    torch._dynamo.mark_dynamic(sample, [0, sample.dim() - 2, sample.dim() - 1])


def compile_decoder(decoder: torch.nn.Module, backend: str | Callable = "inductor") -> torch.nn.Module:
    """`torch.compile` a VAE decoder for any chunk size and frame size.

    The input's batch and spatial sizes are marked dynamic before every call (`mark_dynamic`, from a
    forward pre-hook, which runs outside the compiled frame), so the decoder compiles once, at its
    first call, and neither a new chunk size nor a new frame size compiles it again (static shapes
    would recompile for each, and fall back to eager after Dynamo's recompile limit). Only a chunk of
    one latent is compiled once more (Dynamo specialises sizes 0 and 1); SD's decodes never have one,
    as they come in pairs (+ and - units). Bucketing instead would pad: the batch with wasted decodes,
    or the latent with borders that change the pixels.

    Args:
        decoder: the VAE's decoder (`vae.decoder`); its first argument is the (N, C, h, w) latent.
        backend: the `torch.compile` backend ("inductor"; tests use "eager").

    Returns:
        The compiled decoder (an `OptimizedModule`; its state dict is the decoder's).
    """
    compiled = torch.compile(decoder, backend=backend)
    compiled.register_forward_pre_hook(_mark_dynamic_sizes)
    return compiled


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache_dir(directory: str | None) -> str | None:
    """Point Inductor's on-disk caches (FX graph, AOTAutograd, Triton kernels: all under
    `TORCHINDUCTOR_CACHE_DIR`, torch's documented knob, read at each compile) at `directory`, so a
    restarted job finds its compiled kernels. Call it before the first compile of the process.

    The environment variable, when already set, wins (a job's environment overrides its config);
    None leaves torch's default.

    Returns:
        The cache directory in effect, or None for torch's default.
    """
    if os.environ.get(COMPILE_CACHE_ENV):
        return os.environ[COMPILE_CACHE_ENV]
    if directory is None:
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    os.environ[COMPILE_CACHE_ENV] = path
    return path


def prepared(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A loaded module in `dtype` on `device`, in eval mode without gradients."""
    if next(module.parameters()).dtype != dtype:
        # (not `.to(dtype)`, which makes diffusers log a spurious float32 warning)
        {torch.float16: module.half, torch.bfloat16: module.bfloat16, torch.float32: module.float}[dtype]()
    return module.to(device=device).eval().requires_grad_(False)


class LoadedModels:
    """Device, dtype and VAE scale of loaded `unet` and `vae` attributes (shared by SD and SVD)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any

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
class PassRecord:
    """What the unmodulated pass keeps for the modulated runs, all on the compute device.

    Attributes:
        qk: step index -> layer name -> (query, key), each (2, N, heads, L, head_dim): branch 0
            unconditional, branch 1 conditional, then the layer's rows per branch (SD and spatial
            layers: N = frames, L = pixels; temporal layers: N = pixels, L = frames).
        latents: step index -> (B, 4, h, w) latent after that step.
        start_latent: (B, 4, h, w) the noised latent the runs start from.
        features: layer name -> (B, tokens, channels) conditional-branch query at the feature step.
        conditioning: the family's conditioning the pass ran with (the modulated runs use it too).
        prefix: the UNet prefix outputs of the first step, when the sampler keeps them (`prefix.py`).
        captured: step -> layer name -> (B, tokens, channels) conditional-branch queries of the
            further layers the pass was asked to capture (`captures`, e.g. cross-attention queries
            for open-vocabulary naming).
    """

    qk: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    latents: dict[int, torch.Tensor]
    start_latent: torch.Tensor
    features: dict[str, torch.Tensor]
    conditioning: Any = None
    prefix: PrefixCache | None = None
    captured: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Sampler(ABC):
    """CFG Euler sampling of a diffusion family over a window of steps, with attention control.

    Args:
        backbone: the loaded backbone.
        num_inference_steps: length of the schedule (25).
        start_step: index of the first step run (the noising level).
        guidance_scale: classifier-free guidance scale.
        max_batch_images: most images per UNet forward (each CFG branch counts); bounds memory
            ("auto": `DEFAULT_MAX_BATCH_IMAGES`, which the segmenter refits per frame size on CUDA).
        vae_batch_images: most images per VAE encode/decode.
        qk_layers: the layers whose q/k the unmodulated pass keeps for injection (default: every
            decoder attention; [] keeps none). The family decides them from its modulation settings.
    """

    # Frames per VAE decode call (`num_frames` of a temporal decoder); None for an image VAE.
    vae_decode_frames: int | None = None
    # The modulated layer whose UNet prefix the unmodulated pass keeps (SD's `speed.reuse_prefix`).
    prefix_layer: str | None = None

    def __init__(
        self,
        backbone: LoadedModels,
        num_inference_steps: int,
        start_step: int,
        guidance_scale: float,
        max_batch_images: int | Literal["auto"],
        vae_batch_images: int,
        qk_layers: list[str] | None = None,
    ) -> None:
        if not 0 <= start_step < num_inference_steps:
            raise ValueError(
                f"Expected `start_step` to be in [0, {num_inference_steps}), but got {start_step}."
            )
        if max_batch_images == "auto":  # (a family given `SpeedSettings()`)
            max_batch_images = DEFAULT_MAX_BATCH_IMAGES
        if max_batch_images < 2:
            raise ValueError(f"Expected `max_batch_images` to be at least 2, but got {max_batch_images}.")
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
        self.qk_layers = list(self.layers if qk_layers is None else qk_layers)
        unknown = [n for n in self.qk_layers if n not in self.layers]
        if unknown:
            raise ValueError(f"Expected `qk_layers` to be decoder attentions of the UNet, but got {unknown}.")

    @property
    def steps(self) -> range:
        return range(self.start_step, self.num_steps)

    # -- what a family defines ----------------------------------------------------------------------
    @abstractmethod
    def condition(self, images: torch.Tensor) -> Any:
        """The conditioning of a batch of (B, 3, H, W) resized frames in [-1, 1] (for `cfg_step`)."""

    @abstractmethod
    def cfg_step(self, x: torch.Tensor, step: int, cond: Any) -> torch.Tensor:
        """One CFG Euler step of a batch of units whose two branches run in one UNet forward.

        Attention control must be set up by the caller for the UNet's layout
        [unconditional x N, conditional x N].
        """

    def _frames_per_forward(self, num_frames: int) -> int:
        """Frames of the unmodulated pass per UNet forward (default: as many as the budget allows)."""
        return max(1, self.max_batch_images // 2)

    def _pass_step(self, x: torch.Tensor, step: int, cond: Any) -> torch.Tensor:
        """`cfg_step` of (n, 4, h, w) frames of the unmodulated pass."""
        return self.cfg_step(x, step, cond)

    # -- VAE ------------------------------------------------------------------------------------------
    @contextmanager
    def encoding_dtype(self) -> Iterator[torch.dtype]:
        """The dtype images are VAE-encoded in (a family may upcast the VAE meanwhile)."""
        yield self.bb.vae_dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents: the posterior mean, or a
        posterior sample drawn with `generator` (see `encode_latents`)."""
        with self.encoding_dtype() as dtype:
            return encode_latents(self.bb.vae, images, self.vae_batch_images, dtype, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) scaled latents -> (N, 3, 8h, 8w) float32 images in about [-1, 1].

        A temporal VAE decodes each frame on its own (`vae_decode_frames` = 1, as the SVD reference
        does), so the result does not depend on how frames are chunked.
        """
        vae, bb = self.bb.vae, self.bb
        kw = {} if self.vae_decode_frames is None else {"num_frames": self.vae_decode_frames}
        return decode_in_chunks(
            latents,
            self.vae_batch_images,
            lambda z: vae.decode(
                z.to(bb.device, bb.vae_dtype) / vae.config.scaling_factor, **kw
            ).sample.float(),
        )

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising to the start step: z = z0 + sigma[start] * eps."""
        return z0 + float(self.sigmas[self.start_step]) * noise.to(z0)

    # -- the unmodulated pass ---------------------------------------------------------------------------
    @torch.no_grad()
    def unmodulated_pass(
        self,
        z_start: torch.Tensor,
        cond: Any,
        control: AttentionControl,
        feature_layers: list[str],
        feature_step: int,
        captures: dict[int, list[str]] | None = None,
    ) -> PassRecord:
        """Run steps start..end-1 on a batch of frames, recording q/k, latents and features.

        Args:
            z_start: (B, 4, h, w) noised latents.
            cond: the batch's conditioning (`condition`).
            control: the attention control state (processors must not be installed yet).
            feature_layers: layer names whose conditional-branch query is the feature.
            feature_step: the step whose queries are the features.
            captures: step -> further layers whose conditional-branch queries the record keeps
                (`record.captured`); no extra UNet work.

        Returns:
            The record (q/k of `qk_layers`; the UNet prefix of `prefix_layer` at the first step, if
            set); tensors stay on the compute device.
        """
        if feature_step not in self.steps:
            raise ValueError(f"Expected `feature_step` to be in {list(self.steps)}, but got {feature_step}.")
        captures = {step: list(layers) for step, layers in (captures or {}).items() if layers}
        wrong = sorted(set(captures) - set(self.steps))
        if wrong:
            raise ValueError(f"Expected capture steps in {list(self.steps)}, but got {wrong}.")
        record = PassRecord(qk={}, latents={}, start_latent=z_start, features={}, conditioning=cond)
        if self.prefix_layer is not None:
            record.prefix = PrefixCache(self.bb.unet, self.prefix_layer)
        qk_layers = set(self.qk_layers)
        captured_layers = {n for layers in captures.values() for n in layers}
        chunk = self._frames_per_forward(z_start.shape[0])
        x = z_start
        installed = sorted(qk_layers | set(feature_layers) | captured_layers)
        with installed_processors(self.bb.unet, installed, control):
            for step in self.steps:
                outs, qk_parts, feat_parts = [], [], []
                keep_prefix = record.prefix is not None and record.prefix.enabled and step == self.start_step
                with record.prefix.recording() if keep_prefix else nullcontext():
                    for xc in x.split(chunk):
                        control.reset()
                        control.record = set(qk_layers)
                        control.capture = set(feature_layers) if step == feature_step else set()
                        control.capture |= set(captures.get(step, ()))
                        outs.append(self._pass_step(xc, step, cond))
                        qk_parts.append(
                            {
                                k: (q.unflatten(0, (2, -1)), kk.unflatten(0, (2, -1)))
                                for k, (q, kk) in control.recorded.items()
                            }
                        )
                        # the conditional branch: the second half of the rows
                        feat_parts.append({k: v[v.shape[0] // 2 :] for k, v in control.captured.items()})
                x = torch.cat(outs)
                record.latents[step] = x
                if qk_layers:
                    record.qk[step] = {
                        k: (
                            torch.cat([p[k][0] for p in qk_parts], 1),
                            torch.cat([p[k][1] for p in qk_parts], 1),
                        )
                        for k in qk_parts[0]
                    }
                if step == feature_step:
                    record.features = {k: torch.cat([p[k] for p in feat_parts]) for k in feature_layers}
                if step in captures:
                    record.captured[step] = {k: torch.cat([p[k] for p in feat_parts]) for k in captures[step]}
            control.reset()
        return record
