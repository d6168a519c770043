"""Network helpers shared by both tracks."""

from __future__ import annotations

from torch import nn

from ..losses import ProjectorDistillLoss


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts ``{"student", "projector", "total"}`` of ``model``: ``projector`` counts the parameters of its
    :class:`ProjectorDistillLoss` submodules (the projector and its normalisation, dropped after training),
    ``student`` the others, ``total = student + projector``. A network without a projector has ``projector = 0``."""
    projector_ids = {
        id(p) for module in model.modules() if isinstance(module, ProjectorDistillLoss) for p in module.parameters()
    }
    student = sum(p.numel() for p in model.parameters() if id(p) not in projector_ids)
    projector = sum(p.numel() for p in model.parameters() if id(p) in projector_ids)
    return {"student": student, "projector": projector, "total": student + projector}
