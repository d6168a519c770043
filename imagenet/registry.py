"""The projector method in torchdistill's registries, computed by :mod:`projector_kd`.

Importing this module (directly, through ``import imagenet``, or from a torchdistill config's ``dependencies``) adds:

- ``ProjectorKDModelWrapper`` (auxiliary model wrapper, student side): the student plus a
  :class:`projector_kd.ProjectorDistillLoss` (projector ``embed``, whitening ``bn_s``/``bn_t``). Because the wrapper
*is*
  the student model torchdistill optimises, the projector's parameters land in the student's optimizer.
- ``ProjectorKDLoss`` (mid-level loss): ``feature_weight * L_feat(z_s, z_t) + kd_weight * KD(y_s, y_t; T)`` with
  ``L_feat`` the wrapper's ProjectorDistillLoss (log_diff by default) and ``KD`` :func:`projector_kd.kd_loss`.
- ``LogitKDLoss`` (mid-level loss): ``KD(y_s, y_t; T)`` alone.

The wrapper publishes its student features and its ProjectorDistillLoss in the student I/O dict under
:data:`IO_KEY`; the loss evaluates it on the teacher features it finds in the teacher I/O dict. Whitening uses batch
statistics on both sides while the student wrapper is in training mode (what torchdistill's pre-epoch step sets),
whatever mode the teacher network is in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchdistill.losses.registry import register_mid_level_loss
from torchdistill.models.registry import register_auxiliary_model_wrapper
from torchdistill.models.util import wrap_if_distributed
from torchdistill.models.wrapper import AuxiliaryModelWrapper

from projector_kd import ProjectorDistillLoss, kd_loss
from projector_kd.engine.fast import CompiledOrEager, CompileFallbackNotice

IO_KEY = "projector_kd"
SELF_PATH = "."


def _module_of(module: nn.Module) -> nn.Module:
    """``module`` without the fast path's compile wrapper and without DDP."""
    if isinstance(module, CompiledOrEager):
        module = module.eager
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


@register_auxiliary_model_wrapper
class ProjectorKDModelWrapper(AuxiliaryModelWrapper):
    """Student wrapper holding the projector and the whitening (``self.feature_loss``; docs/method.md).

    ``input_module``: ``{'path': <student module path>, 'io': 'input'|'output'}`` — the feature the projector reads
    (e.g. ``layer4`` output, pooled over H, W). The remaining arguments go to
    :class:`projector_kd.ProjectorDistillLoss`.
    ``forward(x)`` is the student's forward; the student's own state dict is :attr:`model`'s.
    """

    def __init__(
        self,
        input_module: dict,
        student_dim: int,
        teacher_dim: int,
        device: torch.device,
        device_ids: list[int] | None,
        distributed: bool,
        distance: str = "log_diff",
        exponent: float = 4.0,
        eps: float = 1e-4,
        projector: str = "linear",
        student_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        find_unused_parameters: bool | None = None,
    ) -> None:
        super().__init__()
        if student_model is None or teacher_model is not None:
            raise ValueError("ProjectorKDModelWrapper wraps the student: put it under train.student, not train.teacher")
        if set(input_module) != {"path", "io"} or input_module["io"] not in ("input", "output"):
            raise ValueError(f"input_module must be {{path: <module path>, io: input|output}}, got {input_module}")
        self.input_module_path = input_module["path"]
        self.input_module_io = input_module["io"]
        self.model = wrap_if_distributed(student_model, device, device_ids, distributed, find_unused_parameters)
        self.feature_loss = wrap_if_distributed(
            ProjectorDistillLoss(
                student_dim, teacher_dim, distance=distance, exponent=exponent, eps=eps, projector=projector
            ),
            device,
            device_ids,
            distributed,
        )

    @property
    def student(self) -> nn.Module:
        """The student network without DDP."""
        return _module_of(self.model)

    @property
    def distill_loss(self) -> ProjectorDistillLoss:
        """The projector + whitening module without DDP (what checkpoints store under ``projector``)."""
        return _module_of(self.feature_loss)

    def compile_networks(self, notice: CompileFallbackNotice) -> None:
        """Fast path: run the student network and the feature loss (projector, whitening, distance) through
        ``torch.compile``, each falling back to eager (:class:`projector_kd.engine.fast.CompiledOrEager`).
        :attr:`student` and :attr:`distill_loss` still return the plain modules."""
        self.model = CompiledOrEager(self.model, "student", notice)
        self.feature_loss = CompiledOrEager(self.feature_loss, "projector loss", notice)

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def secondary_forward(self, io_dict: dict) -> None:
        features = io_dict[self.input_module_path][self.input_module_io]
        io_dict[IO_KEY] = {"student_features": features, "feature_loss": self.feature_loss}


def _lookup(io_dict: dict, path: str, io: str, side: str) -> torch.Tensor:
    try:
        return io_dict[path][io]
    except KeyError:
        raise KeyError(
            f"{side} I/O dict has no {path!r} {io!r}: add the module path to train.{side}.forward_hook."
            f"{io} (the model's own output is path '.')"
        ) from None


@register_mid_level_loss
class ProjectorKDLoss(nn.Module):
    """``feature_weight * L_feat + kd_weight * KD`` (the ResNet recipe: 2.0 and 1.0, log_diff, T = 1; docs/method.md).

    ``teacher_feature``: ``{path, io}`` of the teacher feature (hooked through ``train.teacher.forward_hook``);
    logits are the models' own outputs unless ``student_logits``/``teacher_logits`` name other ``{path, io}``.
    After each call :attr:`last_terms` holds the detached unweighted terms ``{'feature', 'kd'}``.
    """

    def __init__(
        self,
        teacher_feature: dict,
        feature_weight: float = 2.0,
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        student_logits: dict | None = None,
        teacher_logits: dict | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher_feature = (teacher_feature["path"], teacher_feature["io"])
        self.student_logits = _path_io(student_logits)
        self.teacher_logits = _path_io(teacher_logits)
        self.feature_weight = float(feature_weight)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        entry = student_io_dict.get(IO_KEY)
        if entry is None:
            raise KeyError(
                "ProjectorKDLoss needs the student wrapped in ProjectorKDModelWrapper "
                "(train.student.auxiliary_model_wrapper.key)"
            )
        teacher_features = _lookup(teacher_io_dict, *self.teacher_feature, side="teacher")
        feature = entry["feature_loss"](entry["student_features"], teacher_features)
        kd = kd_loss(
            _lookup(student_io_dict, *self.student_logits, side="student"),
            _lookup(teacher_io_dict, *self.teacher_logits, side="teacher"),
            self.temperature,
        )
        self.last_terms = {"feature": feature.detach(), "kd": kd.detach()}
        return self.feature_weight * feature + self.kd_weight * kd


@register_mid_level_loss
class LogitKDLoss(nn.Module):
    """``KD(y_s, y_t; T)`` = KL(softmax(y_t/T) || softmax(y_s/T)) * T^2, batchmean (logit distillation alone)."""

    def __init__(
        self, temperature: float = 1.0, student_logits: dict | None = None, teacher_logits: dict | None = None
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.student_logits = _path_io(student_logits)
        self.teacher_logits = _path_io(teacher_logits)
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
        kd = kd_loss(
            _lookup(student_io_dict, *self.student_logits, side="student"),
            _lookup(teacher_io_dict, *self.teacher_logits, side="teacher"),
            self.temperature,
        )
        self.last_terms = {"kd": kd.detach()}
        return kd


def _path_io(spec: dict | None) -> tuple[str, str]:
    if spec is None:
        return SELF_PATH, "output"
    return spec["path"], spec["io"]
