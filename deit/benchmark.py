"""The DeiT track's benchmark steps and parity pair, with random networks: :func:`build_release`, :func:`build_fast`
and :func:`build_teacher` each return one step on a batch (``step(images, labels)``) for ``scripts/benchmark.py``;
:func:`parity_pair` returns the release and fast set-ups that :func:`projector_kd.engine.parity.check_parity`
compares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.utils import random_seed

from projector_kd.engine.distributed import DistEnv
from projector_kd.engine.errors import UserError
from projector_kd.engine.fast import autocast_context
from projector_kd.engine.loop import TrainingLoop
from projector_kd.engine.parity import ParitySide, Result

from .engine import DeiTTrack

Step = Callable[[torch.Tensor, torch.Tensor], Any]


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


def _loop_step(loop: TrainingLoop) -> Step:
    """``loop``'s training step on a copy of the batch (mixup mixes its input in place, and a benchmark feeds one
    batch every step)."""
    return lambda images, labels: loop.train_step((images.clone(), labels))


def build_release(device: torch.device, **models: Any) -> Step:
    """The release recipe's training step (:func:`build_train_step` ``'release'`` with ``models``)."""
    return _loop_step(build_train_step("release", device=device, **models))


def build_fast(device: torch.device, **models: Any) -> Step:
    """The fast path's training step (:func:`build_train_step` ``'fast'`` with ``models``)."""
    return _loop_step(build_train_step("fast", device=device, **models))


def build_teacher(device: torch.device, **models: Any) -> Step:
    """Teacher inference alone with the fast path's settings (autocast, channels_last, compile): the floor of any
    design that runs the teacher every step."""
    track = build_train_step("fast", device=device, **models).track

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if track.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device.type, track.autocast_dtype):
            return track.teacher_forward(images)

    return step


def _gradients(track: DeiTTrack) -> Callable[[torch.Tensor, torch.Tensor, torch.dtype | None], Result]:
    """Loss and gradients (student and projector) of one forward/backward of ``track`` (no optimizer step, no loss
    scaling) under the given autocast dtype (None: float32); mixup/cutmix seeded identically every call."""

    def gradients(images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None) -> Result:
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
        trained = track.trained.named_parameters()
        return loss.item(), {n: p.grad.detach().float() for n, p in trained if p.grad is not None}

    return gradients


def parity_pair(device: torch.device, **models: Any) -> tuple[ParitySide, ParitySide]:
    """Release and fast DeiT tracks (:func:`build_train_step` with ``models``) with the same weights, drop path off
    (its random masks differ under compile); each side's ``model`` is its :class:`DeiTTrack`."""
    release = build_train_step("release", device=device, **models, drop_path=0.0).track
    fast = build_train_step("fast", device=device, **models, drop_path=0.0).track
    fast.trained.load_state_dict(release.trained.state_dict())
    fast.teacher.load_state_dict(release.teacher.state_dict())
    return ParitySide(release, _gradients(release)), ParitySide(fast, _gradients(fast), fast.autocast_dtype)
