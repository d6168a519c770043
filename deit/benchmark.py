"""Benchmark and parity helpers of the DeiT track: its training step with random networks, and the check that the
fast path computes the release recipe's loss and gradients (:mod:`projector_kd.engine.parity`)."""

from __future__ import annotations

from typing import Any

import torch
from timm.utils import random_seed

from projector_kd.engine.distributed import DistEnv
from projector_kd.engine.errors import UserError
from projector_kd.engine.loop import TrainingLoop
from projector_kd.engine.parity import Result, judge_parity, strict_fp32, synthetic_batch

from .engine import DeiTTrack


def build_train_step(
    recipe: str = "release",
    model: str = "tiny",
    batch_size: int = 256,
    img_size: int | None = None,
    device: str | torch.device = "cuda",
    teacher: str = "regnety_160",
    num_classes: int = 1000,
    **model_overrides: Any,
) -> TrainingLoop:
    """One training step of the DeiT recipe for benchmarks, with randomly initialised networks.

    ``recipe``: ``'release'`` (fp16 autocast + GradScaler on CUDA, eager, foreach AdamW) or ``'fast'`` (bf16,
    channels_last, torch.compile, fused AdamW). Returns a :class:`~projector_kd.engine.loop.TrainingLoop` that writes
    nothing: ``loop.train_step((images, labels))`` runs the step training runs on a batch (float images (B, 3, S, S)
    and int labels, on any device) and returns its device values (the fast step reads nothing to the host);
    ``loop.track.teacher_forward`` times teacher inference alone. ``model_overrides`` set ``model.*`` keys.
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
    student, projector = build_student(cfg, teacher_dim=teacher_net.num_features)
    track = DeiTTrack(cfg, env, student, projector, teacher_net, None, None, steps_per_epoch=1000)
    return TrainingLoop(track, output_dir=None)


def deit_gradients(
    track: DeiTTrack, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None
) -> Result:
    """Loss and gradients (student and projector) of one forward/backward (no optimizer step, no loss scaling) of
    ``track`` with ``autocast_dtype`` (None: float32); mixup/cutmix seeded identically every call."""
    saved = track.autocast_dtype
    track.autocast_dtype = autocast_dtype
    try:
        random_seed(0)
        x, y = track.prepare_batch(images.clone(), labels)  # mixup mixes a batch in place
        loss = sum(track.compute_terms(x, y).values())
        track.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        track.autocast_dtype = saved
    return loss.item(), {n: p.grad.detach().float() for n, p in track.trained.named_parameters() if p.grad is not None}


def deit_parity_pair(batch_size: int, device: str | torch.device, **build_kwargs: Any) -> tuple[DeiTTrack, DeiTTrack]:
    """Release and fast DeiT tracks (:func:`build_train_step` with ``build_kwargs``) with the same weights, drop path
    off (its random masks differ under compile)."""
    release = build_train_step("release", batch_size=batch_size, device=device, **build_kwargs, drop_path=0.0).track
    fast = build_train_step("fast", batch_size=batch_size, device=device, **build_kwargs, drop_path=0.0).track
    fast.trained.load_state_dict(release.trained.state_dict())
    fast.teacher.load_state_dict(release.teacher.state_dict())
    return release, fast


def deit_parity_check(release: DeiTTrack, fast: DeiTTrack, batch_size: int, device: torch.device) -> dict[str, Any]:
    """Parity verdict of a :func:`deit_parity_pair` on one synthetic batch of the tracks' image size; the release
    track computes the references."""
    model = release.cfg["model"]
    images, labels = synthetic_batch(batch_size, model["img_size"], model["num_classes"], device, seed=1)
    low = fast.autocast_dtype
    fast_run = deit_gradients(fast, images, labels, low)  # first: a compile failure falls back to eager here
    with strict_fp32(), torch.compiler.set_stance("force_eager"):
        reference = deit_gradients(release, images, labels, None)
        fast_fp32 = deit_gradients(fast, images, labels, None)
    rounded = deit_gradients(release, images, labels, low) if low else reference
    return judge_parity(reference, rounded, fast_run, fast_fp32, low)
