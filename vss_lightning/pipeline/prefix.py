"""Reuse of the unmodulated pass's UNet prefix at the first modulated step (a speed optimisation).

A modulated run starts from the same noised latent as the unmodulated pass, so at its first step
everything the UNet computes *before* the modulated attention layer (the whole encoder, the middle
block, the decoder blocks before it) equals what the unmodulated pass computed for that frame; q/k
injection does not change it either (the injected q/k are the ones those layers compute). On SD
2.1 at 832x448 this prefix is about 60% of a UNet forward (BENCHMARKS.md), a fifth of the cost of
every modulated run.

`PrefixCache.recording()` keeps, during the unmodulated pass's first step, the outputs of the
top-level modules of that prefix (forward hooks). `PrefixCache.replaying(frame_idx)` makes those
modules return the kept outputs of the units' frames instead of computing them. This is the one
place where the package swaps a module's `forward` at run time (attention processors cannot skip
non-attention modules); the swap is undone on exit and checked by tests to leave labels unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def prefix_modules(unet: nn.Module, layer: str) -> list[str]:
    """Names of the top-level UNet modules that run entirely before `layer` (SD UNet layout).

    Args:
        unet: a `UNet2DConditionModel`.
        layer: the modulated layer, `up_blocks.<i>.attentions.<j>.transformer_blocks.0.attn<k>`.

    Returns:
        Module names in execution order; [] if the layout is not recognised (no reuse).
    """
    parts = layer.split(".")
    if len(parts) < 4 or parts[0] != "up_blocks" or parts[2] != "attentions":
        return []
    i, j = int(parts[1]), int(parts[3])
    names = ["conv_in"]
    names += [f"down_blocks.{d}" for d in range(len(unet.down_blocks))]
    names += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    names += [f"up_blocks.{u}" for u in range(i)]
    names += [f"up_blocks.{i}.resnets.{r}" for r in range(j + 1)]
    names += [f"up_blocks.{i}.attentions.{a}" for a in range(j)]
    return names


def _map(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor of a module output (tensor, tuple/list, or diffusers BaseOutput)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map(o, fn) for o in out)
    if isinstance(out, dict):  # diffusers BaseOutput is an OrderedDict dataclass
        return type(out)(**{k: _map(v, fn) for k, v in out.items()})
    return out


def _cat(parts: list[Any]) -> Any:
    """Concatenate chunk outputs along the frame dim of the (2, n, ...) layout."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=1)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[k] for p in parts]) for k in range(len(first)))
    if isinstance(first, dict):
        return type(first)(**{k: _cat([p[k] for p in parts]) for k in first})
    return first


class PrefixCache:
    """Keeps and replays the outputs of a UNet's prefix modules for one batch of frames.

    Args:
        unet: the UNet.
        layer: the modulated layer (the prefix ends before it).
    """

    def __init__(self, unet: nn.Module, layer: str) -> None:
        self.unet = unet
        self.names = prefix_modules(unet, layer)
        self._parts: dict[str, list[Any]] = {}
        self.outputs: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def clear(self) -> None:
        self._parts, self.outputs = {}, {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the prefix outputs of the forwards run inside (layout [branch x n] per forward)."""
        handles = []
        for name in self.names:

            def hook(_m, _args, out, name=name):
                split = _map(out, lambda t: t.unflatten(0, (2, t.shape[0] // 2)))  # (2, n, ...)
                self._parts.setdefault(name, []).append(split)

            handles.append(self.unet.get_submodule(name).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.outputs = {k: _cat(v) for k, v in self._parts.items()}
            self._parts = {}

    @contextmanager
    def replaying(self, frame_idx: torch.Tensor) -> Iterator[None]:
        """Make the prefix modules return the recorded outputs of `frame_idx`, layout [branch x U]."""
        if set(self.outputs) != set(self.names):
            raise RuntimeError("Expected the prefix to be recorded before it is replayed, but it was not.")
        patched = []
        for name in self.names:
            module = self.unet.get_submodule(name)
            kept = _map(self.outputs[name], lambda t: t[:, frame_idx.to(t.device)].flatten(0, 1))

            def forward(*_args, _kept=kept, **_kwargs):
                return _kept

            module.forward = forward
            patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward
