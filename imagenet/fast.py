"""Fast path for the torchdistill track (``runtime.fast: true`` / ``--fast``), and step builders for the benchmark.

The fast path wraps an already-built torchdistill box without changing its math: bf16 autocast (applied by the engine
around ``forward_process``), channels_last teacher/student/inputs, ``torch.compile`` of the teacher and the student
network (falling back to eager, with one warning, where compilation fails), cuDNN autotuning and TF32 (CUDA), fused
SGD/AdamW/Adam kernels (which skip a non-finite step on the device, so the engine's step reads nothing to the host),
pinned host memory with non-blocking copies (CUDA), persistent loader workers, and no per-step input validation sync
in the projector loss. Numerics change only by bf16 rounding (the loss itself runs in float32 inside
ProjectorDistillLoss).

Benchmark entry points (same synthetic batch, one process): :func:`build_reference_step` (torchdistill's own
``SRDLoss`` + ``SRDModelWrapper`` box, fp32, eager), :func:`build_fast_step` (this project's registered loss and
wrapper with the fast path) and :func:`build_teacher_step` (teacher inference alone, the floor). Each returns a
:class:`TrainStep`; calling it runs one step and returns the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchdistill.core.distillation import get_distillation_box
from torchvision import models as tv_models

from imagenet.registry import ProjectorKDModelWrapper
from projector_kd.fast import enable_fast_cuda_backends

logger = logging.getLogger(__name__)
FUSED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError)


class FallbackNotice:
    """Tells the user once — however many modules fall back — that torch.compile is unavailable."""

    def __init__(self) -> None:
        self.given = False

    def __call__(self, label: str, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if self.given:
            logger.debug("fast path: running the %s eagerly too (%s)", label, reason)
            return
        self.given = True
        logger.warning(
            "fast path: torch.compile is unavailable here (%s); running the networks eagerly — bf16, "
            "channels_last and the fused optimizer stay on",
            reason,
        )


class CompiledWithFallback(nn.Module):
    """``torch.compile(module)`` that falls back to the eager module, with one clear message (shared through
    ``notice``), when compiling fails (no C++ compiler / Triton, unsupported platform) — at wrapping time or at the
    first call, where compilation really happens. ``state_dict`` keys are the eager module's under ``eager``."""

    def __init__(self, module: nn.Module, label: str, notice: FallbackNotice | None = None) -> None:
        super().__init__()
        self.eager = module
        self.label = label
        self.notice = notice if notice is not None else FallbackNotice()
        self.compiled: Callable | None = None
        try:
            self.compiled = torch.compile(module)
        except Exception as error:  # noqa: BLE001 - any failure means "run eager"
            self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        self.notice(self.label, error)
        self.compiled = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except COMPILE_ERRORS as error:
                self._fall_back(error)
        return self.eager(*args, **kwargs)


