"""Masked modulation for the SVD backbone (docs/method.md sections 4 and 6).

The SVD UNet mixes the frames of a batch through its temporal attention, so a modulated run cannot
treat frames independently as SD's `MaskedModulation` does: a *unit* is (label, sign) over the whole
batch. Each unit re-runs the steps of the unmodulated pass on all B frames from the same noised latent
with

- modulation: `c * M_l(f)` (the label's refined coarse mask of frame f at the block's grid, zero in
  frames without the label) added to the outputs of the modulated block's spatial and/or temporal
  attention (`ModulationSettings.layer_types`) at the modulation step(s), in both CFG branches;
- injection: the decoder attentions of `ModulationSettings.inject_layer_types` (the reference:
  temporal) use the q/k of the unmodulated pass at the same step. Only self-attention is injected:
  SVD's cross-attentions attend to a single token (the CLIP image embedding), so their output does
  not depend on q/k and injecting them would be a no-op that costs memory;
- latent blending after the blend steps (the reference: every step 17..24), per frame.

The final latents of the + and - units are decoded frame by frame; the difference maps (as for SD)
of each label compete per pixel, among the labels present in that frame's coarse mask. Several
units run in one UNet forward when `max_batch_images` allows (2B images per unit).

Settings for the paper's SVD variant (`svd_modulation_settings()`): modulation at step 17 on block
8's spatial and temporal self-attention, lambda 50, temporal q/k injection, blending after 17..24.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionControl, installed_processors
from .modulation import (
    LabelVote,
    ModulationSettings,
    _to_grid,
    check_steps,
    difference_maps,
    filter_by_mask,
    upsample_labels,
)
from .svd import SVDPassRecord, SVDSampler, svd_block_layer


def svd_modulation_settings(**overrides) -> ModulationSettings:
    """`ModulationSettings` of the paper's SVD variant (keyword arguments override single fields)."""
    values = dict(
        steps=[17],
        block=8,
        attention="self",
        layer_types=["spatial", "temporal"],
        inject_layer_types=["temporal"],
        blend_steps=list(range(17, 25)),
    )
    values.update(overrides)
    return ModulationSettings(**values)


def _is_temporal(layer: str) -> bool:
    return ".temporal_transformer_blocks." in layer


