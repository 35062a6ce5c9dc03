"""Tolerances for comparing two evaluations of the same floating-point computation.

Two runs of the same network that differ only in batch shape, chunking or kernel (the CPU's BLAS and
attention kernels pick their blocking and summation order from the shapes and the instruction set)
agree only up to rounding, amplified by the network. A test that compares them must not pass on one
CPU and fail on another, so its tolerance is stated relative to the reference's scale, in units of
the dtype's machine epsilon times an amplification budget that the test states and justifies:

    max |got - want|  <=  amplification * eps(dtype) * max |want|

Use `torch.equal` (or `rtol=0, atol=0`) only where the result cannot depend on the kernel: integer
work, selection (argmax, top-k, KNN votes on well-separated data), copies, or the same call twice.
"""

from __future__ import annotations

import torch


def assert_equal_up_to_rounding(
    got: torch.Tensor, want: torch.Tensor, amplification: float, what: str = "result"
) -> None:
    """Assert `got` equals `want` up to `amplification` rounding units of their dtype, relative to
    `max |want|` (see the module docstring).

    Args:
        got: the tensor under test.
        want: the reference, same shape.
        amplification: how many units of `eps(dtype)` (relative to the reference's scale) the
            computation may accumulate; each call site says why its number holds.
        what: the quantity's name, for the failure message.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    eps = torch.finfo(want.dtype).eps
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    bound = amplification * eps * scale
    assert err <= bound, (
        f"{what}: max |diff| {err:.3g} exceeds {amplification:.3g} x eps({want.dtype}) x scale {scale:.3g} "
        f"= {bound:.3g} (relative error {err / max(scale, 1e-300):.3g})"
    )
