"""The segmenter's settings, one typed dataclass per stage of the method (docs/method.md).

`VideoSegmenter(backbone, seed, frames, sampling, features, context, refinement, modulation, speed)`
takes one instance of each (the full-resolution step's `ModulationSettings` lives in `modulation.py`).
LightningCLI turns them into nested config keys, e.g. `--model.segmenter.init_args.context.batch_size`,
so `--print_config` lists the settings stage by stage, in the order of the method.

`LABEL_SETTINGS` is the explicit list of the fields that change the labels: only they enter the
settings hash written next to the outputs (`VideoSegmenter.settings`). Everything else is a speed or
memory setting, which a resumed run may change without invalidating finished videos. A new field
must be classified (tests/test_segmenter.py fails for a field in neither list).

`SpeedSettings.compiles_vae_decoder` resolves `compile_vae_decoder: auto` (compile on CUDA);
`budget.MemoryModel` resolves `max_batch_images: auto`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .sampler import ResizeMode, VaeEncode


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")


@dataclass
class FrameSettings:
    """How a frame becomes a latent (docs/method.md sections 0 and 9).

    Attributes:
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
    """

    size_multiple: int = 64
    resize: ResizeMode = "bicubic"
    vae_encode: VaeEncode = "mean"
    vae_dtype: Literal["auto", "float32"] = "auto"

    def __post_init__(self) -> None:
        if self.size_multiple < 16 or self.size_multiple % 16:
            raise ValueError(
                "Expected `frames.size_multiple` to be a positive multiple of 16, but got "
                f"{self.size_multiple}."
            )
        _check_choice("frames.resize", self.resize, ("bicubic", "bilinear"))
        _check_choice("frames.vae_encode", self.vae_encode, ("mean", "sample"))
        _check_choice("frames.vae_dtype", self.vae_dtype, ("auto", "float32"))


@dataclass
class SamplingSettings:
    """The noising and the sampler's schedule (docs/method.md section 0).

    Attributes:
        num_inference_steps: length of the schedule (25).
        noise_step: step index whose noise level the frames are noised to (22, t = 119); the steps
            from it to the end are run.
        guidance_scale: classifier-free guidance scale (5; for SVD the top of its per-frame ramp,
            which starts at the backbone's `settings.min_guidance_scale`).
    """

    num_inference_steps: int = 25
    noise_step: int = 22
    guidance_scale: float = 5.0


@dataclass
class FeatureSettings:
    """Which queries of the unmodulated pass are the features (docs/method.md section 1).

    Attributes:
        step: step whose self-attention queries are the features (24, t = 39).
        blocks: decoder blocks (paper numbering) whose queries are averaged when `aggregate` (6, 7, 8).
        aggregate: average the `blocks` features; else use `single_block`.
        single_block: the feature block without aggregation (7).
    """

    step: int = 24
    blocks: list[int] = field(default_factory=lambda: [6, 7, 8])
    aggregate: bool = True
    single_block: int = 7

    @property
    def used_blocks(self) -> list[int]:
        """The blocks whose queries make the feature."""
        return list(self.blocks) if self.aggregate else [self.single_block]


@dataclass
class ContextSettings:
    """The scene context model: batches, K-Means and the KNN memory (docs/method.md section 2).

    Attributes:
        method: "autoregressive" (K-Means init + KNN memory, the method) or "per_frame_kmeans" (the
            frame-by-frame baseline: K-Means on every frame independently).
        batch_size: B, frames per batch (14).
        num_clusters: K of the K-Means initialisation (20).
        knn_k: neighbours of the KNN classifier (4).
        kmeans_n_init: K-Means restarts (10).
        ignore_index: ground-truth value that means "no class" (255): it does not vote in the
            `first_frame_gt` label mode.
    """

    method: Literal["autoregressive", "per_frame_kmeans"] = "autoregressive"
    batch_size: int = 14
    num_clusters: int = 20
    knn_k: int = 4
    kmeans_n_init: int = 10
    ignore_index: int = 255

    def __post_init__(self) -> None:
        _check_choice("context.method", self.method, ("autoregressive", "per_frame_kmeans"))
        for name in ("batch_size", "num_clusters", "knn_k", "kmeans_n_init"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"Expected `context.{name}` to be at least 1, but got {value}.")


@dataclass
class RefinementSettings:
    """Correspondence-based refinement, CBR (docs/method.md section 3).

    Attributes:
        enabled: run the refinement.
        block: the decoder block whose self-attention queries CBR matches (7).
        weighting: "reference" (a = q / (q + 1)) or "uniform" (a = 1, pure chaining).
        jump_filter: drop tracks that move more than `max_jump` cells: "both" directions,
            "reference" (positive jumps only) or "none".
        max_jump: the largest allowed move per step, in grid cells (1).
    """

    enabled: bool = True
    block: int = 7
    weighting: Literal["reference", "uniform"] = "reference"
    jump_filter: Literal["both", "reference", "none"] = "both"
    max_jump: int = 1

    def __post_init__(self) -> None:
        _check_choice("refinement.weighting", self.weighting, ("reference", "uniform"))
        _check_choice("refinement.jump_filter", self.jump_filter, ("both", "reference", "none"))


DEFAULT_COMPILE_CACHE_DIR = "~/.cache/vss_lightning/torch_compile"


@dataclass
class SpeedSettings:
    """Speed and memory: the same labels, whatever their values (except `vae_tiling`).

    Attributes:
        max_batch_images: most images in one UNet forward (CFG branches count): the memory budget.
            "auto" (the default) picks it per frame size from the GPU memory free when the segmenter
            is loaded and an estimate of the job's peak (`budget.MemoryModel`): the largest multiple of 4 up
            to 56 (fewer for frames larger than 832x448) whose estimate fits, so one config runs on
            24, 80 and 141 GB cards; 56 off CUDA.
        vae_batch_images: most images in one VAE encode/decode; n latents are decoded in
            ceil(n / vae_batch_images) chunks of near-equal size (no padding).
        vae_tiling: decode in overlapping tiles (diffusers `enable_tiling`): less memory for very
            large frames, slightly different pixels at tile seams (so it is part of the settings
            hash). Stable Diffusion only.
        channels_last: run the UNet and VAE in channels-last memory format. Stable Diffusion only
            (SVD's 5-D video weights keep their layout).
        compile_vae_decoder: `torch.compile` the VAE decoder (GPU: about 2x faster decodes after a
            one-off compile of about a minute at the first decode, with batch and spatial sizes
            dynamic, so neither a new chunk size nor a new frame size compiles again). "auto" (the
            default): on a CUDA device, eager elsewhere. The job's frame count is not known when
            the segmenter loads, so the compile is paid once per process whatever the job's length
            (with `compile_cache_dir`, about once per machine); it repays itself after about 120
            frames at 832x448 with K = 20 (PERF-NOTES figures: 11 ms saved per decode, 40 decodes per
            frame). Set false for short GPU jobs.
        compile_cache_dir: where the compiled decoder's Inductor caches (FX graph, AOTAutograd,
            Triton kernels) persist, so a restarted job loads its kernels instead of compiling them
            ("~" is expanded). The environment variable `TORCHINDUCTOR_CACHE_DIR`, when set, wins;
            None leaves torch's default (a per-user folder under the system's temporary directory).
        reuse_prefix: at the first modulated step, reuse the unmodulated pass's UNet computation
            before the modulated layer instead of recomputing it (same labels, about a fifth less
            UNet work). None (the default): on where the family has it (Stable Diffusion), off
            otherwise; true with an SVD backbone is an error.
        kmeans_backend: the K-Means of the context model: "sklearn" (CPU, the reference's), "torch"
            (`torch_kmeans`: the same algorithm and random draws on the features' device, the same
            clusters except at exact distance ties) or "auto" (torch on a CUDA device, so the GPU
            never waits on a host copy; scikit-learn elsewhere).
    """

    max_batch_images: Literal["auto"] | int = "auto"
    vae_batch_images: int = 8
    vae_tiling: bool = False
    channels_last: bool = False
    compile_vae_decoder: Literal["auto"] | bool = "auto"
    compile_cache_dir: str | None = DEFAULT_COMPILE_CACHE_DIR
    reuse_prefix: bool | None = None
    kmeans_backend: Literal["auto", "sklearn", "torch"] = "auto"

    def __post_init__(self) -> None:
        _check_choice("speed.kmeans_backend", self.kmeans_backend, ("auto", "sklearn", "torch"))
        if self.compile_vae_decoder not in (True, False, "auto"):
            raise ValueError(
                "Expected `speed.compile_vae_decoder` to be true, false or 'auto', but got "
                f"{self.compile_vae_decoder!r}."
            )
        budget = self.max_batch_images
        if budget != "auto" and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 2):
            raise ValueError(
                f"Expected `speed.max_batch_images` to be 'auto' or an integer of at least 2, but got "
                f"{budget!r}."
            )
        if self.vae_batch_images < 1:
            raise ValueError(
                f"Expected `speed.vae_batch_images` to be at least 1, but got {self.vae_batch_images}."
            )

    def compiles_vae_decoder(self, device: torch.device) -> bool:
        """Whether the VAE decoder is compiled on `device` ("auto": on CUDA only)."""
        if self.compile_vae_decoder == "auto":
            return torch.device(device).type == "cuda"
        return bool(self.compile_vae_decoder)


# The settings hash: the fields that change the labels, per group ("seed" is the segmenter's own
# argument). Changing this list (or the hash's construction in `VideoSegmenter.settings` and
# `ZeroShotVSS.settings_hash`) invalidates every finished output: do it deliberately.
LABEL_SETTINGS: dict[str, tuple[str, ...]] = {
    "frames": ("size_multiple", "resize", "vae_encode", "vae_dtype"),
    "sampling": ("num_inference_steps", "noise_step", "guidance_scale"),
    "features": ("step", "blocks", "aggregate", "single_block"),
    "context": ("method", "batch_size", "num_clusters", "knn_k", "kmeans_n_init", "ignore_index"),
    "refinement": ("enabled", "block", "weighting", "jump_filter", "max_jump"),
    "modulation": (
        "enabled", "strength", "steps", "block", "attention", "layer_types", "inject",
        "inject_layer_types", "blend", "blend_steps", "mask_filter", "filter_strength", "blur_kernel",
        "blur_sigma",
    ),
    "speed": ("vae_tiling",),  # tiles change pixels at their seams
}  # fmt: skip
