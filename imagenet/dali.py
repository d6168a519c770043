"""The ResNet track's optional DALI loader (``--loader dali`` or ``runtime.loader: dali``): the shared
:class:`projector_kd.engine.dali.DaliLoader` in place of a torchdistill ``DataLoader``, with batches ``(images, targets,
{})`` as torchdistill's loop unpacks them. docs/dali.md says what it runs and what differs."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from projector_kd.engine import dali


class DaliLoader(dali.DaliLoader):
    """:class:`projector_kd.engine.dali.DaliLoader` yielding torchdistill's ``(images, targets, {})``."""

    def finish(self, images: torch.Tensor, labels: torch.Tensor, epoch: Any, number: int) -> tuple:
        return (*super().finish(images, labels, epoch, number), {})


def dali_loader(loader: DataLoader | None, device: torch.device, train: bool, name: str) -> DaliLoader | None:
    """``loader`` replaced by a :class:`DaliLoader` (None stays None)."""
    return None if loader is None else DaliLoader(loader, device, train=train, name=name)
