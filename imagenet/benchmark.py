"""Benchmark and parity helpers of the torchdistill track, on one fixed synthetic batch in one process.

Steps: :func:`build_reference_step` (torchdistill's own ``SRDLoss`` + ``SRDModelWrapper`` box, fp32, eager),
:func:`build_fast_step` (this project's registered loss and wrapper with the fast path) and :func:`build_teacher_step`
(teacher inference alone, the floor). Each returns a :class:`TrainStep`; calling it runs one step and returns the loss.
:func:`resnet_parity_pair` and :func:`resnet_parity_check` check that the fast box computes the SRD box's loss and
gradients (:mod:`projector_kd.engine.parity`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchdistill.core.distillation import get_distillation_box
from torchvision import models as tv_models

from imagenet.box import student_of, unwrap
from imagenet.fast import apply_fast_path, bf16_supported
from projector_kd.engine.fast import CompiledOrEager, autocast_context
from projector_kd.engine.parity import Result, judge_parity, strict_fp32, synthetic_batch


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


def _networks(
    teacher_arch: str, student_arch: str, num_classes: int, device: torch.device, seed: int
) -> tuple[nn.Module, nn.Module, int, int]:
    torch.manual_seed(seed)
    teacher = tv_models.__dict__[teacher_arch](num_classes=num_classes).to(device).eval()
    student = tv_models.__dict__[student_arch](num_classes=num_classes).to(device)
    return teacher, student, teacher.fc.in_features, student.fc.in_features


def _box_on_batch(
    box_config: Callable[[int, int], dict],
    teacher_arch: str,
    student_arch: str,
    batch_size: int,
    image_size: int,
    num_classes: int,
    device: torch.device,
    seed: int,
) -> tuple[Any, nn.Module, torch.Tensor, torch.Tensor]:
    """A torchdistill box of ``box_config(teacher_dim, student_dim)`` over fresh torchvision networks (seeded), ready
    for its first epoch, with its teacher and the synthetic batch it trains on."""
    teacher, student, t_dim, s_dim = _networks(teacher_arch, student_arch, num_classes, device, seed)
    box = get_distillation_box(teacher, student, {}, box_config(t_dim, s_dim), device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    images, labels = synthetic_batch(batch_size, image_size, num_classes, device, seed)
    return box, teacher, images, labels


def _box_step(
    box: Any, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None, description: str
) -> TrainStep:
    """One step of ``box`` on the fixed batch: forward (under autocast when ``autocast_dtype`` is set), backward and
    the optimizer step, as torchdistill's post-forward process does them."""
    autocast = autocast_context(images.device.type, autocast_dtype)

    def run() -> torch.Tensor:
        with autocast:
            loss = box.forward_process(images, labels)
        box.post_forward_process(loss=loss)
        return loss.detach()

    return TrainStep(run, images.shape[0], description, box)


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
    box, _, images, labels = _box_on_batch(
        srd_box_config, teacher_arch, student_arch, batch_size, image_size, num_classes, torch.device(device), seed
    )
    box.teacher_model.train()
    box.teacher_model.model.eval()
    return _box_step(box, images, labels, None, f"{student_arch} <- {teacher_arch}, torchdistill SRD box, fp32")


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
    box, teacher, images, labels = _box_on_batch(
        projector_box_config, teacher_arch, student_arch, batch_size, image_size, num_classes, device, seed
    )
    settings = apply_fast_path(box, teacher, device, compile_models=compile_models)
    images = images.contiguous(memory_format=torch.channels_last)
    description = f"{student_arch} <- {teacher_arch}, ProjectorKD box, fast path"
    return _box_step(box, images, labels, settings.autocast_dtype, description)


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
    images, _ = synthetic_batch(batch_size, image_size, num_classes, device, seed)
    model: nn.Module = teacher
    autocast = autocast_context(device.type, torch.bfloat16 if fast and bf16_supported(device) else None)
    if fast:
        teacher.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        model = CompiledOrEager(teacher, "teacher")

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(images).float().mean()

    return TrainStep(run, batch_size, f"{teacher_arch} inference" + (" (fast)" if fast else ""))


def resnet_gradients(
    box: Any, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None, projector: torch.nn.Linear
) -> Result:
    """Loss and gradients (student network + projector) of one forward/backward of a torchdistill box, no step."""
    context = autocast_context(images.device.type, autocast_dtype)
    box.optimizer.zero_grad(set_to_none=True)
    with context:
        loss = box.forward_process(images, labels)
    loss.backward()
    named = [(f"student.{n}", p) for n, p in unwrap(student_of(box)).named_parameters()]
    named += [(f"projector.{n}", p) for n, p in projector.named_parameters()]
    return loss.item(), {n: p.grad.detach().float() for n, p in named if p.grad is not None}


def resnet_parity_pair(
    teacher_arch: str = "resnet34",
    student_arch: str = "resnet18",
    batch_size: int = 256,
    image_size: int = 224,
    num_classes: int = 1000,
    device: str | torch.device = "cuda",
) -> tuple[Any, Any]:
    """torchdistill's SRD box (the reference) and this project's box on the fast path, with the same networks
    (same seed) and the same projector weights."""
    kwargs = dict(
        teacher_arch=teacher_arch,
        student_arch=student_arch,
        batch_size=batch_size,
        image_size=image_size,
        num_classes=num_classes,
        device=device,
    )
    reference_box = build_reference_step(**kwargs).box
    fast_box = build_fast_step(**kwargs).box
    fast_box.student_model.distill_loss.embed.load_state_dict(reference_box.student_model.linear.state_dict())
    return reference_box, fast_box


def resnet_parity_check(
    reference_box: Any, fast_box: Any, batch_size: int, image_size: int, num_classes: int, device: torch.device
) -> dict[str, Any]:
    """Parity verdict of a :func:`resnet_parity_pair` on one batch (the fast box autocasts as the fast path does)."""
    images, labels = synthetic_batch(batch_size, image_size, num_classes, device, seed=1)
    fast_images = images.contiguous(memory_format=torch.channels_last)
    srd_linear = reference_box.student_model.linear
    projector = fast_box.student_model.distill_loss.embed
    low = torch.bfloat16 if bf16_supported(device) else None
    fast_run = resnet_gradients(fast_box, fast_images, labels, low, projector)  # first: compile falls back here
    with strict_fp32(), torch.compiler.set_stance("force_eager"):
        reference = resnet_gradients(reference_box, images, labels, None, srd_linear)
        fast_fp32 = resnet_gradients(fast_box, fast_images, labels, None, projector)
    rounded = resnet_gradients(reference_box, images, labels, low, srd_linear) if low else reference
    return judge_parity(reference, rounded, fast_run, fast_fp32, low)
