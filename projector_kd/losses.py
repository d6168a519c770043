"""Projector-based feature distillation and logit KD (Miles & Mikolajczyk, AAAI 2024).

Notation: z_s (B, d_s) pooled student feature, z_t (B, d_t) pooled teacher feature (no gradient).

    p = W z_s + b                          projector (``embed``)
    s = BN_s(p),  t = BN_t(z_t)            affine-free batch whitening (``bn_s``, ``bn_t``)

Distances (alpha = ``exponent``):

    log_diff:  L = log sum_{b,d} |s_bd - t_bd|^alpha
    log_corr:  c_d = (1/B) sum_b s_bd t_bd,   L = log( sum_d |c_d - 1|^alpha + 1e-5 )
    bn_mse:    L = mean_{b,d} (s_bd - t_bd)^2
    mse:       L = mean_{b,d} (p_bd - z_t,bd)^2           (no whitening)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

DISTANCES = ("log_diff", "log_corr", "mse", "bn_mse")
PROJECTORS = ("linear", "orthogonal", "identity")
LOG_CORR_OFFSET = 1e-5


def pool_features(x: torch.Tensor) -> torch.Tensor:
    """Pool a feature map to (B, D): (B,C,H,W) -> mean over H,W; (B,N,D) -> mean over N; (B,D) unchanged."""
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        return x.mean(dim=1)
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    raise ValueError(f"features must have shape (B,D), (B,N,D) or (B,C,H,W); got shape {tuple(x.shape)}")


class Whitening(nn.Module):
    """Batch normalisation without affine parameters, accepting ``eps = 0``.

    Training: y = (x - mean_B(x)) / sqrt(var_B(x) + eps) with the biased batch variance, and the running statistics are
    updated as ``nn.BatchNorm1d`` does (momentum 0.1, unbiased variance). Eval: the running statistics are used instead.
    A channel whose denominator is zero (constant channel with eps = 0) is whitened to 0 with zero gradient, never NaN.
    With eps > 0 the output equals ``nn.BatchNorm1d(dim, eps=eps, affine=False)`` in both modes.
    """

    def __init__(self, num_features: int, eps: float = 1e-4, momentum: float = 0.1) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"whitening eps must be >= 0, got {eps}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean = x.mean(dim=0)
            var = x.var(dim=0, unbiased=False)
            with torch.no_grad():
                n = x.shape[0]
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var.detach().to(self.running_var.dtype) * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased, self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean = self.running_mean.to(x.dtype)
            var = self.running_var.to(x.dtype)
        denom_sq = var + self.eps
        dead = denom_sq <= 0
        safe_denom = torch.where(dead, torch.ones_like(denom_sq), denom_sq).sqrt()
        return torch.where(dead, torch.zeros_like(x), (x - mean) / safe_denom)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine=False"


def _build_projector(kind: str, student_dim: int, teacher_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(student_dim, teacher_dim)
    if kind == "orthogonal":
        return parametrizations.orthogonal(nn.Linear(student_dim, teacher_dim, bias=False))
    if kind == "identity":
        if student_dim != teacher_dim:
            raise ValueError(
                f"projector='identity' needs student_dim == teacher_dim, got {student_dim} != {teacher_dim}"
            )
        return nn.Identity()
    raise ValueError(f"unknown projector {kind!r}; choose one of {', '.join(PROJECTORS)}")


class ProjectorDistillLoss(nn.Module):
    """Feature distillation through a trainable projector and batch whitening (see the module docstring).

    ``forward(student_features, teacher_features)`` takes (B,D), (B,N,D) or (B,C,H,W) tensors on either side, pools them
    with :func:`pool_features` and returns a scalar (whitening and distance run in at least float32, also under
    autocast). Teacher features are detached. Training mode whitens with batch statistics on both sides (whatever mode
    the teacher network is in); eval mode uses the running statistics.

    State-dict names: ``embed.weight``/``embed.bias`` (``linear``), ``embed.parametrizations.weight.original`` and
    ``embed.parametrizations.weight.0.base`` (``orthogonal``), nothing for ``identity``; ``bn_s.*`` and ``bn_t.*``
    hold ``running_mean``, ``running_var``, ``num_batches_tracked``. The released DeiT checkpoints name the same
    tensors ``distillation_loss.<name>``.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        distance: str = "log_diff",
        exponent: float = 4.0,
        eps: float = 1e-4,
        projector: str = "linear",
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
        if exponent <= 0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.distance = distance
        self.exponent = float(exponent)
        self.check_inputs = check_inputs
        self.embed = _build_projector(projector, student_dim, teacher_dim)
        self.projector = projector
        self.bn_s = Whitening(teacher_dim, eps=eps)
        self.bn_t = Whitening(teacher_dim, eps=eps)

    def _validate(self, z_s: torch.Tensor, z_t: torch.Tensor) -> None:
        if z_s.shape[0] != z_t.shape[0]:
            raise ValueError(f"student and teacher batch sizes differ: {z_s.shape[0]} vs {z_t.shape[0]}")
        if z_s.shape[1] != self.student_dim:
            raise ValueError(f"student features have width {z_s.shape[1]}, the projector expects {self.student_dim}")
        if z_t.shape[1] != self.teacher_dim:
            raise ValueError(f"teacher features have width {z_t.shape[1]}, the projector expects {self.teacher_dim}")
        if self.training and z_s.shape[0] < 2:
            raise ValueError("batch size 1 in training: batch whitening needs at least 2 samples per batch (per GPU)")
        if not (torch.isfinite(z_s).all() and torch.isfinite(z_t).all()):
            raise ValueError("non-finite values (NaN or inf) in the student or teacher features")

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        z_s = pool_features(student_features)
        z_t = pool_features(teacher_features.detach())
        if self.check_inputs:
            self._validate(z_s, z_t)
        p = self.embed(z_s)
        dtype = torch.promote_types(p.dtype, torch.float32)
        p, z_t = p.to(dtype), z_t.to(dtype)
        if self.distance == "mse":
            return F.mse_loss(p, z_t)
        s = self.bn_s(p)
        t = self.bn_t(z_t)
        if self.distance == "bn_mse":
            return F.mse_loss(s, t)
        if self.distance == "log_diff":
            return (s - t).abs().pow(self.exponent).sum().log()
        corr = (s * t).mean(dim=0)
        return ((corr - 1).abs().pow(self.exponent).sum() + LOG_CORR_OFFSET).log()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL( softmax(y_t/T) || softmax(y_s/T) ) * T^2, averaged over the batch (``batchmean``); no gradient to the
    teacher."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(log_p_s.dtype) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
