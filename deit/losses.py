"""The DeiT track's loss: the student, its projector and the teacher's outputs in one objective (docs/method.md).

With y the mixup/cutmix soft targets and x the mixed images seen by both networks::

    loss = SoftTargetCE(head(x), y)                                            'ce'
         + kd_weight      * KL(softmax(teacher(x)) || softmax(head_conv(x)))   'kd'    (method kd, projector)
         + feature_weight * L_log_corr(mean patch token -> Linear -> BN, BN(pooled teacher features))
                                                                               'proj'  (projector)

With ``method: none`` there is no teacher and ``head_conv`` is trained on the labels like ``head`` ('ce_dist'). The
projector is not part of the student: :class:`DistillationObjective` holds both, so DDP and ``torch.compile`` see one
module and checkpoints keep the student alone under ``model``.
"""

from __future__ import annotations

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from projector_kd import ProjectorDistillLoss, kd_loss, pool_features
from projector_kd.engine.errors import UserError


class TeacherOutputs(nn.Module):
    """Frozen timm classifier -> (pooled features (B, C), logits) from one ``forward_features`` pass."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.teacher.forward_features(images)
        return pool_features(features), self.teacher.forward_head(features)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class DistillationObjective(nn.Module):
    """The student, its projector (``projector_loss``: a :class:`~projector_kd.ProjectorDistillLoss`, or None) and
    the loss terms in one module. ``forward(images, targets, teacher_features, teacher_logits)`` returns
    ``{term name: scalar}`` (see the module docstring)."""

    def __init__(
        self,
        student: nn.Module,
        projector_loss: ProjectorDistillLoss | None,
        method: str,
        soft_targets: bool,
        smoothing: float,
        kd_weight: float = 1.0,
        feature_weight: float = 1.0,
        kd_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if method == "projector" and projector_loss is None:
            raise UserError("distillation.method = projector needs a projector (the teacher's feature width)")
        self.student = student
        self.projector_loss = projector_loss if method == "projector" else None
        self.method = method
        if soft_targets:
            self.criterion = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.kd_weight = kd_weight
        self.feature_weight = feature_weight
        self.kd_temperature = kd_temperature

    @classmethod
    def from_config(
        cls, student: nn.Module, projector_loss: ProjectorDistillLoss | None, cfg: dict, soft_targets: bool
    ) -> DistillationObjective:
        """The objective of the recipe ``cfg`` (``distillation.*``, ``aug.smoothing``); ``soft_targets``: mixup or
        cutmix makes the targets soft."""
        distill = cfg["distillation"]
        return cls(
            student,
            projector_loss,
            distill["method"],
            soft_targets=soft_targets,
            smoothing=cfg["aug"]["smoothing"],
            kd_weight=distill["kd_weight"],
            feature_weight=distill["feature_weight"],
            kd_temperature=distill["kd_temperature"],
        )

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        tokens = self.student.forward_features(images)
        cls_logits, dist_logits = self.student.forward_heads(tokens)
        cls_logits, dist_logits = _at_least_fp32(cls_logits), _at_least_fp32(dist_logits)
        terms = {"ce": self.criterion(cls_logits, targets)}
        if self.method == "none":
            terms["ce_dist"] = self.criterion(dist_logits, targets)
            return terms
        terms["kd"] = self.kd_weight * kd_loss(dist_logits, _at_least_fp32(teacher_logits), self.kd_temperature)
        if self.projector_loss is not None:
            terms["proj"] = self.feature_weight * self.projector_loss(tokens[:, 2:], teacher_features)
        return terms
