"""What the ResNet track reads of a torchdistill box: its student and projector without wrappers, the parameters its
optimizer updates, its gradient accumulation, and its loss terms one by one (:class:`TermRecorder`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imagenet.registry import LogitKDLoss, ProjectorKDLoss, ProjectorKDModelWrapper
from projector_kd.engine.errors import UserError
from projector_kd.engine.loop import TOTAL

logger = logging.getLogger(__name__)


def unwrap(module: nn.Module) -> nn.Module:
    """The network without DDP / DataParallel."""
    return module.module if isinstance(module, (DistributedDataParallel, nn.DataParallel)) else module


def student_of(box: Any) -> nn.Module:
    """The student (or trained model) held by a torchdistill box, before any wrapping."""
    return box.org_student_model if hasattr(box, "org_student_model") else box.org_model


def trained_module(box: Any) -> nn.Module:
    """The module torchdistill trains (the student wrapper, a DDP wrapper, or the student itself)."""
    return box.student_model if hasattr(box, "student_model") else box.model


def projector_of(box: Any) -> nn.Module | None:
    """The ProjectorDistillLoss of a wrapped student, or None."""
    module = trained_module(box)
    return module.distill_loss if isinstance(module, ProjectorKDModelWrapper) else None


def optimized_parameters(box: Any) -> list[nn.Parameter]:
    """The parameters the box's optimizer updates, in its order (student, then the projector when there is one)."""
    return [param for group in box.optimizer.param_groups for param in group["params"]]


def accumulation_steps(box: Any) -> int:
    """Micro-batches per optimizer step: torchdistill's ``grad_accum_step`` (1 without accumulation)."""
    return getattr(box, "grad_accum_step", None) or 1


class TermRecorder:
    """Forward hooks on the box's loss terms, so a non-finite total can be traced to the term that caused it.
    :meth:`snapshot` stacks a step's values on the device (no host read)."""

    def __init__(self, criterion: nn.Module) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.criterion = criterion
        for name, (module, _weight) in getattr(criterion, "term_dict", {}).items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.values[name] = output.detach()

        return record

    def snapshot(self, loss: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Names and one device vector of a step's values: each term, its inner terms (``term.part``, from
        ``last_terms``), then the total (:data:`~projector_kd.engine.loop.TOTAL`)."""
        names, values = [], []
        for name, value in self.values.items():
            names.append(name)
            values.append(value.float().reshape(()))
            module = self.criterion.term_dict[name][0]
            inner = getattr(module, "last_terms", {}) if isinstance(module, (ProjectorKDLoss, LogitKDLoss)) else {}
            for part, tensor in inner.items():
                names.append(f"{name}.{part}")
                values.append(tensor.detach().float().reshape(()))
        names.append(TOTAL)
        values.append(loss.detach().float().reshape(()))
        return names, torch.stack(values)


def window_open(box: Any, global_step: int) -> bool:
    """Whether ``global_step`` micro-batches end inside a gradient-accumulation window of ``box``: gradients are
    accumulated that the window's optimizer step still needs."""
    return global_step % accumulation_steps(box) != 0


def restore_accumulated_grads(box: Any, state: dict, path: Path, global_step: int) -> None:
    """Put back the gradients a checkpoint written inside an accumulation window holds, so the window's optimizer
    step sums the same micro-batches as in an uninterrupted run."""
    grads = state.get("accumulated_grads")
    window = f"global step {global_step}, grad_accum_step {accumulation_steps(box)}"
    if grads is None and window_open(box, global_step):
        logger.warning(
            "checkpoint %s ends inside an accumulation window (%s) but holds no accumulated gradients (an earlier "
            "version or another grad_accum_step wrote it): the window goes on without its earlier micro-batches "
            "(training continues, but not bit for bit)",
            path,
            window,
        )
    if grads is None or not window_open(box, global_step):
        if grads is not None:
            logger.warning(
                "checkpoint %s holds the gradients of an open accumulation window, but %s closes one: they are "
                "dropped (training continues, but not bit for bit)",
                path,
                window,
            )
        return
    params = optimized_parameters(box)
    if len(grads) != len(params) or any(g is not None and g.shape != p.shape for g, p in zip(grads, params)):
        raise UserError(
            f"checkpoint {path}: its accumulated gradients do not match this config's parameters — "
            f"use another output folder"
        )
    for param, grad in zip(params, grads):
        param.grad = None if grad is None else torch.empty_like(param).copy_(grad)
