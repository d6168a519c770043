"""Projector-based knowledge distillation (Miles & Mikolajczyk, AAAI 2024): the method, once, for both tracks.

Public API: :class:`ProjectorDistillLoss`, :func:`kd_loss`, :func:`pool_features`, :class:`Whitening`.
Infrastructure shared by the tracks lives in the submodules ``checkpoint``, ``config``, ``data``, ``distributed``,
``errors``, ``fast``, ``models``, ``runs``, ``signals`` and ``steps``.
"""

from .losses import DISTANCES, PROJECTORS, ProjectorDistillLoss, Whitening, kd_loss, pool_features

__all__ = ["DISTANCES", "PROJECTORS", "ProjectorDistillLoss", "Whitening", "kd_loss", "pool_features"]
__version__ = "0.1.0"
