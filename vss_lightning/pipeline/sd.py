"""The Stable Diffusion family: loaded models, text conditioning, sampler and masked modulation.

Sampler. Euler in the scheduler's sigma space with epsilon prediction (diffusers'
`EulerDiscreteScheduler`, trailing spacing): the UNet sees x / sqrt(sigma^2 + 1); an Euler step is
x <- x + (sigma_{i+1} - sigma_i) * eps_cfg. The conditioning is the empty prompt's text embedding
(conditional branch) and zeros (unconditional branch).

Modulation (docs/method.md section 4). SD treats the frames of a batch independently, so a unit is
one (frame, label, sign): units of different frames, labels and signs are batched freely
(`max_batch_images`), and a label absent from a frame costs nothing for that frame. Every decoder
attention is injected; at the first step the units may replay the unmodulated pass's UNet prefix
(`prefix.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from .modulation import Modulation, ModulationSettings, UnitGroup, latent_masks
from .naming import PromptEncoder
from .sampler import LoadedModels, PassRecord, Sampler, prepared


@dataclass
class LoadedBackbone(LoadedModels):
    """A Stable Diffusion backbone ready to run.

    Attributes:
        unet: the denoiser (eval mode, no grad).
        vae: the autoencoder.
        scheduler: an `EulerDiscreteScheduler` with trailing timestep spacing (its noise schedule is
            the checkpoint's).
        cond_embedding: (1, S, D) text embedding of the empty prompt (conditional CFG branch).
        uncond_embedding: (1, S, D) all-zero embedding (unconditional CFG branch).
        prompts: the tokenizer and text encoder (CPU, float32) for open-vocabulary naming
            (`naming.PromptEncoder`), or None for a backbone without them.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: EulerDiscreteScheduler
    cond_embedding: torch.Tensor
    uncond_embedding: torch.Tensor
    prompts: PromptEncoder | None = None

    @classmethod
    def ready(
        cls, unet, vae, scheduler, cond: torch.Tensor, device, dtype, prompts: PromptEncoder | None = None
    ) -> LoadedBackbone:
        """Models in `dtype` on `device` in eval mode; the unconditional embedding is zeros."""
        unet, vae = prepared(unet, device, dtype), prepared(vae, device, dtype)
        cond = cond.to(device=device, dtype=dtype)
        return cls(unet, vae, scheduler, cond, torch.zeros_like(cond), prompts)


@dataclass
class TextConditioning:
    """The prompt conditioning of SD's CFG branches.

    Attributes:
        uncond: (1, S, D) embedding of the unconditional branch.
        cond: (1, S, D) embedding of the conditional branch.
    """

    uncond: torch.Tensor
    cond: torch.Tensor


class SDSampler(Sampler):
    """CFG Euler sampling of SD over a window of steps, with attention control.

    Args:
        backbone: the loaded backbone.
        num_inference_steps: length of the schedule (25).
        start_step: index of the first step run (noising level; 22 -> t = 119).
        guidance_scale: classifier-free guidance scale (5).
        max_batch_images: most images per UNet/VAE forward (each CFG branch counts); bounds memory.
        vae_batch_images: most images per VAE encode/decode.
        qk_layers: layers whose q/k the unmodulated pass keeps (default: every decoder attention).
        prefix_layer: if given, the unmodulated pass keeps the outputs of the UNet modules that run
            before this layer at the first step, so modulated runs can reuse them (`record.prefix`).
    """

    def __init__(
        self,
        backbone: LoadedBackbone,
        num_inference_steps: int = 25,
        start_step: int = 22,
        guidance_scale: float = 5.0,
        max_batch_images: int = 56,
        vae_batch_images: int = 8,
        qk_layers: list[str] | None = None,
        prefix_layer: str | None = None,
    ) -> None:
        super().__init__(
            backbone,
            num_inference_steps,
            start_step,
            guidance_scale,
            max_batch_images,
            vae_batch_images,
            qk_layers,
        )
        self.prefix_layer = prefix_layer

    def condition(self, images: torch.Tensor) -> TextConditioning:
        """The empty prompt's conditioning (the same for every batch; `images` are not used)."""
        return TextConditioning(self.bb.uncond_embedding, self.bb.cond_embedding)

    @torch.no_grad()
    def cfg_step(self, x: torch.Tensor, step: int, cond: TextConditioning) -> torch.Tensor:
        """One CFG Euler step of a batch whose two branches are computed in one UNet forward.

        Attention control (injection, modulation, recording) must be set up by the caller for the
        layout [unconditional x N, conditional x N].

        Args:
            x: (N, 4, h, w) latents at `step`.
            step: the step index.
            cond: the prompt conditioning (`condition`).

        Returns:
            (N, 4, h, w) latents after the step.
        """
        n = x.shape[0]
        sigma = float(self.sigmas[step])
        model_in = (x / (sigma**2 + 1) ** 0.5).to(self.bb.dtype)
        model_in = torch.cat([model_in, model_in])
        t = self.timesteps[step].to(self.bb.device)
        emb = torch.cat([cond.uncond.expand(n, -1, -1), cond.cond.expand(n, -1, -1)])  # (2N, S, D)
        eps = self.bb.unet(model_in, t, encoder_hidden_states=emb).sample
        eps_u, eps_c = eps.float().chunk(2)
        eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        return (x.float() + (float(self.sigmas[step + 1]) - sigma) * eps).to(x.dtype)


def check_spatial_only(settings: ModulationSettings) -> None:
    """Refuse temporal layer types: an image backbone has no temporal attention."""
    if list(settings.layer_types) != ["spatial"] or list(settings.inject_layer_types) != ["spatial"]:
        raise ValueError(
            "Expected `modulation.layer_types` and `modulation.inject_layer_types` to be ['spatial'] "
            "for an image backbone (it has no temporal attention), but got "
            f"{settings.layer_types} and {settings.inject_layer_types}. Set both to [spatial], or use "
            "a video backbone (Stable Video Diffusion)."
        )


class SDModulation(Modulation):
    """SD's modulated units: one (frame, label, sign) each, batched freely across frames and labels.

    Args:
        settings: the modulation settings.
        sampler: the SD sampler (its `max_batch_images` bounds each forward).
    """

    def _modulated_layers(self, settings: ModulationSettings) -> list[str]:
        check_spatial_only(settings)
        self.layer = settings.layer
        return [self.layer]

    @torch.no_grad()
    def run_units(
        self, record: PassRecord, frame_idx: torch.Tensor, masks: torch.Tensor, signs: torch.Tensor
    ) -> torch.Tensor:
        """Run modulated units in one batch and return their final latents.

        Args:
            record: the unmodulated pass of the batch.
            frame_idx: (U,) frame index of each unit.
            masks: (U, h, w) float 0/1 mask of the unit's label at the feature grid.
            signs: (U,) +1 or -1.

        Returns:
            (U, 4, H/8, W/8) latents after the last step.
        """
        dev = record.start_latent.device
        frame_idx, masks = frame_idx.to(dev), masks.to(dev)
        x = record.start_latent[frame_idx]
        hw = tuple(x.shape[-2:])
        prefix = record.prefix if (record.prefix is not None and record.prefix.outputs) else None
        return self._run_steps(
            record,
            x,
            latent_masks(masks, hw),  # (U, 1, h8, w8)
            self._terms(masks[:, None], signs.to(dev), self._tokens(record, hw)),
            inject=lambda t: t[:, frame_idx].flatten(0, 1),  # (2, B, ...) -> (2U, ...)
            original=lambda z: z[frame_idx],
            first_step=prefix.replaying(frame_idx) if prefix is not None else None,
        )

    def _units(self, record: PassRecord, coarse: torch.Tensor, first: int = 0) -> Iterator[UnitGroup]:
        # Units: (frame, label) pairs present in the coarse masks of frames first.., in label-then-frame
        # order (each unit depends on its own frame only, so leaving context frames out is exact).
        frame_list, label_list = [], []
        for label in coarse[first:].unique().tolist():
            present = (coarse[first:] == label).flatten(1).any(1).nonzero().flatten() + first
            frame_list.append(present)
            label_list.append(torch.full_like(present, label))
        frames = torch.cat(frame_list)
        labels = torch.cat(label_list)
        masks = (coarse[frames] == labels.view(-1, 1, 1)).float()
        per_chunk = max(1, self.sampler.max_batch_images // 4)  # 2 signs x 2 CFG branches per unit
        for start in range(0, frames.shape[0], per_chunk):
            sl = slice(start, start + per_chunk)
            f, m, lab = frames[sl], masks[sl], labels[sl]
            n = f.shape[0]
            signs = torch.cat([torch.ones(n), -torch.ones(n)])
            yield self.run_units(record, torch.cat([f, f]), torch.cat([m, m]), signs), f, m, lab
