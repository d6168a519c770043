"""Benchmark and parity helpers of the DeiT track: its training step with random networks, and the check that the
fast path computes the release recipe's loss and gradients (:mod:`projector_kd.engine.parity`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from projector_kd.engine.distributed import DistEnv, seed_everything
from projector_kd.engine.errors import UserError
from projector_kd.engine.parity import Result, judge_parity, strict_fp32, synthetic_batch

from .engine import Trainer


def build_train_step(
    recipe: str = "release",
    model: str = "tiny",
    batch_size: int = 256,
    img_size: int | None = None,
    device: str | torch.device = "cuda",
    teacher: str = "regnety_160",
    num_classes: int = 1000,
    **model_overrides: Any,
) -> tuple[Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], Trainer]:
    """One training step of the DeiT recipe for benchmarks, with randomly initialised networks.

    ``recipe``: ``'release'`` (fp16 autocast + GradScaler on CUDA, eager, foreach AdamW) or ``'fast'`` (bf16,
    channels_last, torch.compile, fused AdamW). Returns ``(step, trainer)``; ``step(images, labels)`` takes a batch
    (uint8 or float images (B, 3, S, S) and int labels, on any device) and returns the loss terms (0-dim tensors on
    the device; the fast step reads nothing to the host).
    ``trainer.teacher_forward`` times teacher inference alone. ``model_overrides`` set ``model.*`` keys.
    """
    import timm

    from .config import load_config
    from .models import build_student

    if recipe not in ("release", "fast"):
        raise UserError(f"recipe must be 'release' or 'fast', got {recipe!r}")
    cfg = load_config(
        model,
        flags={
            "fast": recipe == "fast",
            "data.batch_size": batch_size,
            "model.img_size": img_size,
            "teacher.name": teacher,
            "model.num_classes": num_classes,
            **{f"model.{k}": v for k, v in model_overrides.items()},
        },
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    teacher_net = timm.create_model(cfg["teacher"]["name"], num_classes=num_classes, pretrained=False).eval()
    for param in teacher_net.parameters():
        param.requires_grad_(False)
    student = build_student(cfg, teacher_dim=teacher_net.num_features)
    trainer = Trainer(cfg, env, student, teacher_net, steps_per_epoch=1000)
    return trainer.train_step, trainer


def deit_gradients(
    trainer: Any, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None
) -> Result:
    """Loss and student gradients of one forward/backward (no optimizer step, no loss scaling) on ``trainer`` with
    ``autocast_dtype`` (None: float32); mixup/cutmix seeded identically every call."""
    saved = trainer.autocast_dtype
    trainer.autocast_dtype = autocast_dtype
    try:
        seed_everything(0)
        x, y = trainer.prepare_batch(images.clone(), labels)  # mixup mixes a batch in place
        loss = sum(trainer.compute_terms(x, y).values())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        trainer.autocast_dtype = saved
    return loss.item(), {
        n: p.grad.detach().float() for n, p in trainer.student.named_parameters() if p.grad is not None
    }


def deit_parity_pair(batch_size: int, device: str | torch.device, **build_kwargs: Any) -> tuple[Trainer, Trainer]:
    """Release and fast DeiT trainers (:func:`build_train_step` with ``build_kwargs``) with the same weights, drop path
    off (its random masks differ under compile)."""
    _, release = build_train_step("release", batch_size=batch_size, device=device, **build_kwargs, drop_path=0.0)
    _, fast = build_train_step("fast", batch_size=batch_size, device=device, **build_kwargs, drop_path=0.0)
    fast.student.load_state_dict(release.student.state_dict())
    fast.teacher.load_state_dict(release.teacher.state_dict())
    return release, fast


def deit_parity_check(release: Trainer, fast: Trainer, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Parity verdict of a :func:`deit_parity_pair` on one synthetic batch of the trainers' image size; the release
    trainer computes the references."""
    model = release.cfg["model"]
    images, labels = synthetic_batch(batch_size, model["img_size"], model["num_classes"], device, seed=1)
    low = fast.autocast_dtype
    fast_run = deit_gradients(fast, images, labels, low)  # first: a compile failure falls back to eager here
    with strict_fp32(), torch._dynamo.config.patch(disable=True):
        reference = deit_gradients(release, images, labels, None)
        fast_fp32 = deit_gradients(fast, images, labels, None)
    rounded = deit_gradients(release, images, labels, low) if low else reference
    return judge_parity(reference, rounded, fast_run, fast_fp32, low)
