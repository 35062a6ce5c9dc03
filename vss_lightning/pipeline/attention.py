"""Attention processors that record, inject and modulate, keyed by layer name.

One processor class (`ControlledAttnProcessor`) replaces diffusers' `AttnProcessor2_0` in the layers
the method touches. It computes exactly what `AttnProcessor2_0` computes and, depending on the shared
`AttentionControl` state, can

- record the query and key of a layer (the unmodulated pass keeps them for injection),
- capture the query as a feature map (the segmentation features),
- inject a recorded query and key (so QK^T is that of the unmodulated pass; the layer's own q/k
  projections are then skipped); the recorded tensors are mapped to the layer's batch rows
  (`AttentionControl.inject_rows`) only when the layer runs, so one layer's gathered q/k is alive at
  a time rather than every injected layer's,
- reuse the key/value projections of a constant context (`AttentionControl.context_cache`): a
  cross-attention's context is the family's conditioning, the same for every modulated unit, chunk
  and step of a batch, so its projections are computed once per layer and batch shape,
- add a modulation term to the attention output, after the output projection and before the
  transformer block's residual add.

Layer names are the UNet module paths without the `.processor` suffix, e.g.
`up_blocks.2.attentions.1.transformer_blocks.0.attn2`; `decoder_block_layer` and `svd_block_layer`
name a decoder block's attention from the paper's block numbering. `installed_processors` installs
processors by name with `unet.set_attn_processor` and restores the originals on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

_SUFFIX = ".processor"


LayerType = Literal["spatial", "temporal"]


def decoder_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of every self- (attn1) and cross-attention (attn2) layer of the UNet's decoder."""
    return [k[: -len(_SUFFIX)] for k in unet.attn_processors if k.startswith("up_blocks.")]


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


def svd_block_layer(
    block: int, attention: Literal["self", "cross"], layer_type: LayerType = "spatial"
) -> str:
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


def is_temporal(layer: str) -> bool:
    """Whether a layer is a temporal attention (over the frames at a pixel) of a video UNet."""
    return ".temporal_transformer_blocks." in layer


@dataclass
class AttentionControl:
    """Shared, mutable state read by the processors during one UNet forward.

    Attributes:
        record: layer names whose (query, key) are stored into `recorded` at this forward.
        recorded: layer name -> (query, key), each (batch, heads, tokens, head_dim).
        capture: layer names whose query is stored into `captured` at this forward.
        captured: layer name -> query (batch, tokens, channels).
        inject: layer name -> (query, key) used instead of the computed ones: (batch, heads, tokens,
            head_dim) each, or, with `inject_rows`, the recorded tensors it maps to that layout.
        inject_rows: None, or maps a recorded query or key to the layer's batch rows when the layer
            runs (a gather: its copy is freed when the layer returns, instead of the copies of every
            injected layer living through the whole forward).
        modulation: layer name -> tensor broadcastable to the layer's output (batch, tokens, channels),
            added after the output projection.
        context_cache: None, or (layer name, "k" or "v", context shape) -> the projection of a
            cross-attention's context, computed at its first use and reused after. Only for a
            context that is the same tensor value at every forward for a given shape (a batch's
            conditioning during its modulated runs); `reset` keeps it, the owner clears it.
    """

    record: set[str] = field(default_factory=set)
    recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    capture: set[str] = field(default_factory=set)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    inject: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    inject_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    modulation: dict[str, torch.Tensor] = field(default_factory=dict)
    context_cache: dict[tuple[str, str, tuple[int, ...]], torch.Tensor] | None = None

    def reset(self) -> None:
        """Clear the state of one forward (not `context_cache`, which spans forwards)."""
        self.record = set()
        self.recorded = {}
        self.capture = set()
        self.captured = {}
        self.inject = {}
        self.inject_rows = None
        self.modulation = {}


