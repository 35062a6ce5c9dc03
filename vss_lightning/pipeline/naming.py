"""Open-vocabulary naming: class scores for every label from the UNet's own cross-attention.

Stable Diffusion's decoder cross-attentions (`attn2`) tie image positions to text tokens. The
unmodulated pass already computes their queries at the feature step; for a class name the keys are
`attn2.to_k(text embedding of a prompt naming it)`. The attention of each position to the name's
tokens, softmax(q k^T / sqrt(d)) over the prompt's tokens exactly as the layer computes it, averaged
over heads, the name's tokens, the chosen layers (each resized to the feature grid) and the prompt
templates, is a score map for that class (the idea of "Open-Vocabulary Attention Maps", CVPR 2024;
our own code). It costs matrix products, not UNet passes: the prompts are encoded once per job and
their keys kept per layer (`ClassNamer`).

A label takes the class with the highest mean score over its feature-grid cells in all frames of the
video (`label_classes`), after each class's map is normalised per frame or per video (min-max); the
per-label sums live in the video's prototypes (`prototypes.PrototypeAccumulator`), so no score map is
kept. docs/method.md section 10 describes it for users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

Normalize = Literal["video", "frame", "none"]


@dataclass
class NamingSettings:
    """How labels are named from the cross-attention (label_mode `open_vocab`, and the class scores
    a corpus vocabulary's `name` step uses).

    Attributes:
        templates: prompts naming a class, each with one `{}` for the name (underscores in class
            names become spaces); the score maps of all templates are averaged.
        blocks: decoder blocks (paper numbering, 3..11) whose cross-attention (attn2) queries are
            scored; blocks of other resolutions are resized to the feature grid (bilinear).
        step: the sampling step whose queries are used; None: the features' step.
        normalize: each class's score map is min-max normalised over the "video" (all its cells in
            all frames), per "frame", or not at all ("none": raw attention probabilities).
        unknown_threshold: a label whose best (normalised) mean score is below this is written as
            `context.ignore_index` (unknown) instead of a class; None names every label.
    """

    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    blocks: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    step: int | None = None
    normalize: Normalize = "video"
    unknown_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError("Expected `naming.templates` to hold at least one prompt, but it is empty.")
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(
                    f"Expected each of `naming.templates` to hold exactly one '{{}}' for the class name, but "
                    f"got {t!r}. Write e.g. 'a photo of a {{}}.'"
                )
        if not self.blocks:
            raise ValueError("Expected `naming.blocks` to name at least one decoder block, but it is empty.")
        if self.normalize not in ("video", "frame", "none"):
            raise ValueError(
                f"Expected `naming.normalize` to be 'video', 'frame' or 'none', but got {self.normalize!r}."
            )


def prompt_name(class_name: str) -> str:
    """The words a class name is written with in a prompt ("traffic_light" -> "traffic light")."""
    return " ".join(class_name.replace("_", " ").split())


def load_class_names(value: Sequence[str] | str) -> list[str]:
    """Class names from a list, or from a YAML file (a list, or `{id: name}` for ids 0..C-1) or a text
    file (one name per line; blank lines and `#` comments skipped).

    Raises:
        ValueError: for an unreadable file, an empty list, duplicates or ids that are not 0..C-1.
    """
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(
                f"Expected `class_names` to be a list of names or a YAML/text file of them, but {value!r} is "
                "not a file. Pass a list (--model.class_names '[road, sky]') or a path to a names file."
            )
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"Expected {path} to be YAML, but parsing failed: {e}") from e
            if isinstance(data, dict):
                try:
                    by_id = {int(k): str(v) for k, v in data.items()}
                except (TypeError, ValueError) as e:
                    raise ValueError(f"Expected {path} to map class ids (integers) to names: {e}") from e
                if sorted(by_id) != list(range(len(by_id))):
                    raise ValueError(
                        f"Expected the ids of {path} to be 0..{len(by_id) - 1}, but got "
                        f"{sorted(by_id)[:10]}. Name every class id in order."
                    )
                names = [by_id[i] for i in range(len(by_id))]
            elif isinstance(data, list):
                names = [str(n) for n in data]
            else:
                raise ValueError(f"Expected {path} to hold a list of class names or an id -> name map.")
        else:
            names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        where = str(path)
    else:
        names, where = [str(n) for n in value], "`class_names`"
    if not names:
        raise ValueError(f"Expected {where} to name at least one class, but it names none.")
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise ValueError(f"Expected the class names of {where} to be distinct, but {seen} repeat.")
    return names


def same_class_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists name the same classes in the same order (case and '_' vs ' ' ignored)."""
    return [prompt_name(n).lower() for n in a] == [prompt_name(n).lower() for n in b]


