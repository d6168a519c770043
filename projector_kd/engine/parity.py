"""Parity of a fast training path with its reference recipe: same loss and gradients, within stated tolerances.

Two checks on one batch with identical weights, against the reference recipe computed eagerly in strict float32
(TF32 off):

- math: the fast path's set-up with autocast and torch.compile off must match to float32 tolerance (memory format,
  fused optimizer, skipped input checks, a different but equivalent module layout: none may change the method);
- precision: the fast path exactly as it runs (compiled; bf16 where it uses it) may deviate at most twice as much as
  low-precision autocast alone moves the reference (the loss also by two bf16 units in the last place), plus the
  float32 tolerance.

Each track's ``parity_pair`` (``deit.benchmark``, ``imagenet.benchmark``) gives both set-ups as :class:`ParitySide`;
:func:`check_parity` computes the four results (reference, reference under the fast path's autocast, fast path, fast
path in float32) and :func:`judge_parity` judges them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

FP32_LOSS_RTOL, FP32_LOSS_ATOL, FP32_GRAD_RTOL = 1e-4, 1e-5, 5e-3
ROUNDING_FACTOR = 2.0
LOW_PRECISION_LOSS_RTOL = 2**-7  # two bf16 units in the last place: one sample's rounding shift can be near 0
Result = tuple[float, dict[str, torch.Tensor]]  # loss, gradients by parameter name


@dataclass
class ParitySide:
    """One set-up of a parity check. ``gradients(images, labels, autocast_dtype)``: loss and gradients of one
    forward/backward on the batch, no update (``autocast_dtype`` None: float32); ``model``: what holds its weights (a
    track or a box); ``autocast_dtype``: the dtype it trains in (None: float32)."""

    model: Any
    gradients: Callable[[torch.Tensor, torch.Tensor, torch.dtype | None], Result]
    autocast_dtype: torch.dtype | None = None


def synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch that benchmarks and parity checks use: N(0, 1) images (B, 3, S, S) and uniform labels, drawn on
    the CPU from a generator seeded with ``seed`` (the same values on every device), then moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


@contextlib.contextmanager
def strict_fp32() -> Any:
    """TF32 off for CUDA matmuls and convolutions inside the block; the previous flags are restored."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def gradient_difference(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``||g_c - g_r|| / ||g_r||`` and the cosine of all gradients concatenated, and the worst tensor's relative
    difference among tensors holding at least 1e-4 of the reference norm (the projector bias, whose gradient is zero
    up to rounding because whitening removes it, is left out that way)."""
    if reference.keys() != candidate.keys():
        raise ValueError(f"gradient sets differ: {sorted(set(reference) ^ set(candidate))[:4]}")
    ref = torch.cat([reference[k].double().flatten().cpu() for k in reference])
    cand = torch.cat([candidate[k].double().flatten().cpu() for k in reference])
    total = ref.norm().item()
    worst_name, worst = "", 0.0
    for name in reference:
        r, c = reference[name].double(), candidate[name].double()
        norm = r.norm().item()
        if norm >= 1e-4 * total and (c - r).norm().item() / norm > worst:
            worst_name, worst = name, (c - r).norm().item() / norm
    return {
        "grad_rel_diff": ((cand - ref).norm() / total).item(),
        "grad_cosine": torch.nn.functional.cosine_similarity(ref, cand, dim=0).item(),
        "worst_tensor": worst_name,
        "worst_tensor_rel_diff": worst,
    }


def judge_parity(
    reference: Result, rounded: Result, fast: Result, fast_fp32: Result, low_dtype: torch.dtype | None
) -> dict[str, Any]:
    """Verdict of the two checks (module docstring) on four ``(loss, gradients)`` results. ``rounded``: the reference
    under the fast path's autocast dtype ``low_dtype`` (the reference itself when the fast path has none, None)."""
    loss_ref = reference[0]
    fp32_loss_tol = FP32_LOSS_ATOL + FP32_LOSS_RTOL * abs(loss_ref)
    math_grads = gradient_difference(reference[1], fast_fp32[1])
    math_ok = abs(fast_fp32[0] - loss_ref) <= fp32_loss_tol and math_grads["grad_rel_diff"] <= FP32_GRAD_RTOL
    rounding = gradient_difference(reference[1], rounded[1])
    actual = gradient_difference(reference[1], fast[1])
    loss_budget = (
        max(ROUNDING_FACTOR * abs(rounded[0] - loss_ref), LOW_PRECISION_LOSS_RTOL * abs(loss_ref) if low_dtype else 0.0)
        + fp32_loss_tol
    )
    grad_budget = ROUNDING_FACTOR * rounding["grad_rel_diff"] + FP32_GRAD_RTOL
    precision_ok = abs(fast[0] - loss_ref) <= loss_budget and actual["grad_rel_diff"] <= grad_budget
    return {
        "ok": bool(math_ok and precision_ok and math.isfinite(fast[0])),
        "fast_dtype": str(low_dtype).removeprefix("torch.") if low_dtype else "float32",
        "loss_reference_fp32": loss_ref,
        "math": {
            "ok": bool(math_ok),
            "loss_fast_fp32": fast_fp32[0],
            "loss_abs_diff": abs(fast_fp32[0] - loss_ref),
            "loss_tolerance": fp32_loss_tol,
            "grad_tolerance": FP32_GRAD_RTOL,
            **math_grads,
        },
        "precision": {
            "ok": bool(precision_ok),
            "loss_fast": fast[0],
            "loss_abs_diff": abs(fast[0] - loss_ref),
            "loss_tolerance": loss_budget,
            "grad_tolerance": grad_budget,
            **actual,
            "reference_rounded": {"loss_abs_diff": abs(rounded[0] - loss_ref), **rounding},
        },
    }


def check_parity(
    reference: ParitySide, fast: ParitySide, batch_size: int, image_size: int, num_classes: int, device: torch.device
) -> dict[str, Any]:
    """Verdict of :func:`judge_parity` for ``fast`` against ``reference`` on one synthetic batch (seed 1). The fast
    set-up runs first as it trains (compiled, in its autocast dtype), so that a compile failure falls back to eager
    there; then both eagerly in strict float32, and the reference in the fast set-up's dtype."""
    images, labels = synthetic_batch(batch_size, image_size, num_classes, device, seed=1)
    low = fast.autocast_dtype
    fast_run = fast.gradients(images, labels, low)
    with strict_fp32(), torch.compiler.set_stance("force_eager"):
        result = reference.gradients(images, labels, None)
        fast_fp32 = fast.gradients(images, labels, None)
    rounded = reference.gradients(images, labels, low) if low else result
    return judge_parity(result, rounded, fast_run, fast_fp32, low)
