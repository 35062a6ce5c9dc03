"""Masked modulation for the SVD backbone (docs/method.md sections 4 and 6).

The SVD UNet mixes the frames of a batch through its temporal attention, so a modulated run cannot
treat frames independently as SD's `SDModulation` does: a *unit* is (label, sign) over the whole
batch. Each unit re-runs the steps of the unmodulated pass on all B frames from the same noised latent
with

- modulation: `c * M_l(f)` (the label's refined coarse mask of frame f at the block's grid, zero in
  frames without the label) added to the outputs of the modulated block's spatial and/or temporal
  attention (`ModulationSettings.layer_types`) at the modulation step(s), in both CFG branches;
- injection: the decoder attentions of `ModulationSettings.inject_layer_types` (the reference:
  temporal) use the q/k of the unmodulated pass at the same step (`svd_inject_layers`: the family
  hands them to its sampler as `qk_layers`). Only self-attention is injected: SVD's
  cross-attentions attend to a single token (the CLIP image embedding), so their output does not
  depend on q/k and injecting them would be a no-op that costs memory;
- latent blending after the blend steps (the reference: every step 17..24), per frame.

The final latents of the + and - units are decoded frame by frame and scored as SD's (the difference
maps of each label compete per pixel, among the labels present in that frame's coarse mask). Several
units run in one UNet forward when `max_batch_images` allows (2B images per unit).

Settings for the paper's SVD variant (`svd_modulation_settings()`): modulation at step 17 on block
8's spatial and temporal self-attention, lambda 50, temporal q/k injection, blending after 17..24.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .attention import is_temporal, svd_block_layer
from .modulation import Modulation, ModulationSettings, UnitGroup, latent_masks
from .sampler import PassRecord


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


def svd_inject_layers(layers: list[str], settings: ModulationSettings) -> list[str]:
    """The self-attentions among decoder `layers` whose kind is in `settings.inject_layer_types`."""
    kinds = set(settings.inject_layer_types)
    return [
        n for n in layers if n.endswith(".attn1") and ("temporal" if is_temporal(n) else "spatial") in kinds
    ]


class SVDModulation(Modulation):
    """SVD's modulated units: one (label, sign) over the whole batch each.

    Args:
        settings: the modulation settings (see `svd_modulation_settings` for the paper's values).
        sampler: the sampler of the loaded SVD backbone; its `qk_layers` are the injected layers.
    """

    def _modulated_layers(self, settings: ModulationSettings) -> list[str]:
        types = list(settings.layer_types)
        if not types or len(set(types)) != len(types):
            raise ValueError(
                "Expected `modulation.layer_types` to be a non-empty list of distinct 'spatial'/'temporal', "
                f"but got {settings.layer_types}."
            )
        return [svd_block_layer(settings.block, settings.attention, t) for t in types]

    @torch.no_grad()
    def run_units(self, record: PassRecord, masks: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Run modulated units in one batch and return their final latents.

        Args:
            record: the unmodulated pass of the batch.
            masks: (U, B, h, w) float 0/1 masks of each unit's label at the feature grid (zero in
                frames without the label).
            signs: (U,) +1 or -1.

        Returns:
            (U, B, 4, H/8, W/8) latents after the last step.
        """
        dev = record.start_latent.device
        masks, signs = masks.to(dev), signs.to(dev)
        u = masks.shape[0]
        x = record.start_latent[None].expand(u, -1, -1, -1, -1)  # (U, B, 4, h8, w8)
        hw = tuple(x.shape[-2:])
        return self._run_steps(
            record,
            x,
            latent_masks(masks, hw),  # (U, B, 1, h8, w8)
            self._terms(masks, signs, self._tokens(record, hw)),
            inject=lambda t: t[:, None].expand(2, u, *t.shape[1:]).flatten(0, 2),  # (2, N, ...) -> (2UN, ...)
            original=lambda z: z[None],
        )

    def _units(self, record: PassRecord, coarse: torch.Tensor, first: int = 0) -> Iterator[UnitGroup]:
        # A unit spans the whole batch (the temporal attention mixes its frames), so context frames
        # are modulated with the rest; only their decodes are skipped.
        b = coarse.shape[0]
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
        for i, label in enumerate(values.tolist()):  # ascending: a tie keeps the smaller label
            frames = present[i].nonzero().flatten()
            frames = frames[frames >= first]
            if not frames.numel():
                continue
            latents = torch.cat([finals[2 * i, frames], finals[2 * i + 1, frames]])
            yield latents, frames, masks[i, frames], torch.full((frames.numel(),), label)
