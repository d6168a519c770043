"""The DeiT recipe's optimizer and learning-rate schedule (docs/method.md, section 3)."""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


def build_optimizer(trained: nn.Module, cfg: dict, lr: float) -> torch.optim.AdamW:
    """AdamW over ``trained`` (a :class:`deit.losses.DistillationObjective`): timm's two groups, weight decay
    ``train.weight_decay`` on >= 2-D weights and none on 1-D parameters, biases and the student's
    ``no_weight_decay()`` (position embedding, class token); fused kernels on the fast path."""
    train = cfg["train"]
    skip = [f"student.{name}" for name in trained.student.no_weight_decay()]
    return torch.optim.AdamW(
        param_groups_weight_decay(trained, train["weight_decay"], no_weight_decay_list=skip),
        lr=lr,
        betas=tuple(train["betas"]),
        eps=train["opt_eps"],
        **({"fused": True} if cfg["fast"] else {}),
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: dict, lrs: dict[str, float], steps_per_epoch: int
) -> CosineLRScheduler:
    """Per-step cosine from ``lrs['lr']`` to ``lrs['min_lr']`` over ``train.epochs``, after a linear warm-up of
    ``train.warmup_epochs`` from ``lrs['warmup_lr']`` (timm's ``CosineLRScheduler``, one cycle)."""
    train = cfg["train"]
    return CosineLRScheduler(
        optimizer,
        t_initial=train["epochs"] * steps_per_epoch,
        lr_min=lrs["min_lr"],
        warmup_lr_init=lrs["warmup_lr"],
        warmup_t=int(train["warmup_epochs"] * steps_per_epoch),
        cycle_limit=1,
        t_in_epochs=False,
    )
