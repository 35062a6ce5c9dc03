"""Masked attention modulation (docs/method.md section 4): full-resolution labels from coarse masks.

For each (frame, label) with the label present in the frame's refined coarse mask and each sign
c in {+lambda, -lambda}, a *unit* re-runs the steps of the unmodulated pass from the same noised
latent with

- modulation: `c * M_l` added to the output of one attention layer at the modulation step(s);
- injection: every decoder attention uses the q/k the unmodulated pass computed at the same step;
- latent blending after the blend steps: z <- U(M_l) z_mod + (1 - U(M_l)) z_orig.

The final latents of the + and - units are decoded and clamped to [-1, 1]; the difference map (L2
over RGB, Gaussian blur, divided by its max, optional mask filter) of each label is resized to the
frame's own size and compared per pixel there, and the argmax is the label (`LabelVote`). SD treats
the frames of a batch independently, so units of different frames, labels and signs are batched
freely (`max_batch_images`); a label absent from a frame costs nothing for that frame.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .attention import AttentionControl, installed_processors
from .sampler import DiffusionSampler, PassRecord


def decoder_block_layer(
    block: int, attention: Literal["self", "cross"], stack: str = "transformer_blocks"
) -> str:
    """The diffusers layer name of an SD decoder ("output") block's attention.

    The paper numbers the 12 decoder blocks 0..11 as the original SD code does; blocks 3..11 have
    attention: block n is `up_blocks[n // 3].attentions[n % 3]`.
    """
    if not 3 <= block <= 11:
        raise ValueError(f"Expected `block` to be a decoder block with attention (3..11), but got {block}.")
    kind = {"self": "attn1", "cross": "attn2"}.get(attention)
    if kind is None:
        raise ValueError(f"Expected `attention` to be 'self' or 'cross', but got {attention!r}.")
    return f"up_blocks.{block // 3}.attentions.{block % 3}.{stack}.0.{kind}"


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
        reuse_prefix: at the first step, reuse the unmodulated pass's UNet computation before the
            modulated layer instead of recomputing it (same labels, about a fifth less UNet work).
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
    reuse_prefix: bool = True

    @property
    def layer(self) -> str:
        return decoder_block_layer(self.block, self.attention)


def check_steps(settings: ModulationSettings, steps: range) -> None:
    """Validate that the modulation and blending steps lie in the sampler's step window."""
    for name, values in (("steps", settings.steps), ("blend_steps", settings.blend_steps)):
        bad = [v for v in values if v not in steps]
        if bad:
            raise ValueError(f"Expected `modulation.{name}` to be within {list(steps)}, but got {bad}.")


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps with reflect-101 borders (OpenCV's default)."""
    if kernel_size <= 1:
        return x
    if kernel_size % 2 == 0:
        raise ValueError(f"Expected `blur_kernel` to be odd, but got {kernel_size}.")
    r = kernel_size // 2
    coords = torch.arange(kernel_size, dtype=torch.float64, device=x.device) - r
    k = torch.exp(-(coords**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    y = x.unsqueeze(1)  # (N, 1, H, W)
    y = F.pad(y, (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.squeeze(1)


def difference_maps(plus: torch.Tensor, minus: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blurred, max-normalised L2 difference of the decoded images of + and - units.

    The decodes are clamped to the image range [-1, 1] first (as the reference clamps its decodes),
    so that a few out-of-range pixels of a VAE decode (fp16 outliers) can neither dominate a map
    nor, through the normalisation by its max, flatten the rest of it.

    Args:
        plus: (N, 3, H, W) decoded images of the + units.
        minus: (N, 3, H, W) decoded images of the - units.
        kernel_size: size of the Gaussian blur.
        sigma: sigma of the Gaussian blur.

    Returns:
        (N, H, W) float32 maps in [0, 1].
    """
    diff = plus.float().clamp(-1.0, 1.0) - minus.float().clamp(-1.0, 1.0)
    d = diff.pow(2).sum(1).sqrt()
    d = gaussian_blur(d, kernel_size, sigma)
    return d / (d.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) float maps -> (N, H, W), bilinear (half-pixel centres); unchanged at the same size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class LabelVote:
    """Per-pixel argmax over per-label maps that arrive a few at a time, at the output size.

    Each map is resized bilinearly to the output size (the frame's own resolution) before it is
    compared, so an edge between two labels lands where their maps cross at that resolution. Only
    the running best score and label per output pixel are kept: memory is (frames x H x W), however
    many labels there are. A tie keeps the label added first (callers add labels in ascending order,
    so ties go to the smaller label, as `argmax` does).

    Args:
        num_frames: frames of the batch.
        size: (H, W) output size.
        device: where the scores live.
    """

    def __init__(self, num_frames: int, size: tuple[int, int], device: torch.device | str) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.scores = torch.full((num_frames, *self.size), float("-inf"), device=device)
        self.best = torch.zeros((num_frames, *self.size), dtype=torch.long, device=device)

    def add(self, frames: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor) -> None:
        """Add maps (frames may repeat, e.g. two labels of one frame).

        Args:
            frames: (n,) frame index of each map.
            maps: (n, h, w) maps at any size.
            labels: (n,) label of each map.
        """
        up = resize_maps(maps.to(self.scores.device, torch.float32), self.size)  # (n, H, W)
        for i in range(up.shape[0]):
            f = int(frames[i])
            better = up[i] > self.scores[f]
            self.scores[f] = torch.where(better, up[i], self.scores[f])
            self.best[f] = torch.where(better, int(labels[i]), self.best[f])


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


class MaskedModulation:
    """Runs the modulated units of one batch and turns them into full-resolution labels.

    Args:
        settings: the modulation settings.
        sampler: the sampler of the loaded backbone (its `max_batch_images` bounds each forward).
    """

    def __init__(self, settings: ModulationSettings, sampler: DiffusionSampler) -> None:
        self.s = settings
        self.sampler = sampler
        check_steps(settings, sampler.steps)
        if list(settings.layer_types) != ["spatial"] or list(settings.inject_layer_types) != ["spatial"]:
            raise ValueError(
                "Expected `modulation.layer_types` and `modulation.inject_layer_types` to be ['spatial'] "
                "for an image backbone (it has no temporal attention), but got "
                f"{settings.layer_types} and {settings.inject_layer_types}."
            )
        self.layer = settings.layer
        if self.layer not in sampler.layers:
            raise ValueError(
                f"Expected the modulated layer {self.layer!r} to be a decoder attention of the UNet."
            )

    # -- one chunk of units ---------------------------------------------------------------------
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
        sm = self.sampler
        dev = record.start_latent.device
        frame_idx = frame_idx.to(dev)
        masks = masks.to(dev)
        x = record.start_latent[frame_idx]
        lat_mask = F.interpolate(masks[:, None], size=x.shape[-2:], mode="nearest")  # (U, 1, h8, w8)
        control = AttentionControl()
        prefix = record.prefix if (record.prefix is not None and record.prefix.outputs) else None
        with installed_processors(sm.bb.unet, sm.layers, control):
            for step in sm.steps:
                control.reset()
                replay = prefix is not None and step == sm.start_step
                if self.s.inject:
                    control.inject = {
                        name: (q[:, frame_idx].flatten(0, 1), k[:, frame_idx].flatten(0, 1))
                        for name, (q, k) in record.qk[step].items()
                    }
                if step in self.s.steps:
                    q_tokens = record.qk[step][self.layer][0].shape[-2] if record.qk else None
                    tokens = q_tokens or self._tokens(x)
                    mod = _to_grid(masks, tokens) * (signs.to(dev).view(-1, 1, 1) * self.s.strength)
                    control.modulation = {self.layer: torch.cat([mod, mod])}  # both CFG branches
                with prefix.replaying(frame_idx) if replay else nullcontext():
                    x = sm.cfg_step(x, step)
                if self.s.blend and step in self.s.blend_steps:
                    orig = record.latents[step][frame_idx]
                    x = lat_mask * x + (1 - lat_mask) * orig
            control.reset()
        return x

    def _tokens(self, x: torch.Tensor) -> int:
        # Token count of the modulated layer when no q/k was recorded: from its UNet level.
        level = int(self.layer.split(".")[1])  # up_blocks.<level>
        n_up = len(self.sampler.bb.unet.up_blocks)
        down = 2 ** (n_up - 1 - level)
        return (x.shape[-2] // down) * (x.shape[-1] // down)

    # -- a whole batch ------------------------------------------------------------------------
    @torch.no_grad()
    def labels(
        self,
        record: PassRecord,
        coarse: torch.Tensor,
        image_size: tuple[int, int],
        output_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Labels of a batch at the frames' own resolution from its refined coarse masks.

        Args:
            record: the unmodulated pass of the batch.
            coarse: (B, h, w) int64 refined coarse labels at the feature grid.
            image_size: (H', W') of the resized frames (the VAE's output size).
            output_size: (H, W) of the original frames (default: `image_size`). Each label's
                difference map (after the mask filter) is resized to it and the argmax is taken there.

        Returns:
            (B, H, W) int64 labels, each a label of the frame's coarse mask.
        """
        output_size = tuple(output_size) if output_size is not None else tuple(image_size)
        if not self.s.enabled:
            return upsample_labels(coarse, output_size)
        b = coarse.shape[0]
        # Units: (frame, label) pairs present in the coarse masks, in label-then-frame order.
        frame_list, label_list = [], []
        for label in coarse.unique().tolist():
            present = (coarse == label).flatten(1).any(1).nonzero().flatten()
            frame_list.append(present)
            label_list.append(torch.full_like(present, label))
        frames = torch.cat(frame_list)
        labels = torch.cat(label_list)
        masks = (coarse[frames] == labels.view(-1, 1, 1)).float()
        n_units = frames.shape[0]
        per_chunk = max(1, self.sampler.max_batch_images // 4)  # 2 signs x 2 CFG branches per unit
        vote = LabelVote(b, output_size, coarse.device)
        for start in range(0, n_units, per_chunk):
            sl = slice(start, start + per_chunk)
            f, m, lab = frames[sl], masks[sl], labels[sl]
            n = f.shape[0]
            signs = torch.cat([torch.ones(n), -torch.ones(n)])
            z = self.run_units(record, torch.cat([f, f]), torch.cat([m, m]), signs)
            img = self.sampler.decode(z)  # (2n, 3, H', W')
            d = difference_maps(img[:n], img[n:], self.s.blur_kernel, self.s.blur_sigma)
            if self.s.mask_filter:
                d = filter_by_mask(d, m.to(d.device), self.s.filter_strength)
            vote.add(f, d, lab)  # labels ascend: a tie keeps the smaller label
        return vote.best


def filter_by_mask(d: torch.Tensor, masks: torch.Tensor, strength: float) -> torch.Tensor:
    """The mask filter: d * U(M) + s * d * (1 - U(M)), U a bilinear upsampling to the map's size.

    Args:
        d: (n, H, W) difference maps.
        masks: (n, h, w) float 0/1 coarse masks of the maps' labels.
        strength: s, the weight outside the mask.
    """
    smooth = resize_maps(masks.float(), tuple(d.shape[-2:]))
    return d * smooth + strength * d * (1 - smooth)


def upsample_labels(coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The "no modulation" baseline: bilinear upsampling of one-hot coarse masks, then argmax.

    One label at a time (a running argmax, ties to the smaller label), so memory stays at a few
    (B, H, W) maps whatever the number of labels.

    Args:
        coarse: (B, h, w) int64 labels.
        size: (H, W) output size (the frames' own resolution).

    Returns:
        (B, H, W) int64 labels.
    """
    b = coarse.shape[0]
    vote = LabelVote(b, size, coarse.device)
    frames = torch.arange(b)
    for label in coarse.unique().tolist():  # ascending
        vote.add(frames, (coarse == label).float(), torch.full((b,), label))
    return vote.best
