"""Projector-based knowledge distillation (Miles & Mikolajczyk, AAAI 2024): the method, once, for both tracks.

A linear projector on the student's pooled features, batch whitening of both sides and a soft-maximum distance
(:class:`ProjectorDistillLoss`), plus logit distillation (:func:`kd_loss`). What the two training tracks share to run
the method (loop, checkpoints, data, torchrun) is the subpackage :mod:`projector_kd.engine`.
"""

from .losses import DISTANCES, PROJECTORS, ProjectorDistillLoss, Whitening, kd_loss, pool_features

__all__ = ["DISTANCES", "PROJECTORS", "ProjectorDistillLoss", "Whitening", "kd_loss", "pool_features"]
__version__ = "0.1.0"
