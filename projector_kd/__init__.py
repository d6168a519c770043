"""Projector-based knowledge distillation (Miles & Mikolajczyk, AAAI 2024): the method, once, for both tracks.

Public API: :class:`ProjectorDistillLoss`, :func:`kd_loss`, :func:`pool_features`, :class:`Whitening`.
The run kit both tracks share lives in the submodules ``checkpoint`` (atomic saves, safe loads, exact state-dict
loading), ``config``, ``data``, ``distributed``, ``errors``, ``evaluation`` (top-1/top-5), ``export`` (timm / Hugging
Face folders), ``fast`` (compile fallback, CUDA flags), ``models`` (parameter counts), ``parity`` (fast path vs
reference checks), ``runs`` (run folders, logs), ``sampling`` (resumable sharded sampling), ``signals`` and ``steps``
(training steps without host reads).
"""

from .losses import DISTANCES, PROJECTORS, ProjectorDistillLoss, Whitening, kd_loss, pool_features

__all__ = ["DISTANCES", "PROJECTORS", "ProjectorDistillLoss", "Whitening", "kd_loss", "pool_features"]
__version__ = "0.1.0"
