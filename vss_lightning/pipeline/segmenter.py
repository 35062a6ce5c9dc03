"""The orchestrator: a video in, one label map per frame out (docs/method.md sections 0-4).

`VideoSegmenter` holds settings only (cheap to construct, so LightningCLI can print and parse it);
`load(device)` builds the backbone. `iter_segment` streams a video batch by batch (B frames), each
frame emitted once, memory bounded by one batch whatever the video length; `segment` collects the
labels of a whole video or clip.

The segmenter talks to a diffusion family only through `Backbone` (layer names, `make_sampler`,
`make_modulation`), `Sampler` (`encode`, `condition`, `add_noise`, `unmodulated_pass`) and
`Modulation` (`labels`), so SD and SVD run through the same code.

The settings are typed dataclasses, one per stage of the method (`settings.py`); the CLI's config
schema is `VideoSegmenter.__init__` and those dataclasses. With `enable_naming`, each batch also
carries class score maps for open-vocabulary naming (`naming.py`, from queries the pass keeps).

(Longer than 400 lines because the one loop of the method, `iter_segment`, and the settings hash it
is bound to belong together; every stage's algorithm lives in its own module.)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .attention import AttentionControl
from .backbone import Backbone, StableDiffusion
from .budget import MemoryModel, free_device_memory
from .clock import StageClock
from .context import CONTEXT_CLOCKS, SceneContextModel, linf_normalize, per_frame_kmeans, resize_gt_to_grid
from .modulation import Modulation, ModulationSettings
from .naming import ClassNamer, NamingSettings, build_namer
from .refine import correspondence_refine
from .sampler import (
    LoadedModels,
    Sampler,
    compile_decoder,
    resize_to_multiple,
    use_compile_cache_dir,
)
from .settings import (
    LABEL_SETTINGS,
    ContextSettings,
    FeatureSettings,
    FrameSettings,
    RefinementSettings,
    SamplingSettings,
    SpeedSettings,
)


def _canonical(value: Any, annotation: Any) -> Any:
    """A setting's value as the settings hash sees it: a float field's int as a float (5 -> 5.0),
    a tuple as a list, so equal settings hash alike however they were written."""
    if annotation in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass
class VideoState:
    """What carries over from one clip of a video to the next (the context model's memory)."""

    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchLabels:
    """Labels of the frames a batch emits.

    Attributes:
        indices: indices (in the input) of the emitted frames.
        labels: (n, H, W) int64 labels at the input frames' size, on the CPU.
        coarse: (n, h, w) int64 refined coarse labels at the feature grid, on the CPU.
        features: (n, h, w, C) the aggregated, L-inf-normalised features of the emitted frames, on
            the pipeline's device (a view of the batch's features, for the label prototypes of a
            corpus vocabulary; reduce them before the next batch).
        class_scores: (n, h, w, classes) class score maps of the emitted frames at the feature grid
            (open-vocabulary naming, `enable_naming`), on the pipeline's device; None without naming.
    """

    indices: list[int]
    labels: torch.Tensor
    coarse: torch.Tensor
    features: torch.Tensor | None = None
    class_scores: torch.Tensor | None = None


@dataclass
class Segmentation:
    """Result of `VideoSegmenter.segment`.

    Attributes:
        labels: (T, H, W) int64 label maps at the input size (CPU).
        coarse: (T, h, w) int64 refined coarse labels (CPU).
        state: the state to pass with the next clip of the same video.
        seconds: wall-clock seconds per stage (`VideoSegmenter.iter_segment`).
    """

    labels: torch.Tensor
    coarse: torch.Tensor
    state: VideoState
    seconds: dict[str, float]


def batch_starts(num_frames: int, batch_size: int) -> list[int]:
    """Start indices of the batches: consecutive, the last one is the last B frames (may overlap)."""
    if num_frames <= batch_size:
        return [0]
    starts = list(range(0, num_frames, batch_size))
    starts[-1] = num_frames - batch_size
    return starts


def noise_seed(seed: int, key: str, start: int, stream: str = "") -> int:
    """A 63-bit seed from the global seed, the video key and the batch start (rank independent).

    `stream` names an independent random stream of the same batch (e.g. "vae" for the posterior
    sample of `vae_encode="sample"`); the default "" is the noising noise.
    """
    text = f"{seed}\x00{key}\x00{start}" + (f"\x00{stream}" if stream else "")
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class VideoSegmenter:
    """Zero-shot video semantic segmentation with a diffusion backbone (SD 2.1 or SVD).

    The settings are grouped by stage of the method (`settings.py`, docs/method.md); each group
    defaults to the paper's values for Stable Diffusion 2.1.

    Args:
        backbone: the diffusion backbone (default: Stable Diffusion 2.1-base from the hub).
        seed: global seed: the noise of a batch, the VAE posterior sample of `frames.vae_encode:
            sample` and the K-Means initialisation are seeded from it (with the video key and the
            batch start where it applies).
        frames: frame resize and VAE encoding (default: `FrameSettings()`).
        sampling: schedule, noising step and guidance (default: `SamplingSettings()`).
        features: the step and decoder blocks of the features (default: `FeatureSettings()`).
        context: batches, K-Means and KNN memory (default: `ContextSettings()`).
        refinement: correspondence-based refinement (default: `RefinementSettings()`).
        modulation: the full-resolution step (default: `ModulationSettings()`).
        speed: memory budget and speed-ups (default: `SpeedSettings()`).

    Raises:
        ValueError: for inconsistent steps, or a setting the backbone's family ignores
            (`Backbone.check_settings`).
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        seed: int = 0,
        frames: FrameSettings | None = None,
        sampling: SamplingSettings | None = None,
        features: FeatureSettings | None = None,
        context: ContextSettings | None = None,
        refinement: RefinementSettings | None = None,
        modulation: ModulationSettings | None = None,
        speed: SpeedSettings | None = None,
    ) -> None:
        self.backbone = backbone if backbone is not None else StableDiffusion()
        self.seed = seed
        self.frames = frames if frames is not None else FrameSettings()
        self.sampling = sampling if sampling is not None else SamplingSettings()
        self.features = features if features is not None else FeatureSettings()
        self.context = context if context is not None else ContextSettings()
        self.refinement = refinement if refinement is not None else RefinementSettings()
        self.modulation = modulation if modulation is not None else ModulationSettings()
        self.speed = speed if speed is not None else SpeedSettings()
        s = self.sampling
        if not 0 <= s.noise_step <= self.features.step < s.num_inference_steps:
            raise ValueError(
                "Expected 0 <= `sampling.noise_step` <= `features.step` < `sampling.num_inference_steps`, "
                f"but got {s.noise_step}, {self.features.step}, {s.num_inference_steps}."
            )
        self.backbone.check_settings(self.modulation, self.speed)
        self.feature_layers = [self.backbone.attention_layer(b, "self") for b in self.features.used_blocks]
        self.cbr_layer = self.backbone.attention_layer(self.refinement.block, "self")
        self._loaded: LoadedModels | None = None
        self._sampler: Sampler | None = None
        self._modulation: Modulation | None = None
        self._namer: ClassNamer | None = None
        self._naming_key: tuple | None = None
        # `max_batch_images: auto` on CUDA: the memory model, the free bytes at load, the latent size
        # the sampler's budget was last fitted to
        self._memory: tuple[MemoryModel, int] | None = None
        self._budget_size: tuple[int, int] | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def load(self, device: torch.device | str = "cpu") -> VideoSegmenter:
        """Load the backbone on `device` (the heavy part); returns self.

        Resolves the "auto" speed settings for the device: the VAE decoder is compiled on CUDA (lazily,
        at its first decode; `compile_decoder`), and with `max_batch_images: auto` the GPU memory
        free now, with the weights loaded, is read for the budget each frame size gets
        (`MemoryModel`; 56 off CUDA).
        """
        self._loaded = self.backbone.load(device)
        vae, unet = self._loaded.vae, self._loaded.unet
        speed = self.speed
        if self.frames.vae_dtype == "float32" and self._loaded.vae_dtype != torch.float32:
            vae.float()  # (not `.to(dtype)`, which makes diffusers log a warning)
        if speed.vae_tiling:
            vae.enable_tiling()
        if speed.channels_last:  # modules with 5-D (video) weights keep their layout
            for module in (unet, vae):
                if all(p.dim() <= 4 for p in module.parameters()):
                    module.to(memory_format=torch.channels_last)
        if speed.compiles_vae_decoder(self._loaded.device):
            use_compile_cache_dir(speed.compile_cache_dir)
            vae.decoder = compile_decoder(vae.decoder)
        free = free_device_memory(self._loaded.device) if speed.max_batch_images == "auto" else None
        self._sampler = self.backbone.make_sampler(
            self._loaded,
            self.modulation,
            speed,  # the sampler reads `max_batch_images: auto` as its default until `_fit_budget`
            num_inference_steps=self.sampling.num_inference_steps,
            start_step=self.sampling.noise_step,
            guidance_scale=self.sampling.guidance_scale,
        )
        self._modulation = self.backbone.make_modulation(self.modulation, self._sampler)
        self._memory, self._budget_size = None, None
        if free is not None:
            sm = self._sampler
            model = MemoryModel(
                frames_per_batch=self.context.batch_size,
                steps=len(sm.steps),
                dtype_bytes=self._loaded.dtype.itemsize,
                keeps_qk=bool(sm.qk_layers),
                keeps_prefix=sm.prefix_layer is not None,
            )
            self._memory = (model, free)
        return self

    def _fit_budget(self, latent_size: tuple[int, int]) -> None:
        """With `max_batch_images: auto` on CUDA, set the sampler's budget for this latent size (once
        per size: a budget lowered meanwhile, e.g. by the OOM retry, stays until the size changes)."""
        if self._memory is None or latent_size == self._budget_size:
            return
        model, free = self._memory
        self._sampler.max_batch_images = model.max_batch_images(free, latent_size)
        self._budget_size = latent_size

    def enable_naming(self, class_names: list[str] | None, settings: NamingSettings | None = None) -> None:
        """Score every frame's feature-grid cells for `class_names` from the cross-attention queries
        of the unmodulated pass (`naming.py`; the scores come with each `BatchLabels`); None turns it
        off. The prompts are encoded once: enabling the same names and settings again costs nothing.

        Raises:
            ValueError: if the backbone has no text encoder (e.g. SVD, which is image conditioned),
                or a naming setting does not fit the method's steps and blocks.
        """
        if class_names is None:
            self._namer, self._naming_key = None, None
            return
        self._require_loaded()
        settings = settings if settings is not None else NamingSettings()
        key = (tuple(class_names), repr(settings))
        if self._naming_key == key:
            return
        self._namer = build_namer(
            self._loaded, self.backbone, class_names, settings, self.features.step, self._sampler.steps
        )
        self._naming_key = key

    @property
    def naming(self) -> ClassNamer | None:
        """The class namer `enable_naming` set up, or None."""
        return self._namer

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def device(self) -> torch.device:
        self._require_loaded()
        return self._loaded.device

    @property
    def sampler(self) -> Sampler:
        self._require_loaded()
        return self._sampler

    def _require_loaded(self) -> None:
        if self._loaded is None:
            raise RuntimeError("Expected the segmenter to be loaded, but `load(device)` was not called.")

    def settings(self) -> dict[str, Any]:
        """The settings that change the labels, for the settings hash of the outputs.

        Exactly the fields `LABEL_SETTINGS` lists, per group, plus `seed` and the backbone's
        description; speed and memory settings are left out, so changing them between a run and its
        resume does not invalidate finished videos, and neither does a new attribute or a refactor.
        (Built from this explicit list since issue #14; the hash of every earlier output changed
        then, deliberately. tests/test_module.py pins the hash of the default settings.)
        """
        d: dict[str, Any] = {"backbone": self.backbone.description, "seed": int(self.seed)}
        for group, names in LABEL_SETTINGS.items():
            settings = getattr(self, group)
            types = {f.name: f.type for f in fields(settings)}
            d[group] = {name: _canonical(getattr(settings, name), types[name]) for name in names}
        return d

    # -- the method -----------------------------------------------------------------------------
    def _validate(self, frames: torch.Tensor, first_frame_gt: torch.Tensor | None) -> None:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 4:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"Expected `frames` to be a (T, 3, H, W) uint8 tensor, but got {shape}.")
        if frames.shape[0] == 0:
            raise ValueError("Expected `frames` to hold at least one frame, but the video is empty.")
        if frames.shape[1] != 3:
            raise ValueError(
                f"Expected `frames` to be RGB with 3 channels (T, 3, H, W), but got {frames.shape[1]} "
                f"channels (shape {tuple(frames.shape)}). Convert grey or RGBA frames to RGB."
            )
        if frames.dtype != torch.uint8:
            raise ValueError(f"Expected `frames` to be uint8 in [0, 255], but got {frames.dtype}.")
        if first_frame_gt is not None and tuple(first_frame_gt.shape) != tuple(frames.shape[-2:]):
            raise ValueError(
                f"Expected `first_frame_gt` to be (H, W) = {tuple(frames.shape[-2:])} like the frames, "
                f"but got {tuple(first_frame_gt.shape)}."
            )

    def _features(self, record, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregated L-inf-normalised features and CBR features, both (B, h, w, C)."""
        tokens = record.features[self.feature_layers[0]].shape[1]
        factor = round(math.sqrt(size[0] * size[1] / tokens))  # 16 for SD's 1/16 decoder level
        grid = (size[0] // factor, size[1] // factor)
        if grid[0] * grid[1] != tokens:
            raise ValueError(f"Expected the feature layer's {tokens} tokens to tile the {size} frame.")

        def to_grid(q: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, h, w, C)
            return q.float().unflatten(1, grid)

        feats = torch.stack([to_grid(record.features[n]) for n in self.feature_layers]).mean(0)
        cbr = to_grid(record.features[self.cbr_layer]) if self.cbr_layer in record.features else feats
        return linf_normalize(feats), cbr

    @torch.no_grad()
    def iter_segment(
        self,
        frames: torch.Tensor,
        first_frame_gt: torch.Tensor | None = None,
        state: VideoState | None = None,
        key: str = "",
        seconds: dict[str, float] | None = None,
        context_frames: int = 0,
    ) -> Iterator[BatchLabels]:
        """Segment a video batch by batch, yielding each frame's labels once.

        Args:
            frames: (T, 3, H, W) uint8 RGB frames (any device).
            first_frame_gt: (H, W) int ground truth of frame 0 for the `first_frame_gt` label mode
                (labels are then class ids); None for `cluster` mode (labels are cluster ids).
            state: the state returned for the previous clip of the same video, or None.
            key: identifies the video/clip for seeding (e.g. "<video_id>:<frame_offset>"), so a
                video's labels do not depend on where or when it is processed.
            seconds: if given, wall-clock seconds per stage are added to it ("encode", "features",
                "naming", "context", "cbr", "modulation", "resize"), and of parts of a stage: of
                "context", `CONTEXT_CLOCKS` ("context_kmeans": the K-Means initialisation, or the
                per-frame K-Means; "context_knn": the KNN labels), which "context" includes (it stays
                the stage's total); of "modulation", `MODULATION_CLOCKS`. On CUDA each reading
                synchronises the device. None: no clocks and no synchronisation.
            context_frames: the first frames are context only (e.g. a ground-truth anchor whose
                labels are out already): they take part in clustering and memory but are neither
                modulated nor yielded.

        Yields:
            `BatchLabels` in frame order; a state update is written into `state` if given.
        """
        self._require_loaded()
        self._validate(frames, first_frame_gt)
        sm, dev = self._sampler, self.device
        mode = "first_frame_gt" if first_frame_gt is not None else "cluster"
        c, fr = self.context, self.frames
        per_frame = c.method == "per_frame_kmeans"
        ctx = SceneContextModel(
            num_clusters=c.num_clusters,
            knn_k=c.knn_k,
            kmeans_n_init=c.kmeans_n_init,
            seed=self.seed,
            mode=mode,
            ignore_index=c.ignore_index,
            kmeans_backend=self.speed.kmeans_backend,
        )
        if state is not None and state.context:
            ctx.load_state_dict(state.context)
        t_total, (h_in, w_in) = frames.shape[0], frames.shape[-2:]
        if not 0 <= context_frames < t_total:
            raise ValueError(f"Expected `context_frames` in [0, {t_total}), but got {context_frames}.")
        emitted = context_frames
        control = AttentionControl()

        clock = StageClock(seconds, dev)
        for start in batch_starts(t_total, c.batch_size):
            clock.restart()  # the consumer's time between batches counts for no stage
            end = min(start + c.batch_size, t_total)
            # (B, 3, H', W') in [-1, 1]
            x = resize_to_multiple(frames[start:end].to(dev), fr.size_multiple, fr.resize)
            size = tuple(x.shape[-2:])
            scale = self._loaded.vae_scale_factor
            self._fit_budget((size[0] // scale, size[1] // scale))
            posterior = None
            if fr.vae_encode == "sample":
                posterior = torch.Generator().manual_seed(noise_seed(self.seed, key, start, "vae"))
            z0 = sm.encode(x, posterior)
            cond = sm.condition(x)
            gen = torch.Generator().manual_seed(noise_seed(self.seed, key, start))
            noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32)
            zt = sm.add_noise(z0.float(), noise.to(dev))
            clock.lap("encode")
            # what the pass keeps for the modulation (q/k, a UNet prefix) the family set up in `load`
            namer = self._namer
            captures = {namer.step: namer.layer_names} if namer is not None else None
            record = sm.unmodulated_pass(
                zt, cond, control, self.feature_layers + [self.cbr_layer], self.features.step, captures
            )
            feats, cbr_feats = self._features(record, size)
            grid = tuple(feats.shape[1:3])
            clock.lap("features")
            scores = None
            if namer is not None:  # matrix products on the stored queries, no UNet pass
                scores = namer.scores(record.captured.pop(namer.step), grid)
                clock.lap("naming")
            kmeans_clock, knn_clock = CONTEXT_CLOCKS
            if per_frame:
                coarse = per_frame_kmeans(
                    feats, c.num_clusters, c.kmeans_n_init, self.seed, self.speed.kmeans_backend
                )
                context = clock.lap(kmeans_clock)
            else:
                context = 0.0
                if not ctx.initialised:
                    gt = None
                    if first_frame_gt is not None:
                        gt = resize_gt_to_grid(first_frame_gt.to(dev).long(), grid)
                    ctx.initialise(feats, gt)
                    context = clock.lap(kmeans_clock)
                coarse = ctx.predict(feats)
                context += clock.lap(knn_clock)
            clock.add("context", context)  # the whole stage: its parts' sum, no second reading
            r = self.refinement
            if r.enabled:
                coarse = correspondence_refine(
                    cbr_feats, coarse, weighting=r.weighting, jump_filter=r.jump_filter, max_jump=r.max_jump
                )
            if not per_frame:
                ctx.update(feats, coarse)
            clock.lap("cbr")
            # Frames before `new` were emitted by the previous batch (the overlapping last batch) or
            # are context only (`context_frames`): they are not modulated or decoded again.
            new = max(emitted, start) - start
            # (B - new, H, W): the argmax is taken at the frames' own size
            # `modulation` is the whole stage; `labels` adds its parts (`modulation.MODULATION_CLOCKS`)
            full = self._modulation.labels(record, coarse, size, (h_in, w_in), first=new, clocks=seconds)
            del record
            clock.lap("modulation")
            # the "resize" stage (kept for logs and benchmarks) is now only the copy of the labels
            # to the CPU: the resize to the frames' size happens inside the modulation's argmax
            labels, coarse_out = full.cpu(), coarse[new:].cpu()
            clock.lap("resize")
            yield BatchLabels(
                indices=list(range(start + new, end)),
                labels=labels,
                coarse=coarse_out,
                features=feats[new:],
                class_scores=scores[new:] if scores is not None else None,
            )
            emitted = end
        if state is not None:
            state.context = ctx.state_dict() if not per_frame else {}

    def segment(
        self,
        frames: torch.Tensor,
        first_frame_gt: torch.Tensor | None = None,
        state: VideoState | None = None,
        key: str = "",
    ) -> Segmentation:
        """Segment a whole video (or clip); see `iter_segment` for the arguments."""
        state = state if state is not None else VideoState()
        seconds: dict[str, float] = {}
        t, h, w = frames.shape[0], frames.shape[-2], frames.shape[-1]
        labels = torch.empty((t, h, w), dtype=torch.long)
        coarse_parts = []
        for out in self.iter_segment(frames, first_frame_gt, state, key, seconds):
            labels[out.indices] = out.labels
            coarse_parts.append(out.coarse)
        return Segmentation(labels=labels, coarse=torch.cat(coarse_parts), state=state, seconds=seconds)
