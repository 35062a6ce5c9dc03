"""Masked attention modulation (docs/method.md section 4): full-resolution labels from coarse masks.

A *unit* re-runs the steps of the unmodulated pass from the same noised latent with a sign
c in {+lambda, -lambda} and a label's refined coarse mask M_l:

- modulation: `c * M_l` added to the output of the modulated attention layer(s) at the modulation
  step(s), in both CFG branches;
- injection: the injected decoder attentions use the q/k the unmodulated pass computed at the same
  step (the sampler's `qk_layers`);
- latent blending after the blend steps: z <- U(M_l) z_mod + (1 - U(M_l)) z_orig.

`Modulation` is the part every diffusion family shares: the step loop of a batch of units and the
labels of a batch (each (frame, label) pair scored from the decodes of its + and - units by
`scoring.add_unit_votes`). A family says how its units are laid out and batched (`run_units`,
`_units`): SD (`sd.SDModulation`) treats frames independently, SVD
(`svd_modulation.SVDModulation`) runs a unit over the whole batch.

Work the units share is done once (exactly: the same operations on the same values): the controlled
processors are installed once per batch; the key/value projections of a cross-attention's context
(the batch's conditioning, the same for every unit, chunk and step) once per layer and batch shape;
and a recorded q/k is gathered to the units' rows only inside its own layer's call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .attention import AttentionControl, decoder_block_layer, installed_processors, is_temporal
from .clock import StageClock
from .sampler import PassRecord, Sampler
from .scoring import LabelVote, add_unit_votes, upsample_labels


@dataclass
class ModulationSettings:
    """Settings of the full-resolution step.

    Attributes:
        enabled: run masked modulation; False gives the "no modulation" baseline (bilinear
            upsampling of the refined coarse masks' one-hot maps, argmax).
        strength: lambda; units run with +lambda and -lambda.
        steps: steps at which the modulation term is added (default: the first step, 22).
        block: decoder block (paper numbering, 3..11) whose attention is modulated (7).
        attention: modulate the block's "cross" (attn2) or "self" (attn1) attention.
        layer_types: which of the block's attentions get the term: "spatial" (over the pixels of a
            frame; the only kind SD has) and/or "temporal" (over the frames; video backbones).
        inject: inject the unmodulated pass's q/k in every decoder attention at every step.
        inject_layer_types: the decoder attentions that get injected q/k: "spatial" (for SD: every
            decoder self- and cross-attention) and/or "temporal" (video backbones).
        blend: latent blending after `blend_steps`.
        blend_steps: steps after which latents are blended (22 and 23).
        mask_filter: weight the difference map outside the label's mask by `filter_strength`.
        filter_strength: s of the mask filter (0.7).
        blur_kernel: size of the Gaussian blur of the difference map (5).
        blur_sigma: sigma of that blur (3).

    (The speed-up that reuses the unmodulated pass's UNet prefix is `SpeedSettings.reuse_prefix`.)
    """

    enabled: bool = True
    strength: float = 50.0
    steps: list[int] = field(default_factory=lambda: [22])
    block: int = 7
    attention: Literal["self", "cross"] = "cross"
    layer_types: list[Literal["spatial", "temporal"]] = field(default_factory=lambda: ["spatial"])
    inject: bool = True
    inject_layer_types: list[Literal["spatial", "temporal"]] = field(default_factory=lambda: ["spatial"])
    blend: bool = True
    blend_steps: list[int] = field(default_factory=lambda: [22, 23])
    mask_filter: bool = True
    filter_strength: float = 0.7
    blur_kernel: int = 5
    blur_sigma: float = 3.0

    @property
    def layer(self) -> str:
        return decoder_block_layer(self.block, self.attention)


def check_steps(settings: ModulationSettings, steps: range) -> None:
    """Validate that the modulation and blending steps lie in the sampler's step window."""
    for name, values in (("steps", settings.steps), ("blend_steps", settings.blend_steps)):
        bad = [v for v in values if v not in steps]
        if bad:
            raise ValueError(f"Expected `modulation.{name}` to be within {list(steps)}, but got {bad}.")


def _to_grid(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, h, w) float masks at the feature grid -> (N, tokens, 1) at a layer's token grid (nearest)."""
    n, h, w = mask.shape
    scale = math.sqrt(tokens / (h * w))
    gh, gw = round(h * scale), round(w * scale)
    if gh * gw != tokens:
        raise ValueError(f"Expected a layer grid proportional to {h}x{w}, but got {tokens} tokens.")
    if (gh, gw) != (h, w):
        mask = F.interpolate(mask[:, None], size=(gh, gw), mode="nearest")[:, 0]
    return mask.reshape(n, tokens, 1)


def latent_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) float masks at the feature grid -> (..., 1, H, W) at the latent size (nearest)."""
    lead = masks.shape[:-2]
    up = F.interpolate(masks.reshape(-1, 1, *masks.shape[-2:]), size=size, mode="nearest")
    return up.view(*lead, 1, *size)


# The parts of the modulation stage that `Modulation.labels` clocks (seconds), in order: the UNet runs of
# the units (with building them), the VAE decodes, and the difference maps with the running argmax.
MODULATION_CLOCKS = ("modulation_unet", "modulation_decode", "modulation_scoring")


# A group of scored units: final latents (2n: the + units then the - units), frames (n,), masks (n, h, w)
# and labels (n,) of the n (frame, label) pairs they score.
UnitGroup = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Modulation(ABC):
    """Runs the modulated units of one batch and turns them into full-resolution labels.

    Args:
        settings: the modulation settings.
        sampler: the family's sampler (its `max_batch_images` bounds each forward, its `qk_layers`
            are the injected layers).
    """

    def __init__(self, settings: ModulationSettings, sampler: Sampler) -> None:
        self.s = settings
        self.sampler = sampler
        check_steps(settings, sampler.steps)
        self.layers = self._modulated_layers(settings)
        self._control: AttentionControl | None = None  # set while `processors` is entered
        self._context_of = None  # the conditioning whose projections `_control.context_cache` holds
        missing = [n for n in self.layers if n not in sampler.layers]
        if missing:
            raise ValueError(f"Expected the modulated layers {missing} to be decoder attentions of the UNet.")

    # -- what a family defines ----------------------------------------------------------------------
    @abstractmethod
    def _modulated_layers(self, settings: ModulationSettings) -> list[str]:
        """The layers that get the modulation term (validating the family's settings)."""

    @abstractmethod
    def _units(self, record: PassRecord, coarse: torch.Tensor, first: int = 0) -> Iterator[UnitGroup]:
        """Build and run the units of a batch, yielding groups to score in ascending label order;
        only frames `first`.. are scored (earlier frames are context, their labels already out): no
        unit is built, run or decoded for them where the family's units are per frame."""

    # -- shared by the families ---------------------------------------------------------------------
    def _tokens(self, record: PassRecord, latent_hw: tuple[int, int]) -> int:
        """Pixels of the modulated block's level (its spatial token count): from the recorded query
        of a modulated spatial layer if there is one, else from the layer's UNet level."""
        for layer in self.layers:
            if not is_temporal(layer):
                for qk in record.qk.values():
                    if layer in qk:
                        return qk[layer][0].shape[-2]
        level = int(self.layers[0].split(".")[1])  # up_blocks.<level>
        down = 2 ** (len(self.sampler.bb.unet.up_blocks) - 1 - level)
        return (latent_hw[0] // down) * (latent_hw[1] // down)

    def _terms(self, masks: torch.Tensor, signs: torch.Tensor, tokens: int) -> dict[str, torch.Tensor]:
        """Modulation terms of the modulated layers for the UNet's [uncond x U, cond x U] layout.

        Args:
            masks: (U, F, h, w) masks of U units of F frames each at the feature grid.
            signs: (U,) +1 or -1.
            tokens: pixels of the modulated layers' grid.
        """
        u, f = masks.shape[:2]
        m = _to_grid(masks.flatten(0, 1), tokens).view(u, f, tokens)
        m = m * (signs.view(u, 1, 1) * self.s.strength)  # (U, F, S)
        terms = {}
        for name in self.layers:
            # temporal rows are (unit, pixel) with frames as tokens; spatial rows (unit, frame)
            t = (
                m.transpose(1, 2).reshape(u * tokens, f, 1)
                if is_temporal(name)
                else m.reshape(u * f, tokens, 1)
            )
            terms[name] = torch.cat([t, t])  # both CFG branches
        return terms

    @contextmanager
    def processors(self) -> Iterator[AttentionControl]:
        """The controlled processors of the modulated and injected layers, installed once for every
        unit run inside the block (`labels` wraps a whole batch's units in it); re-entering it inside
        reuses the installed ones.

        The control caches the projections of the cross-attentions' context (`context_cache`): a
        unit runs with its record's conditioning, so they are the same for every unit run with the
        same record's conditioning (`_run_steps` clears the cache when that changes).
        """
        if self._control is not None:
            yield self._control
            return
        sm = self.sampler
        injecting = self.s.inject and bool(sm.qk_layers)
        layers = sorted(set(self.layers) | (set(sm.qk_layers) if injecting else set()))
        control = AttentionControl(context_cache={})
        with installed_processors(sm.bb.unet, layers, control):
            self._control, self._context_of = control, None
            try:
                yield control
            finally:
                self._control, self._context_of = None, None

    @torch.no_grad()
    def _run_steps(
        self,
        record: PassRecord,
        x: torch.Tensor,
        lat_mask: torch.Tensor,
        terms: dict[str, torch.Tensor],
        inject: Callable[[torch.Tensor], torch.Tensor],
        original: Callable[[torch.Tensor], torch.Tensor],
        first_step: AbstractContextManager | None = None,
    ) -> torch.Tensor:
        """Run the pass's steps on a batch of units with modulation, injection and blending.

        Args:
            record: the unmodulated pass of the batch.
            x: the units' start latents, in the layout of the family's `cfg_step`.
            lat_mask: the units' masks at the latent size, broadcastable to `x`.
            terms: the modulation terms (`_terms`), added at the modulation steps.
            inject: maps a recorded (2, N, ...) query or key to the units' layout of the layer
                (applied inside each layer's call: `AttentionControl.inject_rows`).
            original: maps a latent of the pass (B, 4, h, w) to the units' layout (for blending).
            first_step: a context the first step runs in (SD's prefix replay), or None.

        Returns:
            The units' latents after the last step.
        """
        sm = self.sampler
        injecting = self.s.inject and bool(sm.qk_layers)
        with self.processors() as control:
            if control.context_cache is not None and self._context_of is not record.conditioning:
                control.context_cache.clear()  # projections of another conditioning
                self._context_of = record.conditioning
            for step in sm.steps:
                control.reset()
                if injecting:
                    # the recorded tensors, gathered to the units' rows by each layer when it runs
                    control.inject, control.inject_rows = record.qk[step], inject
                if step in self.s.steps:
                    control.modulation = terms
                replay = first_step is not None and step == sm.start_step
                with first_step if replay else nullcontext():
                    x = sm.cfg_step(x, step, record.conditioning)
                if self.s.blend and step in self.s.blend_steps:
                    x = lat_mask * x + (1 - lat_mask) * original(record.latents[step])
            control.reset()
        return x

    @torch.no_grad()
    def labels(
        self,
        record: PassRecord,
        coarse: torch.Tensor,
        image_size: tuple[int, int],
        output_size: tuple[int, int] | None = None,
        first: int = 0,
        clocks: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """Labels of a batch at the frames' own resolution from its refined coarse masks.

        Args:
            record: the unmodulated pass of the batch (from the same family's sampler).
            coarse: (B, h, w) int64 refined coarse labels at the feature grid.
            image_size: (H', W') of the resized frames (the VAE's output size).
            output_size: (H, W) of the original frames (default: `image_size`). Each label's
                difference map (after the mask filter) is resized to it and the argmax is taken there.
            first: the first frame whose labels are wanted; the frames before it are context only
                (e.g. the overlap of a video's last batch with the previous one), and their units are
                neither run (SD: units are per frame) nor decoded. The labels of frames first.. are
                exactly those of `first=0`.
            clocks: if given, the seconds of the parts of the step (`MODULATION_CLOCKS`: the units'
                UNet runs, their VAE decodes, the difference maps and argmax) are added to it; on
                CUDA each reading synchronises the device. None: no clock, no synchronisation.

        Returns:
            (B - first, H, W) int64 labels of frames first..B-1, each a label of the frame's coarse mask.
        """
        output_size = tuple(output_size) if output_size is not None else tuple(image_size)
        if not 0 <= first < coarse.shape[0]:
            raise ValueError(f"Expected `first` in [0, {coarse.shape[0]}), but got {first}.")
        if not self.s.enabled:
            return upsample_labels(coarse[first:], output_size)
        if self.s.inject and self.sampler.qk_layers and not record.qk:
            raise ValueError(
                "Expected `record` to hold q/k for injection, but its sampler was made with no `qk_layers`."
            )
        s = self.s
        unit_clock, decode_clock, scoring_clock = MODULATION_CLOCKS
        clock = StageClock(clocks, self.sampler.bb.device)
        vote = LabelVote(coarse.shape[0] - first, output_size, coarse.device)
        with self.processors():  # installed once for all the batch's units, not per chunk of units
            for latents, frames, masks, labels in self._units(record, coarse, first):
                clock.lap(unit_clock)  # the units of this group were built and run
                images = self.sampler.decode(latents)
                clock.lap(decode_clock)
                strength = s.filter_strength if s.mask_filter else None
                add_unit_votes(
                    vote, images, frames - first, masks, labels, s.blur_kernel, s.blur_sigma, strength
                )
                clock.lap(scoring_clock)
        return vote.best
