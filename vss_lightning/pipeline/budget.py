"""The memory budget behind `speed.max_batch_images: auto`: an estimate of a job's GPU memory beyond the
weights (`MemoryModel`) and the free memory of the device (`free_device_memory`).

The figures are one H100 measurement of SD 2.1-base in float16 at 832x448 (PERF-NOTES); the activation
figure predates the per-layer q/k gathers (`attention.AttentionControl.inject_rows`), which keep less
alive at once, so the estimate errs high. Recalibrate with `torch.cuda.max_memory_allocated` on the
cards a job runs on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .sampler import DEFAULT_MAX_BATCH_IMAGES

log = logging.getLogger(__name__)

GIB, MIB = 2**30, 2**20
# Measured on an H100 with SD 2.1-base in float16 at 832x448 (latent 104x56), B = 14, 3 steps
# (PERF-NOTES.md, "Memory"): the unmodulated pass keeps q/k of 18 decoder attentions, 57 MiB per image
# (CFG branch) per step; the prefix cache takes 0.81 GiB for the batch; gathers and activations of the
# modulated forwards ~9.8 GiB at 56 images per forward. Weights + these = 17.1 GiB, the measured peak.
REFERENCE_LATENT_PIXELS = 104 * 56
QK_BYTES_PER_IMAGE_STEP = 57 * MIB
PREFIX_BYTES_PER_FRAME = 0.81 * GIB / 14
ACTIVATION_BYTES_PER_IMAGE = 9.8 * GIB / 56
# The part of the free memory a budget may plan for: the rest covers the allocator's fragmentation,
# cuDNN/cuBLAS workspaces, the compiled decoder and the model's error.
FREE_MEMORY_FRACTION = 0.9
FREE_MEMORY_RESERVE = 1 * GIB


@dataclass
class MemoryModel:
    """An estimate of a job's GPU memory beyond the weights, for `max_batch_images: auto`.

    Per batch of B frames at a latent of h x w pixels, in the compute dtype (d bytes), scaled from the
    measured 832x448 float16 figures by s = h w / (104 x 56) and d / 2:

        workspace(n) = s (d / 2) [B (2 steps 57 MiB [q/k kept] + 59 MiB [prefix kept]) + n 179 MiB]

    for a budget of n images per forward. It is an estimate, calibrated on one GPU at one size: the
    figures come from one H100 measurement of SD 2.1 (an SVD backbone, whose UNet and attention
    layout differ, is estimated with the same figures) and should be recalibrated on the cards a
    job runs on (`torch.cuda.max_memory_allocated`).

    Attributes:
        frames_per_batch: B, the frames of one batch (`context.batch_size`).
        steps: the steps of the pass (`num_inference_steps - noise_step`).
        dtype_bytes: bytes per element of the compute dtype (2 for float16).
        keeps_qk: the unmodulated pass keeps q/k for injection.
        keeps_prefix: the unmodulated pass keeps the UNet prefix (`speed.reuse_prefix`).
    """

    frames_per_batch: int
    steps: int
    dtype_bytes: int = 2
    keeps_qk: bool = True
    keeps_prefix: bool = True

    def _scale(self, latent_size: tuple[int, int]) -> float:
        return latent_size[0] * latent_size[1] / REFERENCE_LATENT_PIXELS * self.dtype_bytes / 2

    def workspace_bytes(self, max_batch_images: int, latent_size: tuple[int, int]) -> float:
        """Estimated peak bytes beyond the weights for a budget at a latent size (h, w)."""
        per_frame = 0.0
        if self.keeps_qk:
            per_frame += 2 * self.steps * QK_BYTES_PER_IMAGE_STEP  # both CFG branches, every step
        if self.keeps_prefix:
            per_frame += PREFIX_BYTES_PER_FRAME
        stored = self.frames_per_batch * per_frame
        return self._scale(latent_size) * (stored + max_batch_images * ACTIVATION_BYTES_PER_IMAGE)

    @staticmethod
    def ceiling(latent_size: tuple[int, int]) -> int:
        """The largest budget worth having at a latent size: 56 images at 832x448 (a UNet forward's
        time per image is flat from 28 to 56 images there, PERF-NOTES), and the same latent pixels
        per forward for larger frames, as a multiple of 4 (one SD unit: 2 signs x 2 CFG branches)."""
        pixels = latent_size[0] * latent_size[1]
        same_work = DEFAULT_MAX_BATCH_IMAGES * REFERENCE_LATENT_PIXELS / pixels
        return max(4, min(DEFAULT_MAX_BATCH_IMAGES, 4 * math.floor(same_work / 4)))

    def max_batch_images(self, free_bytes: int, latent_size: tuple[int, int]) -> int:
        """The largest budget (2, or a multiple of 4 up to `ceiling`) whose estimated workspace fits in
        `FREE_MEMORY_FRACTION` of `free_bytes` less `FREE_MEMORY_RESERVE`; 2 (with a warning) when
        none does."""
        usable = FREE_MEMORY_FRACTION * free_bytes - FREE_MEMORY_RESERVE
        for budget in range(self.ceiling(latent_size), 3, -4):
            if self.workspace_bytes(budget, latent_size) <= usable:
                return budget
        if self.workspace_bytes(2, latent_size) > usable:
            log.warning(
                "speed.max_batch_images auto: even 2 images per forward are estimated at %.1f GiB at a "
                "%dx%d latent, more than the %.1f GiB the free GPU memory allows; running with 2. Lower "
                "`context.batch_size` (the q/k kept per batch dominate) or the frame size if it runs "
                "out of memory.",
                self.workspace_bytes(2, latent_size) / GIB, *latent_size, max(usable, 0) / GIB,
            )  # fmt: skip
        return 2


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA `device` (`torch.cuda.mem_get_info`), None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(device)[0])