class SVDModulation:
    """Runs the modulated units of one SVD batch and turns them into full-resolution labels.

    Args:
        settings: the modulation settings (see `svd_modulation_settings` for the paper's values).
        sampler: the sampler of the loaded SVD backbone; its `inject_layers` are set here to the
            layers injected, so that the unmodulated pass records only those.
    """

    def __init__(self, settings: ModulationSettings, sampler: SVDSampler) -> None:
        self.s = settings
        self.sampler = sampler
        check_steps(settings, sampler.steps)
        types = list(settings.layer_types)
        if not types or len(set(types)) != len(types):
            raise ValueError(
                "Expected `modulation.layer_types` to be a non-empty list of distinct 'spatial'/'temporal', "
                f"but got {settings.layer_types}."
            )
        self.layers = [svd_block_layer(settings.block, settings.attention, t) for t in types]
        missing = [n for n in self.layers if n not in sampler.layers]
        if missing:
            raise ValueError(f"Expected the modulated layers {missing} to be decoder attentions of the UNet.")
        kinds = set(settings.inject_layer_types)
        self.inject_layers = [
            n
            for n in sampler.layers
            if n.endswith(".attn1") and ("temporal" if _is_temporal(n) else "spatial") in kinds
        ]
        sampler.inject_layers = self.inject_layers

    # -- one chunk of units -----------------------------------------------------------------------
    def _tokens(self, latent_hw: tuple[int, int]) -> int:
        """Pixels of the modulated block's level (its spatial token count) for a latent size."""
        level = int(self.layers[0].split(".")[1])  # up_blocks.<level>
        down = 2 ** (len(self.sampler.bb.unet.up_blocks) - 1 - level)
        return (latent_hw[0] // down) * (latent_hw[1] // down)

    def _terms(self, masks: torch.Tensor, signs: torch.Tensor, tokens: int) -> dict[str, torch.Tensor]:
        """Modulation terms of the modulated layers for the UNet's [uncond x U, cond x U] layout."""
        u, f = masks.shape[:2]
        m = _to_grid(masks.flatten(0, 1), tokens).view(u, f, tokens)
        m = m * (signs.view(u, 1, 1) * self.s.strength)  # (U, F, S)
        terms = {}
        for name in self.layers:
            # temporal rows are (video, pixel) with frames as tokens; spatial rows (video, frame)
            t = (
                m.transpose(1, 2).reshape(u * tokens, f, 1)
                if _is_temporal(name)
                else m.reshape(u * f, tokens, 1)
            )
            terms[name] = torch.cat([t, t])  # both CFG branches
        return terms

    @torch.no_grad()
    def run_units(self, record: SVDPassRecord, masks: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Run modulated units in one batch and return their final latents.

        Args:
            record: the unmodulated pass of the batch.
            masks: (U, B, h, w) float 0/1 masks of each unit's label at the feature grid (zero in
                frames without the label).
            signs: (U,) +1 or -1.

        Returns:
            (U, B, 4, H/8, W/8) latents after the last step.
        """
        sm = self.sampler
        dev = record.start_latent.device
        masks, signs = masks.to(dev), signs.to(dev)
        u, b = masks.shape[:2]
        x = record.start_latent[None].expand(u, -1, -1, -1, -1)  # (U, B, 4, h8, w8)
        lat_hw = tuple(x.shape[-2:])
        lat_mask = F.interpolate(masks.flatten(0, 1)[:, None], size=lat_hw, mode="nearest")
        lat_mask = lat_mask.view(u, b, 1, *lat_hw)
        inject = self.s.inject and bool(self.inject_layers)
        layers = sorted(set(self.layers) | (set(self.inject_layers) if inject else set()))
        control = AttentionControl()
        with installed_processors(sm.bb.unet, layers, control):
            for step in sm.steps:
                control.reset()
                if inject:
                    control.inject = {
                        name: tuple(t[:, None].expand(2, u, *t.shape[1:]).flatten(0, 2) for t in qk)
                        for name, qk in record.qk[step].items()
                    }
                if step in self.s.steps:
                    control.modulation = self._terms(masks, signs, self._tokens(lat_hw))
                x = sm.cfg_step(x, step, record.conditioning)
                if self.s.blend and step in self.s.blend_steps:
                    x = lat_mask * x + (1 - lat_mask) * record.latents[step][None]
            control.reset()
        return x

    # -- a whole batch ------------------------------------------------------------------------------
    @torch.no_grad()
    def labels(
        self,
        record: SVDPassRecord,
        coarse: torch.Tensor,
        image_size: tuple[int, int],
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Labels of a batch at the frames' own resolution from its refined coarse masks.

        Args:
            record: the unmodulated pass of the batch (from `SVDSampler.unmodulated_pass`).
            coarse: (B, h, w) int64 refined coarse labels at the feature grid.
            image_size: (H', W') of the resized frames (the VAE's output size).
            output_size: (H, W) of the original frames (default: `image_size`); the argmax of the
                difference maps is taken at this size (see `modulation.LabelVote`).

        Returns:
            (B, H, W) int64 labels, each a label of the frame's coarse mask.
        """
        output_size = tuple(output_size) if output_size is not None else tuple(image_size)
        if not self.s.enabled:
            return upsample_labels(coarse, output_size)
        if getattr(record, "conditioning", None) is None:
            raise ValueError(
                "Expected `record` to come from `SVDSampler.unmodulated_pass`, but it has no conditioning."
            )
        if self.s.inject and self.inject_layers and not record.qk:
            raise ValueError(
                "Expected `record` to hold q/k for injection, but it was made with `keep_qk=False`."
            )
        b = coarse.shape[0]
        dev = coarse.device
        values = coarse.unique()  # ascending
        masks = (coarse[None] == values.view(-1, 1, 1, 1)).float()  # (L, B, h, w)
        present = masks.flatten(2).any(2)  # (L, B)
        # Units [l0+, l0-, l1+, l1-, ...]; a forward holds as many whole units as the budget allows.
        unit_masks = masks.repeat_interleave(2, 0)
        signs = torch.tensor([1.0, -1.0]).repeat(values.numel())
        per_forward = max(1, self.sampler.max_batch_images // (2 * b))
        finals = torch.cat(
            [
                self.run_units(record, unit_masks[i : i + per_forward], signs[i : i + per_forward])
                for i in range(0, unit_masks.shape[0], per_forward)
            ]
        )  # (2L, B, 4, h8, w8)
        vote = LabelVote(b, output_size, dev)
        for i, label in enumerate(values.tolist()):  # ascending: a tie keeps the smaller label
            frames = present[i].nonzero().flatten()
            img = self.sampler.decode(torch.cat([finals[2 * i, frames], finals[2 * i + 1, frames]]))
            n = frames.numel()
            d = difference_maps(img[:n], img[n:], self.s.blur_kernel, self.s.blur_sigma)
            if self.s.mask_filter:
                d = filter_by_mask(d, masks[i, frames].to(d.device), self.s.filter_strength)
            vote.add(frames, d, torch.full((n,), label))
        return vote.best
