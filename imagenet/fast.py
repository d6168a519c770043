"""Fast path for the torchdistill track (``runtime.fast: true`` / ``--fast``).

The fast path wraps an already-built torchdistill box without changing its math: bf16 autocast (applied by the engine
around ``forward_process``), channels_last teacher/student/inputs, ``torch.compile`` of the teacher, the student
network and the projector loss (projector, whitening and distance as one graph instead of a chain of small kernels;
each falls back to eager, with one warning in all, where compilation fails), cuDNN autotuning and TF32 (CUDA), fused
SGD/AdamW/Adam kernels (which skip a non-finite step on the device, so the engine's step reads nothing to the host),
pinned host memory with non-blocking copies (CUDA), persistent loader workers, and no per-step input validation sync
in the projector loss. Numerics change only by bf16 rounding (the loss itself runs in float32 inside
ProjectorDistillLoss). The training loader becomes the fast CPU loader (``runtime.fast_loader``, default on, with the
recipe's torchvision loader: :func:`projector_kd.engine.fast_data.fast_training_loader`, crop-window decoding and
normalisation on the device; its pixels differ slightly, docs/faithfulness.md). The benchmark's step builders are in
:mod:`imagenet.benchmark`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from imagenet.registry import ProjectorKDModelWrapper
from projector_kd.engine.fast import CompiledOrEager, CompileFallbackNotice, enable_fast_cuda_backends
from projector_kd.engine.fast_data import DeviceFinishedLoader, fast_training_loader
from projector_kd.engine.sampling import rebuild_loader

FUSED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass(frozen=True)
class FastSettings:
    """What the fast path switched on (logged and written to the metrics)."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    compiled: bool
    fused_optimizer: bool
    pinned_memory: bool
    fast_loader: bool


def _fuse_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    if not isinstance(optimizer, FUSED_OPTIMIZERS):
        return False
    for group in optimizer.param_groups:
        if group.get("differentiable"):
            return False
    for group in optimizer.param_groups:
        group["fused"] = True
        group["foreach"] = False
    return True


def _fast_loader(loader: DataLoader | None, pin_memory: bool) -> DataLoader | None:
    return None if loader is None else rebuild_loader(loader, pin_memory=pin_memory, persistent_workers=True)


def wants_fast_loader(recipe: dict) -> bool:
    """Whether the fast path's training loader is the fast CPU loader: ``runtime.fast_loader`` (default true) with the
    recipe's torchvision loader (``--loader dali`` replaces it by DALI's)."""
    runtime = recipe.get("runtime", {})
    return bool(runtime.get("fast_loader", True)) and runtime.get("loader", "torchvision") == "torchvision"


def channels_last_networks(*networks: nn.Module | None) -> None:
    """Convert each network's 4-D parameters and buffers to channels_last in place (``None`` is skipped). Call it
    before DDP wraps a network too: DDP lays out its gradient buckets with the parameters' strides at wrapping time,
    and a later conversion makes every gradient copy into its bucket through a strided view."""
    for network in networks:
        if network is not None:
            network.to(memory_format=torch.channels_last)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is usable on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def apply_fast_path(
    box: Any, teacher: nn.Module | None, device: torch.device, compile_models: bool = True, fast_loader: bool = False
) -> FastSettings:
    """Switch an already-built torchdistill box onto the fast path (see the module docstring); ``fast_loader``: the
    training loader becomes the fast CPU loader (:func:`wants_fast_loader`)."""
    enable_fast_cuda_backends(device)
    student_holder = box.student_model if hasattr(box, "student_model") else box.model
    notice = CompileFallbackNotice()
    channels_last_networks(teacher, student_holder)
    if isinstance(student_holder, ProjectorKDModelWrapper):
        student_holder.distill_loss.check_inputs = False
        if compile_models:
            student_holder.compile_networks(notice)
    elif compile_models:
        compiled_student = CompiledOrEager(student_holder, "student", notice)
        if hasattr(box, "student_model"):
            box.student_model = compiled_student
        else:
            box.model = compiled_student
    if teacher is not None and compile_models and hasattr(box, "teacher_model"):
        box.teacher_model = CompiledOrEager(box.teacher_model, "teacher", notice)
    fused = _fuse_optimizer(box.optimizer)
    pin = device.type == "cuda"
    if fast_loader and box.train_data_loader is not None:
        box.train_data_loader = fast_training_loader(box.train_data_loader, device, "train.train_data_loader")
    else:
        box.train_data_loader = _fast_loader(box.train_data_loader, pin)
    box.val_data_loader = _fast_loader(box.val_data_loader, pin)
    return FastSettings(
        autocast_dtype=torch.bfloat16 if bf16_supported(device) else None,
        channels_last=True,
        compiled=compile_models,
        fused_optimizer=fused,
        pinned_memory=pin,
        fast_loader=isinstance(box.train_data_loader, DeviceFinishedLoader),
    )
