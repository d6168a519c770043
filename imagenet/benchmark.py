"""The torchdistill track's benchmark steps and parity pair, with random networks (seeded).

:func:`build_release` (torchdistill's own ``SRDLoss`` + ``SRDModelWrapper`` box, fp32, eager), :func:`build_fast`
(this project's registered loss and wrapper on the fast path) and :func:`build_teacher` (teacher inference alone, the
floor) each return one step on a batch (``step(images, labels)``) for ``scripts/benchmark.py``; :func:`parity_pair`
returns both boxes with the same weights for :func:`projector_kd.engine.parity.check_parity`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchdistill.core.distillation import get_distillation_box
from torchvision import models as tv_models

from imagenet.box import student_of, unwrap
from imagenet.fast import FastSettings, apply_fast_path, bf16_supported
from projector_kd.engine.fast import CompiledOrEager, autocast_context
from projector_kd.engine.parity import ParitySide, Result


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


Step = Callable[[torch.Tensor, torch.Tensor], Any]


def _networks(
    teacher_arch: str, student_arch: str, num_classes: int, device: torch.device, seed: int
) -> tuple[nn.Module, nn.Module, int, int]:
    torch.manual_seed(seed)
    teacher = tv_models.__dict__[teacher_arch](num_classes=num_classes).to(device).eval()
    student = tv_models.__dict__[student_arch](num_classes=num_classes).to(device)
    return teacher, student, teacher.fc.in_features, student.fc.in_features


def _box(
    box_config: Callable[[int, int], dict],
    device: torch.device,
    teacher_arch: str = "resnet34",
    student_arch: str = "resnet18",
    num_classes: int = 1000,
    seed: int = 0,
) -> tuple[Any, nn.Module]:
    """A torchdistill box of ``box_config(teacher_dim, student_dim)`` over fresh torchvision networks (seeded), ready
    for its first epoch, and its teacher."""
    teacher, student, t_dim, s_dim = _networks(teacher_arch, student_arch, num_classes, device, seed)
    box = get_distillation_box(teacher, student, {}, box_config(t_dim, s_dim), device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    return box, teacher


def srd_box(device: torch.device, **models: Any) -> Any:
    """torchdistill's ``SRDLoss`` + ``SRDModelWrapper`` box (the release recipe) over the networks of ``models``
    (``teacher_arch``, ``student_arch``, ``num_classes``, ``seed``): teacher network in eval mode, the teacher
    wrapper's whitening in training mode (batch statistics)."""
    box, _ = _box(srd_box_config, torch.device(device), **models)
    box.teacher_model.train()
    box.teacher_model.model.eval()
    return box


def fast_box(device: torch.device, **models: Any) -> tuple[Any, FastSettings]:
    """This project's ProjectorKD box on the fast path (bf16 autocast, channels_last, compile, fused SGD) over the
    networks of ``models`` (as :func:`srd_box`), and what the fast path switched on."""
    device = torch.device(device)
    box, teacher = _box(projector_box_config, device, **models)
    return box, apply_fast_path(box, teacher, device)


def _box_step(box: Any, autocast_dtype: torch.dtype | None, channels_last: bool) -> Step:
    """One step of ``box`` on a batch: forward (channels_last and under autocast when set), backward and the
    optimizer step, as torchdistill's post-forward process does them; returns the loss."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(images.device.type, autocast_dtype):
            loss = box.forward_process(images, labels)
        box.post_forward_process(loss=loss)
        return loss.detach()

    return step


def build_release(device: torch.device, **models: Any) -> Step:
    """The release recipe's training step: :func:`srd_box` (``models``), fp32, eager."""
    return _box_step(srd_box(device, **models), None, channels_last=False)


def build_fast(device: torch.device, **models: Any) -> Step:
    """The fast path's training step: :func:`fast_box` (``models``)."""
    box, settings = fast_box(device, **models)
    return _box_step(box, settings.autocast_dtype, channels_last=True)


def build_teacher(
    device: torch.device, teacher_arch: str = "resnet34", num_classes: int = 1000, seed: int = 0, **_: Any
) -> Step:
    """Teacher inference alone with the fast path's settings (bf16 autocast, channels_last, compile): the floor of any
    design that runs the teacher every step. Other ``models`` keys (the student's) are ignored."""
    device = torch.device(device)
    torch.manual_seed(seed)
    teacher = tv_models.__dict__[teacher_arch](num_classes=num_classes).to(device).eval()
    teacher.to(memory_format=torch.channels_last)
    model = CompiledOrEager(teacher, "teacher")
    autocast = autocast_context(device.type, torch.bfloat16 if bf16_supported(device) else None)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(images.contiguous(memory_format=torch.channels_last)).float().mean()

    return step


def _gradients(box: Any, projector: nn.Linear, channels_last: bool) -> Callable[..., Result]:
    """Loss and gradients (student network + projector) of one forward/backward of a torchdistill box, no step."""

    def gradients(images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None) -> Result:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        box.optimizer.zero_grad(set_to_none=True)
        with autocast_context(images.device.type, autocast_dtype):
            loss = box.forward_process(images, labels)
        loss.backward()
        named = [(f"student.{n}", p) for n, p in unwrap(student_of(box)).named_parameters()]
        named += [(f"projector.{n}", p) for n, p in projector.named_parameters()]
        return loss.item(), {n: p.grad.detach().float() for n, p in named if p.grad is not None}

    return gradients


def parity_pair(device: torch.device, **models: Any) -> tuple[ParitySide, ParitySide]:
    """torchdistill's SRD box (the reference) and this project's box on the fast path, with the same networks (same
    seed) and the same projector weights; each side's ``model`` is its box."""
    reference = srd_box(device, **models)
    fast, settings = fast_box(device, **models)
    projector = fast.student_model.distill_loss.embed
    projector.load_state_dict(reference.student_model.linear.state_dict())
    return (
        ParitySide(reference, _gradients(reference, reference.student_model.linear, channels_last=False)),
        ParitySide(fast, _gradients(fast, projector, channels_last=True), settings.autocast_dtype),
    )