@dataclass(frozen=True)
class FastSettings:
    """What the fast path switched on (logged and written to the metrics)."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    compiled: bool
    fused_optimizer: bool
    pinned_memory: bool


def _fuse_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    if not isinstance(optimizer, FUSED_OPTIMIZERS):
        return False
    for group in optimizer.param_groups:
        if group.get("differentiable"):
            return False
    for group in optimizer.param_groups:
        group["fused"] = True
        group["foreach"] = False
    optimizer._step_supports_amp_scaling = True
    return True


def _fast_loader(loader: DataLoader | None, pin_memory: bool) -> DataLoader | None:
    if loader is None:
        return None
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_sampler=loader.batch_sampler,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=workers > 0,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        generator=loader.generator,
    )


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is usable on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def apply_fast_path(
    box: Any, teacher: nn.Module | None, device: torch.device, compile_models: bool = True
) -> FastSettings:
    """Switch an already-built torchdistill box onto the fast path (see the module docstring)."""
    enable_fast_cuda_backends(device)
    student_holder = box.student_model if hasattr(box, "student_model") else box.model
    notice = FallbackNotice()
    networks = [m for m in (teacher, student_holder) if m is not None]
    for network in networks:
        network.to(memory_format=torch.channels_last)
    if isinstance(student_holder, ProjectorKDModelWrapper):
        student_holder.distill_loss.check_inputs = False
        if compile_models:
            student_holder.model = CompiledWithFallback(student_holder.model, "student", notice)
    elif compile_models:
        compiled_student = CompiledWithFallback(student_holder, "student", notice)
        if hasattr(box, "student_model"):
            box.student_model = compiled_student
        else:
            box.model = compiled_student
    if teacher is not None and compile_models and hasattr(box, "teacher_model"):
        box.teacher_model = CompiledWithFallback(box.teacher_model, "teacher", notice)
    fused = _fuse_optimizer(box.optimizer)
    pin = device.type == "cuda"
    box.train_data_loader = _fast_loader(box.train_data_loader, pin)
    box.val_data_loader = _fast_loader(box.val_data_loader, pin)
    return FastSettings(
        autocast_dtype=torch.bfloat16 if bf16_supported(device) else None,
        channels_last=True,
        compiled=compile_models,
        fused_optimizer=fused,
        pinned_memory=pin,
    )


# ------------------------------------------------------------------------------------------------ benchmark steps


def _ce_term() -> dict:
    return {
        "criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
        "criterion_wrapper": {
            "key": "SimpleLossWrapper",
            "kwargs": {
                "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                "target": {"uses_label": True},
            },
        },
        "weight": 1.0,
    }


def _optimizer() -> dict:
    return {"key": "SGD", "kwargs": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}}


def srd_box_config(teacher_dim: int, student_dim: int) -> dict:
    """torchdistill's own SRD recipe (SRDModelWrapper on both sides + SRDLoss), as its documentation describes it."""
    norm = {"num_features": teacher_dim, "eps": 1e-4, "affine": False}
    return {
        "num_epochs": 1,
        "teacher": {
            "forward_proc": "forward_batch_only",
            "requires_grad": False,
            "auxiliary_model_wrapper": {
                "key": "SRDModelWrapper",
                "kwargs": {"input_module": {"path": "model.layer4", "io": "output"}, "norm_kwargs": norm},
            },
            "forward_hook": {"output": ["model.layer4", "norm_layer"]},
        },
        "student": {
            "forward_proc": "forward_batch_only",
            "requires_grad": True,
            "auxiliary_model_wrapper": {
                "key": "SRDModelWrapper",
                "kwargs": {
                    "input_module": {"path": "model.layer4", "io": "output"},
                    "norm_kwargs": norm,
                    "linear_kwargs": {"in_features": student_dim, "out_features": teacher_dim},
                },
            },
            "forward_hook": {"output": ["model.layer4", "norm_layer"]},
        },
        "optimizer": _optimizer(),
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "ce": _ce_term(),
                    "srd": {
                        "criterion": {
                            "key": "SRDLoss",
                            "kwargs": {
                                "student_feature_module_path": "norm_layer",
                                "student_feature_module_io": "output",
                                "teacher_feature_module_path": "norm_layer",
                                "teacher_feature_module_io": "output",
                                "student_linear_module_path": ".",
                                "student_linear_module_io": "output",
                                "teacher_linear_module_path": ".",
                                "teacher_linear_module_io": "output",
                                "exponent": 4.0,
                                "temperature": 1.0,
                                "reduction": "batchmean",
                            },
                        },
                        "weight": 1.0,
                    },
                }
            },
        },
    }


def projector_box_config(teacher_dim: int, student_dim: int) -> dict:
    """This project's ResNet recipe (docs/method.md): ProjectorKDModelWrapper on the student, ProjectorKDLoss, CE."""
    return {
        "num_epochs": 1,
        "teacher": {
            "forward_proc": "forward_batch_only",
            "requires_grad": False,
            "forward_hook": {"output": ["layer4"]},
        },
        "student": {
            "forward_proc": "forward_batch_only",
            "requires_grad": True,
            "auxiliary_model_wrapper": {
                "key": "ProjectorKDModelWrapper",
                "kwargs": {
                    "input_module": {"path": "model.layer4", "io": "output"},
                    "student_dim": student_dim,
                    "teacher_dim": teacher_dim,
                    "distance": "log_diff",
                    "exponent": 4.0,
                    "eps": 1e-4,
                },
            },
            "forward_hook": {"output": ["model.layer4"]},
        },
        "optimizer": _optimizer(),
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "ce": _ce_term(),
                    "projector_kd": {
                        "criterion": {
                            "key": "ProjectorKDLoss",
                            "kwargs": {
                                "teacher_feature": {"path": "layer4", "io": "output"},
                                "feature_weight": 2.0,
                                "kd_weight": 1.0,
                                "temperature": 1.0,
                            },
                        },
                        "weight": 1.0,
                    },
                }
            },
        },
    }