class ControlledAttnProcessor:
    """`AttnProcessor2_0` with recording, capture, q/k injection and output modulation.

    Args:
        name: the layer name this processor is installed on.
        control: the shared state; with an empty state the output equals `AttnProcessor2_0`'s.
    """

    def __init__(self, name: str, control: AttentionControl) -> None:
        self.name = name
        self.control = control

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        ctl = self.control
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # a cross-attention's context may be constant over the forwards (`context_cache`)
        cache = ctl.context_cache if encoder_hidden_states is not None else None
        context_shape = tuple(encoder_hidden_states.shape) if cache is not None else ()
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        def context_projection(kind: str, linear: torch.nn.Module) -> torch.Tensor:
            if cache is None:
                return linear(encoder_hidden_states)
            # the same module on the same input shape and values: the same result, bit for bit
            slot = (self.name, kind, context_shape)
            if slot not in cache:
                cache[slot] = linear(encoder_hidden_states)
            return cache[slot]

        value = context_projection("v", attn.to_v)
        inner_dim = value.shape[-1]
        head_dim = inner_dim // attn.heads
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, L, d)
        injected = ctl.inject.get(self.name)
        if injected is not None and ctl.inject_rows is not None:
            injected = (ctl.inject_rows(injected[0]), ctl.inject_rows(injected[1]))
        if injected is not None and self.name not in ctl.capture and self.name not in ctl.record:
            # q and k would be replaced: their projections are not computed at all (exact)
            q_in, k_in = injected
            want_q = (batch_size, attn.heads, hidden_states.shape[1], head_dim)
            want_k = (batch_size, attn.heads, encoder_hidden_states.shape[1], head_dim)
            if tuple(q_in.shape) != want_q or tuple(k_in.shape) != want_k:
                raise ValueError(
                    f"Expected injected q/k of `{self.name}` to have shapes {want_q} and {want_k}, but got "
                    f"{tuple(q_in.shape)} and {tuple(k_in.shape)}."
                )
            query, key = q_in.to(value.dtype), k_in.to(value.dtype)
        else:
            query = attn.to_q(hidden_states)  # (batch, tokens, inner)
            if self.name in ctl.capture:
                ctl.captured[self.name] = query
            key = context_projection("k", attn.to_k)
            query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (batch, heads, N, d)
            key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if self.name in ctl.record:
                ctl.recorded[self.name] = (query, key)
            if injected is not None:
                q_in, k_in = injected
                if q_in.shape != query.shape or k_in.shape != key.shape:
                    raise ValueError(
                        f"Expected injected q/k of `{self.name}` to have shapes {tuple(query.shape)} and "
                        f"{tuple(key.shape)}, but got {tuple(q_in.shape)} and {tuple(k_in.shape)}."
                    )
                query, key = q_in.to(query.dtype), k_in.to(key.dtype)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        mod = ctl.modulation.get(self.name)
        if mod is not None:
            hidden_states = hidden_states + mod.to(hidden_states.dtype)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


@contextmanager
def installed_processors(
    unet: torch.nn.Module,
    layers: list[str],
    control: AttentionControl,
    factory: Callable[[str, AttentionControl], object] = ControlledAttnProcessor,
) -> Iterator[AttentionControl]:
    """Install a controlled processor on each named layer; restore the original processors on exit.

    Args:
        unet: the UNet.
        layers: layer names (module paths without `.processor`).
        control: the shared state handed to every installed processor.
        factory: builds the processor of a layer.

    Raises:
        KeyError: if a layer name is not an attention layer of the UNet.
    """
    original = dict(unet.attn_processors)
    unknown = [n for n in layers if n + _SUFFIX not in original]
    if unknown:
        raise KeyError(
            f"Expected attention layer names of this UNet (e.g. {next(iter(original))[: -len(_SUFFIX)]!r}), "
            f"but got {unknown}."
        )
    procs = dict(original)
    for name in layers:
        procs[name + _SUFFIX] = factory(name, control)
    unet.set_attn_processor(procs)
    try:
        yield control
    finally:
        unet.set_attn_processor(original)
        control.reset()
