"""The orchestrator: a video in, one label map per frame out (docs/method.md sections 0-4).

`VideoSegmenter` holds settings only (cheap to construct, so LightningCLI can print and parse it);
`load(device)` builds the backbone. `iter_segment` streams a video batch by batch (B frames), each
frame emitted once, memory bounded by one batch whatever the video length; `segment` collects the
labels of a whole video or clip.

The segmenter talks to a diffusion family only through `Backbone` (layer names, `make_sampler`,
`make_modulation`), `Sampler` (`encode`, `condition`, `add_noise`, `unmodulated_pass`) and
`Modulation` (`labels`), so SD and SVD run through the same code.

(Over 400 lines because `VideoSegmenter.__init__` is the CLI's config schema: its ~30 documented,
validated arguments take half the module.)
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .attention import AttentionControl
from .backbone import Backbone, StableDiffusion
from .context import SceneContextModel, linf_normalize, per_frame_kmeans, resize_gt_to_grid
from .modulation import Modulation, ModulationSettings
from .refine import correspondence_refine
from .sampler import LoadedModels, ResizeMode, Sampler, VaeEncode, resize_to_multiple

LabelMode = Literal["cluster", "first_frame_gt"]
PERFORMANCE_SETTINGS = frozenset(
    {"max_batch_images", "vae_batch_images", "channels_last", "compile_vae_decoder", "reuse_prefix"}
)


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
    """

    indices: list[int]
    labels: torch.Tensor
    coarse: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class Segmentation:
    """Result of `VideoSegmenter.segment`.

    Attributes:
        labels: (T, H, W) int64 label maps at the input size (CPU).
        coarse: (T, h, w) int64 refined coarse labels (CPU).
        state: the state to pass with the next clip of the same video.
        seconds: wall-clock seconds per stage.
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

    Args:
        backbone: the diffusion backbone (default: Stable Diffusion 2.1-base from the hub).
        batch_size: B, frames per batch (14).
        num_clusters: K of the K-Means initialisation (20).
        context: "autoregressive" (K-Means init + KNN memory, the method) or "per_frame_kmeans"
            (the frame-by-frame baseline: K-Means on every frame independently).
        knn_k: neighbours of the KNN classifier (4).
        kmeans_n_init: K-Means restarts (10).
        num_inference_steps: length of the schedule (25).
        noise_step: step index whose noise level the frames are noised to (22, t = 119).
        feature_step: step whose queries are the features (24, t = 39).
        guidance_scale: classifier-free guidance scale (5; for SVD the top of its per-frame ramp).
        feature_blocks: decoder blocks (paper numbering) whose self-attention queries are averaged
            when `aggregate_features` (6, 7, 8).
        aggregate_features: average the `feature_blocks` features; else use `single_feature_block`.
        single_feature_block: the feature block without aggregation (7).
        cbr: run correspondence-based refinement.
        cbr_block: the block whose features CBR matches (7).
        cbr_weighting: "reference" (a = q / (q + 1)) or "uniform" (a = 1, pure chaining).
        jump_filter: drop tracks that move more than `max_jump` cells: "both" directions,
            "reference" (positive jumps only) or "none".
        max_jump: the largest allowed move per step, in grid cells (1).
        modulation: full-resolution step settings (default: `ModulationSettings()`).
        max_batch_images: most images in one UNet forward (CFG branches count): the memory budget.
        vae_batch_images: most images in one VAE encode/decode.
        vae_tiling: decode in overlapping tiles (diffusers `enable_tiling`): less memory for very
            large frames, slightly different pixels at tile seams.
        channels_last: run the UNet and VAE in channels-last memory format.
        compile_vae_decoder: `torch.compile` the VAE decoder (GPU: about 2x faster decodes after
            a one-off compile of about a minute; decode chunks are padded to one shape).
        seed: global seed (the noise of a batch is seeded from it, the video key and batch start).
        size_multiple: frames are resized so height and width are floored to multiples of this (64:
            the latent is 1/8 and the feature grid 1/16 of the frame, both integral).
        resize: how frames are resized to those multiples: "bicubic" (antialiased, on the uint8
            values, rounded back to uint8 as PIL's default resize, which the reference uses) or
            "bilinear" (antialiased, on the [-1, 1] floats).
        vae_encode: latent of a frame: the VAE posterior "mean" (deterministic) or a posterior
            "sample" (as the reference), seeded from `seed`, the video key and the batch start.
        vae_dtype: "auto" runs the VAE in the backbone's dtype; "float32" keeps it in float32 when
            the backbone computes in float16/bfloat16 (more memory and time for the decodes, no fp16
            rounding in the images the difference maps are taken from).
        ignore_index: ground-truth value that means "no class" (255).
    """

    def __init__(
        self,
        backbone: Backbone | None = None,
        batch_size: int = 14,
        num_clusters: int = 20,
        context: Literal["autoregressive", "per_frame_kmeans"] = "autoregressive",
        knn_k: int = 4,
        kmeans_n_init: int = 10,
        num_inference_steps: int = 25,
        noise_step: int = 22,
        feature_step: int = 24,
        guidance_scale: float = 5.0,
        feature_blocks: tuple[int, ...] = (6, 7, 8),
        aggregate_features: bool = True,
        single_feature_block: int = 7,
        cbr: bool = True,
        cbr_block: int = 7,
        cbr_weighting: Literal["reference", "uniform"] = "reference",
        jump_filter: Literal["both", "reference", "none"] = "both",
        max_jump: int = 1,
        modulation: ModulationSettings | None = None,
        max_batch_images: int = 56,
        vae_batch_images: int = 8,
        vae_tiling: bool = False,
        channels_last: bool = False,
        compile_vae_decoder: bool = False,
        seed: int = 0,
        size_multiple: int = 64,
        resize: ResizeMode = "bicubic",
        vae_encode: VaeEncode = "mean",
        vae_dtype: Literal["auto", "float32"] = "auto",
        ignore_index: int = 255,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` to be at least 1, but got {batch_size}.")
        if num_clusters < 1:
            raise ValueError(f"Expected `num_clusters` to be at least 1, but got {num_clusters}.")
        if not 0 <= noise_step <= feature_step < num_inference_steps:
            raise ValueError(
                "Expected 0 <= `noise_step` <= `feature_step` < `num_inference_steps`, but got "
                f"{noise_step}, {feature_step}, {num_inference_steps}."
            )
        self.backbone = backbone if backbone is not None else StableDiffusion()
        self.batch_size = batch_size
        self.num_clusters = num_clusters
        self.context = context
        self.knn_k = knn_k
        self.kmeans_n_init = kmeans_n_init
        self.num_inference_steps = num_inference_steps
        self.noise_step = noise_step
        self.feature_step = feature_step
        self.guidance_scale = guidance_scale
        self.feature_blocks = tuple(feature_blocks)
        self.aggregate_features = aggregate_features
        self.single_feature_block = single_feature_block
        self.cbr = cbr
        self.cbr_block = cbr_block
        self.cbr_weighting = cbr_weighting
        self.jump_filter = jump_filter
        self.max_jump = max_jump
        self.modulation = modulation if modulation is not None else ModulationSettings()
        self.max_batch_images = max_batch_images
        self.vae_batch_images = vae_batch_images
        self.vae_tiling = vae_tiling
        self.channels_last = channels_last
        self.compile_vae_decoder = compile_vae_decoder
        self.seed = seed
        if size_multiple < 16 or size_multiple % 16:
            raise ValueError(
                f"Expected `size_multiple` to be a positive multiple of 16, but got {size_multiple}."
            )
        self.size_multiple = size_multiple
        for name, value, allowed in (
            ("resize", resize, ("bicubic", "bilinear")),
            ("vae_encode", vae_encode, ("mean", "sample")),
            ("vae_dtype", vae_dtype, ("auto", "float32")),
        ):
            if value not in allowed:
                raise ValueError(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")
        self.resize = resize
        self.vae_encode = vae_encode
        self.vae_dtype = vae_dtype
        self.ignore_index = ignore_index
        blocks = self.feature_blocks if aggregate_features else (single_feature_block,)
        self.feature_layers = [self.backbone.attention_layer(b, "self") for b in blocks]
        self.cbr_layer = self.backbone.attention_layer(cbr_block, "self")
        self._loaded: LoadedModels | None = None
        self._sampler: Sampler | None = None
        self._modulation: Modulation | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def load(self, device: torch.device | str = "cpu") -> VideoSegmenter:
        """Load the backbone on `device` (the heavy part); returns self."""
        self._loaded = self.backbone.load(device)
        vae, unet = self._loaded.vae, self._loaded.unet
        if self.vae_dtype == "float32" and self._loaded.vae_dtype != torch.float32:
            vae.float()  # (not `.to(dtype)`, which makes diffusers log a warning)
        if self.vae_tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        if self.channels_last:  # modules with 5-D (video) weights keep their layout
            for module in (unet, vae):
                if all(p.dim() <= 4 for p in module.parameters()):
                    module.to(memory_format=torch.channels_last)
        if self.compile_vae_decoder:
            vae.decoder = torch.compile(vae.decoder)
        self._sampler = self.backbone.make_sampler(
            self._loaded,
            self.modulation,
            num_inference_steps=self.num_inference_steps,
            start_step=self.noise_step,
            guidance_scale=self.guidance_scale,
            max_batch_images=self.max_batch_images,
            vae_batch_images=self.vae_batch_images,
        )
        self._modulation = self.backbone.make_modulation(self.modulation, self._sampler)
        return self

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
        """Every setting that changes the labels (for hashing outputs).

        Speed and memory settings (`PERFORMANCE_SETTINGS`) are left out: changing them between a
        run and its resume does not invalidate finished videos.
        """
        d = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "backbone" and k not in PERFORMANCE_SETTINGS
        }
        d["modulation"] = {k: v for k, v in vars(self.modulation).items() if k not in PERFORMANCE_SETTINGS}
        d["backbone"] = self.backbone.description
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
    ) -> Iterator[BatchLabels]:
        """Segment a video batch by batch, yielding each frame's labels once.

        Args:
            frames: (T, 3, H, W) uint8 RGB frames (any device).
            first_frame_gt: (H, W) int ground truth of frame 0 for the `first_frame_gt` label mode
                (labels are then class ids); None for `cluster` mode (labels are cluster ids).
            state: the state returned for the previous clip of the same video, or None.
            key: identifies the video/clip for seeding (e.g. "<video_id>:<frame_offset>"), so a
                video's labels do not depend on where or when it is processed.
            seconds: if given, wall-clock seconds per stage are added to it.

        Yields:
            `BatchLabels` in frame order; a state update is written into `state` if given.
        """
        self._require_loaded()
        self._validate(frames, first_frame_gt)
        sm, dev = self._sampler, self.device
        seconds = seconds if seconds is not None else {}
        mode = "first_frame_gt" if first_frame_gt is not None else "cluster"
        ctx = SceneContextModel(
            num_clusters=self.num_clusters,
            knn_k=self.knn_k,
            kmeans_n_init=self.kmeans_n_init,
            seed=self.seed,
            mode=mode,
            ignore_index=self.ignore_index,
        )
        if state is not None and state.context:
            ctx.load_state_dict(state.context)
        t_total, (h_in, w_in) = frames.shape[0], frames.shape[-2:]
        emitted = 0
        control = AttentionControl()

        def tick(stage: str, t0: float) -> float:
            if dev.type == "cuda":  # stage times need the queued kernels finished
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            seconds[stage] = seconds.get(stage, 0.0) + now - t0
            return now

        for start in batch_starts(t_total, self.batch_size):
            t0 = time.perf_counter()
            end = min(start + self.batch_size, t_total)
            # (B, 3, H', W') in [-1, 1]
            x = resize_to_multiple(frames[start:end].to(dev), self.size_multiple, self.resize)
            size = tuple(x.shape[-2:])
            posterior = None
            if self.vae_encode == "sample":
                posterior = torch.Generator().manual_seed(noise_seed(self.seed, key, start, "vae"))
            z0 = sm.encode(x, posterior)
            cond = sm.condition(x)
            gen = torch.Generator().manual_seed(noise_seed(self.seed, key, start))
            noise = torch.randn(z0.shape, generator=gen, dtype=torch.float32)
            zt = sm.add_noise(z0.float(), noise.to(dev))
            t0 = tick("encode", t0)
            # what the pass keeps for the modulation (q/k, a UNet prefix) the family set up in `load`
            record = sm.unmodulated_pass(
                zt, cond, control, self.feature_layers + [self.cbr_layer], self.feature_step
            )
            feats, cbr_feats = self._features(record, size)
            grid = tuple(feats.shape[1:3])
            t0 = tick("features", t0)
            if self.context == "per_frame_kmeans":
                coarse = per_frame_kmeans(feats, self.num_clusters, self.kmeans_n_init, self.seed)
            else:
                if not ctx.initialised:
                    gt = None
                    if first_frame_gt is not None:
                        gt = resize_gt_to_grid(first_frame_gt.to(dev).long(), grid)
                    ctx.initialise(feats, gt)
                coarse = ctx.predict(feats)
            t0 = tick("context", t0)
            if self.cbr:
                coarse = correspondence_refine(
                    cbr_feats,
                    coarse,
                    weighting=self.cbr_weighting,
                    jump_filter=self.jump_filter,
                    max_jump=self.max_jump,
                )
            if self.context != "per_frame_kmeans":
                ctx.update(feats, coarse)
            t0 = tick("cbr", t0)
            # (B, H, W): the argmax is taken at the frames' own size
            full = self._modulation.labels(record, coarse, size, (h_in, w_in))
            del record
            t0 = tick("modulation", t0)
            new = max(emitted, start) - start
            # the "resize" stage (kept for logs and benchmarks) is now only the copy of the labels
            # to the CPU: the resize to the frames' size happens inside the modulation's argmax
            labels, coarse_out = full[new:].cpu(), coarse[new:].cpu()
            tick("resize", t0)
            yield BatchLabels(
                indices=list(range(start + new, end)), labels=labels, coarse=coarse_out, features=feats[new:]
            )
            emitted = end
        if state is not None:
            state.context = ctx.state_dict() if self.context != "per_frame_kmeans" else {}

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