class TrainStep:
    """One training (or teacher-inference) step on a fixed synthetic batch; ``step()`` returns the loss tensor."""

    def __init__(self, run: Callable[[], torch.Tensor], batch_size: int, description: str, box: Any = None) -> None:
        self._run = run
        self.batch_size = batch_size
        self.description = description
        self.box = box

    def __call__(self) -> torch.Tensor:
        return self._run()


def _synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def _networks(
    teacher_arch: str, student_arch: str, num_classes: int, device: torch.device, seed: int
) -> tuple[nn.Module, nn.Module, int, int]:
    torch.manual_seed(seed)
    teacher = tv_models.__dict__[teacher_arch](num_classes=num_classes).to(device).eval()
    student = tv_models.__dict__[student_arch](num_classes=num_classes).to(device)
    return teacher, student, teacher.fc.in_features, student.fc.in_features


def build_reference_step(
    teacher_arch: str = "resnet34",
    student_arch: str = "resnet18",
    batch_size: int = 256,
    image_size: int = 224,
    num_classes: int = 1000,
    device: str | torch.device = "cuda",
    seed: int = 0,
) -> TrainStep:
    """torchdistill's ``SRDLoss`` + ``SRDModelWrapper`` box, fp32, eager: the release recipe's training step.
    Teacher network in eval mode; the teacher wrapper's whitening in training mode (batch statistics)."""
    device = torch.device(device)
    teacher, student, t_dim, s_dim = _networks(teacher_arch, student_arch, num_classes, device, seed)
    box = get_distillation_box(teacher, student, {}, srd_box_config(t_dim, s_dim), device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    box.teacher_model.train()
    box.teacher_model.model.eval()
    images, labels = _synthetic_batch(batch_size, image_size, num_classes, device, seed)

    def run() -> torch.Tensor:
        loss = box.forward_process(images, labels)
        box.post_forward_process(loss=loss)
        return loss.detach()

    return TrainStep(run, batch_size, f"{student_arch} <- {teacher_arch}, torchdistill SRD box, fp32", box)


def build_fast_step(
    teacher_arch: str = "resnet34",
    student_arch: str = "resnet18",
    batch_size: int = 256,
    image_size: int = 224,
    num_classes: int = 1000,
    device: str | torch.device = "cuda",
    seed: int = 0,
    compile_models: bool = True,
) -> TrainStep:
    """This project's ProjectorKD box on the fast path (bf16 autocast, channels_last, compile, fused SGD)."""
    device = torch.device(device)
    teacher, student, t_dim, s_dim = _networks(teacher_arch, student_arch, num_classes, device, seed)
    box = get_distillation_box(teacher, student, {}, projector_box_config(t_dim, s_dim), device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    settings = apply_fast_path(box, teacher, device, compile_models=compile_models)
    images, labels = _synthetic_batch(batch_size, image_size, num_classes, device, seed)
    images = images.contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast(device_type=device.type, dtype=settings.autocast_dtype)
        if settings.autocast_dtype is not None
        else nullcontext()
    )

    def run() -> torch.Tensor:
        with autocast:
            loss = box.forward_process(images, labels)
        box.post_forward_process(loss=loss)
        return loss.detach()

    return TrainStep(run, batch_size, f"{student_arch} <- {teacher_arch}, ProjectorKD box, fast path", box)


def build_teacher_step(
    teacher_arch: str = "resnet34",
    batch_size: int = 256,
    image_size: int = 224,
    num_classes: int = 1000,
    device: str | torch.device = "cuda",
    seed: int = 0,
    fast: bool = True,
) -> TrainStep:
    """Teacher inference alone (the floor of any design that runs the teacher every step)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    teacher = tv_models.__dict__[teacher_arch](num_classes=num_classes).to(device).eval()
    images, _ = _synthetic_batch(batch_size, image_size, num_classes, device, seed)
    model: nn.Module = teacher
    autocast: Any = nullcontext()
    if fast:
        teacher.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        model = CompiledWithFallback(teacher, "teacher")
        if bf16_supported(device):
            autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(images).float().mean()

    return TrainStep(run, batch_size, f"{teacher_arch} inference" + (" (fast)" if fast else ""))