def resolve_class_names(
    given: list[str] | None, manifest: Sequence[str] | None, where: str, required: bool
) -> list[str] | None:
    """The class names a job names labels with: `given` (checked against the shards' manifest), else
    the manifest's when `required` (label_mode open_vocab), else None.

    Raises:
        ValueError: if `given` differs from the manifest's names, or names are required and neither
            tells them (naming `where` and the fix).
    """
    names = given
    if names is not None and manifest and not same_class_names(names, manifest):
        raise ValueError(
            f"Expected `--model.class_names` to be the classes of {where} in its id order "
            f"({len(manifest)}: {manifest[:4]}...), but got {len(names)}: {names[:4]}... Fix the list, "
            "or leave it unset to take the manifest's."
        )
    if names is None and required:
        if not manifest:
            raise ValueError(
                "Expected class names for label_mode open_vocab, but none were given and the shards' "
                "manifest.json records none. Pass --model.class_names (a list or a YAML/text file, in "
                "the dataset's id order)."
            )
        names = list(manifest)
    return names


@dataclass
class Prompts:
    """Encoded prompts: one per (template, class), template-major.

    Attributes:
        embeddings: (P, S, D) text-encoder hidden states (as the pipeline conditions the UNet).
        name_mask: (P, S) bool, True at the tokens of the class name.
        class_names: the C class names; P = templates x C.
    """

    embeddings: torch.Tensor
    name_mask: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class PromptEncoder:
    """A tokenizer and text encoder (CPU, float32) that encode class-name prompts.

    Args:
        tokenizer: a CLIP tokenizer (its `model_max_length` is the prompt length, 77 for SD).
        text_encoder: the backbone's text encoder (`CLIPTextModel`); its last hidden state conditions
            the UNet, as the diffusers pipeline does.
    """

    def __init__(self, tokenizer, text_encoder: torch.nn.Module) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def token_ids(
        self, templates: Sequence[str], class_names: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, S) token ids of every prompt and (P, S) the mask of the name's tokens.

        The name's tokens are found by tokenizing the template's text before and after `{}` and the
        name separately; the prompt's tokens must be exactly their concatenation (CLIP's tokenizer
        splits words at spaces and punctuation, so a template with the name between spaces or
        punctuation always is).

        Raises:
            ValueError: for a template that merges the name with its neighbours, or a prompt longer
                than the text encoder takes.
        """
        length = int(self.tokenizer.model_max_length)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(templates) * len(class_names), length), pad, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for t, template in enumerate(templates):
            before, after = template.split("{}")
            for c, name in enumerate(class_names):
                words = prompt_name(name)
                full = self._ids(before + words + after, special=True)
                parts = [self._ids(before, False), self._ids(words, False), self._ids(after, False)]
                if full[1:-1] != parts[0] + parts[1] + parts[2] or not parts[1]:
                    raise ValueError(
                        f"Expected template {template!r} to keep the tokens of class {name!r} apart from "
                        "its own words, but the tokenizer merges them. Put a space or punctuation on both "
                        "sides of '{}'."
                    )
                if len(full) > length:
                    raise ValueError(
                        f"Expected the prompt {before + words + after!r} to fit the text encoder's {length} "
                        f"tokens, but it has {len(full)}. Shorten the template or the class name."
                    )
                p = t * len(class_names) + c
                ids[p, : len(full)] = torch.tensor(full)
                start = 1 + len(parts[0])
                mask[p, start : start + len(parts[1])] = True
        return ids, mask

    @torch.no_grad()
    def encode(self, templates: Sequence[str], class_names: Sequence[str], batch_size: int = 64) -> Prompts:
        """Encode every (template, class) prompt (template-major)."""
        ids, mask = self.token_ids(templates, class_names)
        device = next(self.text_encoder.parameters()).device
        out = [self.text_encoder(chunk.to(device))[0].float().cpu() for chunk in ids.split(batch_size)]
        return Prompts(torch.cat(out), mask, list(class_names))


def cross_attention_probs(attn, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cross-attention probabilities of queries over every prompt's tokens, as `attn` computes them.

    Args:
        attn: the diffusers `Attention` layer (its `heads`, `scale`, `norm_q`).
        query: (B, N, inner) the layer's `to_q` output (what `AttentionControl.capture` keeps).
        keys: (P, S, inner) `attn.to_k` of the prompts' embeddings (`layer_keys`).

    Returns:
        (B, heads, N, P, S) float32 softmax over each prompt's S tokens.
    """
    b, n, inner = query.shape
    heads = attn.heads
    d = inner // heads
    q = query.float().view(b, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    k = keys.float().view(keys.shape[0], keys.shape[1], heads, d).permute(2, 0, 1, 3)  # (heads, P, S, d)
    if attn.norm_q is not None:
        q = attn.norm_q(q).float()
    if attn.norm_k is not None:
        k = attn.norm_k(k).float()
    logits = torch.einsum("bhnd,hpsd->bhnps", q, k) * attn.scale
    return logits.softmax(-1)


def layer_keys(attn, embeddings: torch.Tensor) -> torch.Tensor:
    """(P, S, inner) keys of a cross-attention layer for prompt embeddings (P, S, D)."""
    weight = attn.to_k.weight
    x = embeddings.to(weight.device, weight.dtype)
    if attn.norm_cross:
        x = attn.norm_encoder_hidden_states(x)
    return attn.to_k(x)


class ClassNamer:
    """Score maps of C classes from stored cross-attention queries (see the module docstring).

    Args:
        layers: layer name -> the diffusers `Attention` module (cross-attention, attn2).
        prompts: the encoded prompts (template-major, `PromptEncoder.encode`).
        step: the sampling step whose queries are scored.
        normalize: "frame" min-max normalises each class's map per frame here; "video" and "none"
            leave the maps raw (the video's normalisation needs all its frames: `label_classes`).
        max_elements: bound of one chunk's (B, heads, N, P', S) probability tensor (memory).
    """

    def __init__(
        self,
        layers: dict[str, torch.nn.Module],
        prompts: Prompts,
        step: int,
        normalize: Normalize = "video",
        max_elements: int = 1 << 26,
    ) -> None:
        self.layers = dict(layers)
        self.step = step
        self.normalize = normalize
        self.class_names = list(prompts.class_names)
        self.num_classes = prompts.num_classes
        self.max_elements = max_elements
        self.keys = {name: layer_keys(attn, prompts.embeddings) for name, attn in self.layers.items()}
        self.name_mask = prompts.name_mask  # (P, S)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    @torch.no_grad()
    def layer_scores(self, name: str, query: torch.Tensor) -> torch.Tensor:
        """(B, N, P) attention of every position to each prompt's name tokens (mean over heads and
        the name's tokens) at one layer, in chunks of prompts."""
        attn, keys = self.layers[name], self.keys[name]
        mask = self.name_mask.to(query.device, torch.float32)
        mask = mask / mask.sum(1, keepdim=True)  # (P, S): the mean over the name's tokens
        b, n, _ = query.shape
        per_prompt = b * attn.heads * n * keys.shape[1]
        chunk = max(1, self.max_elements // max(1, per_prompt))
        out = []
        for start in range(0, keys.shape[0], chunk):
            probs = cross_attention_probs(attn, query, keys[start : start + chunk])  # (B, h, N, P', S)
            out.append(torch.einsum("bhnps,ps->bnp", probs, mask[start : start + chunk]) / attn.heads)
        return torch.cat(out, 2)

    @torch.no_grad()
    def scores(self, queries: dict[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """(B, h, w, C) class score maps at the feature grid from the queries of `layer_names`.

        Args:
            queries: layer name -> (B, N, inner) conditional-branch `to_q` output at `step`.
            grid: (h, w) of the feature grid; each layer's N tokens tile a grid of the frame's aspect.
        """
        total = None
        for name in self.layer_names:
            q = queries[name]
            s = self.layer_scores(name, q)  # (B, N, P)
            factor = math.sqrt(grid[0] * grid[1] / s.shape[1])
            lh, lw = round(grid[0] / factor), round(grid[1] / factor)
            if lh * lw != s.shape[1]:
                raise ValueError(f"Expected the {s.shape[1]} tokens of `{name}` to tile a grid like {grid}.")
            maps = s.transpose(1, 2).unflatten(2, (lh, lw))  # (B, P, lh, lw)
            if (lh, lw) != grid:
                maps = F.interpolate(
                    maps, size=grid, mode="bilinear", align_corners=False, antialias=lh > grid[0]
                )
            total = maps if total is None else total + maps
        maps = total / len(self.layer_names)  # (B, P, h, w)
        b = maps.shape[0]
        maps = maps.unflatten(1, (-1, self.num_classes)).mean(1)  # templates averaged: (B, C, h, w)
        if self.normalize == "frame":
            flat = maps.flatten(2)
            lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
            maps = ((flat - lo) / (hi - lo).clamp_min(1e-12)).view(b, self.num_classes, *grid)
        return maps.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C)


def normalized_scores(
    class_scores: torch.Tensor, score_range: torch.Tensor | None, normalize: Normalize = "video"
) -> torch.Tensor:
    """(L, C) float64 per-label mean class scores as `normalize` compares them: "video" min-max
    normalises each class with the video's (2, C) `score_range` (the mean of a normalised map is the
    normalised mean, so this is exact); "frame" (normalised already) and "none" are as given."""
    s = class_scores.double()
    if normalize == "video":
        if score_range is None:
            raise ValueError("Expected the video's score range for `naming.normalize: video`, but got none.")
        lo, hi = score_range[0].double(), score_range[1].double()
        s = (s - lo) / (hi - lo).clamp_min(1e-12)
    return s


def label_classes(
    class_scores: torch.Tensor,
    score_range: torch.Tensor | None,
    labels: Sequence[int],
    normalize: Normalize = "video",
    unknown_threshold: float | None = None,
    unknown_id: int = 255,
) -> dict[int, int]:
    """Each label's class: the highest mean score over its cells (several labels may share one).

    Args:
        class_scores: (L, C) each label's mean score per class over its cells in every frame.
        score_range: (2, C) the smallest and largest score of each class over every cell of the video
            (for `normalize="video"`), or None.
        labels: (L,) the label ids.
        normalize: "video" min-max normalises each class with `score_range` (the mean of a normalised
            map is the normalised mean, so this is exact); "frame" and "none" use the scores as given.
        unknown_threshold: labels whose best score is below it get `unknown_id`.
        unknown_id: the id of unknown labels.
    """
    s = normalized_scores(class_scores, score_range, normalize)
    best, cls = s.max(1) if s.numel() else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    out = {}
    for label, b, c in zip(labels, best.tolist(), cls.tolist(), strict=True):
        known = unknown_threshold is None or b >= unknown_threshold
        out[int(label)] = int(c) if known else int(unknown_id)
    return out


def build_namer(
    loaded, backbone, class_names: Sequence[str], settings: NamingSettings, feature_step: int, steps: range
) -> ClassNamer:
    """The `ClassNamer` of a loaded backbone: its cross-attention layers of `settings.blocks` and the
    class prompts encoded once with its text encoder.

    Args:
        loaded: the loaded models (`prompts`: the tokenizer and text encoder; `unet`).
        backbone: the backbone (`attention_layer`, `description`).
        class_names: the classes, in id order.
        settings: the naming settings.
        feature_step: the features' step (the default step).
        steps: the steps of the unmodulated pass.

    Raises:
        ValueError: if the backbone has no text encoder (e.g. SVD, which is image conditioned), or a
            naming setting does not fit the steps and blocks.
    """
    prompts = getattr(loaded, "prompts", None)
    if prompts is None:
        raise ValueError(
            f"Expected a backbone with a text encoder for open-vocabulary naming, but "
            f"{backbone.description} has none (Stable Video Diffusion is conditioned on an image, "
            "the full-size random backbone has no tokenizer). Use the Stable Diffusion backbone for "
            "naming (`StableDiffusion`, or `TinyStableDiffusion` offline), or drop --model.class_names "
            "and use label_mode cluster."
        )
    step = settings.step if settings.step is not None else feature_step
    if step not in steps:
        raise ValueError(
            f"Expected `naming.step` to be a step of the unmodulated pass ({list(steps)}), but got {step}."
        )
    unet = loaded.unet
    layers = {}
    for block in settings.blocks:
        name = backbone.attention_layer(block, "cross")
        try:
            layers[name] = unet.get_submodule(name)
        except AttributeError as e:
            raise ValueError(
                f"Expected `naming.blocks` to be decoder blocks with cross-attention in this backbone, "
                f"but block {block} ({name}) has none. Use blocks 3..8 (or 3..11 for SD 2.1)."
            ) from e
    encoded = prompts.encode(settings.templates, class_names)
    return ClassNamer(layers, encoded, step, settings.normalize)
