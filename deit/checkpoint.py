"""Loading student checkpoints (release layout or this project's) safely and exactly.

Both layouts are ``{'model': state_dict, ...}``: the release adds ``optimizer``, ``lr_scheduler``, ``max_accuracy``,
``epoch`` and a pickled yacs ``config`` (read by :func:`projector_kd.engine.checkpoint.load_checkpoint` with
``weights_only=True``); this project adds scaler, RNG and sampler position (see :mod:`deit.engine`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from projector_kd.engine.checkpoint import CheckpointError, check_state_matches, load_checkpoint, state_mismatch
from projector_kd.engine.export import is_weights_export, load_weights_file

PROJECTOR_PREFIX = "distillation_loss."
logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What :func:`load_student_checkpoint` did: ``loaded`` keys, projector keys left out and why, checkpoint meta."""

    path: Path
    loaded: list[str]
    projector_skipped: list[str] = field(default_factory=list)
    projector_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def model_state(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The student state dict inside a checkpoint (``{'model': sd}`` or a raw state dict), without ``module.``."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path} holds no model state dict (expected a dict of tensors or {{"model": ...}})')
    return {k.removeprefix("module."): v for k, v in state.items()}


def _subset(state: dict, projector: bool) -> dict:
    """The projector's entries of ``state`` (``projector``) or all others."""
    return {k: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX) == projector}


def load_student_checkpoint(model: nn.Module, path: str | Path, *, trusted: bool = False) -> LoadReport:
    """Load a student checkpoint into ``model`` exactly; returns a :class:`LoadReport`.

    ``path``: a checkpoint (release or project layout), an exported folder or a ``.safetensors`` file
    (scripts/export.py; read without unpickling).

    Every key outside the projector (``distillation_loss.*``) must exist on both sides with the same shape, else
    CheckpointError naming the file and the keys (a wrong ``num_classes`` is named as such). The projector is not
    needed to predict: when its width differs from the model's, or one side has none, its keys are left out and the
    report says so (one warning line) instead of failing. Resuming training checks with :func:`check_resume_model`
    instead, where such a projector is an error.
    """
    path = Path(path)
    checkpoint = load_weights_file(path) if is_weights_export(path) else load_checkpoint(path, trusted=trusted)
    state = model_state(checkpoint, path)
    own = model.state_dict()
    if "head.weight" in state and "head.weight" in own and state["head.weight"].shape[0] != own["head.weight"].shape[0]:
        raise CheckpointError(
            f"{path} was trained for {state['head.weight'].shape[0]} classes but the model has "
            f"{own['head.weight'].shape[0]} (model.num_classes); set model.num_classes to match"
        )
    check_state_matches(
        _subset(own, projector=False),
        _subset(state, projector=False),
        path,
        f"the model ({type(model).__name__})",
        "check --model, the width (model.embed_dim/depth) and model.img_size",
    )
    proj_own, proj_ckpt = _subset(own, projector=True), _subset(state, projector=True)
    report = LoadReport(path=path, loaded=sorted(_subset(own, projector=False)), meta=_meta(checkpoint))
    if not state_mismatch(proj_own, proj_ckpt):
        report.loaded += sorted(proj_own)
    elif proj_ckpt or proj_own:
        report.projector_skipped = sorted(proj_ckpt)
        report.projector_note = (
            f"projector of {path} not loaded: checkpoint {_projector_shape(state)} vs model "
            f"{_projector_shape(own)}; predictions do not use it, but training would restart it"
        )
        logger.warning(report.projector_note)
    model.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report


def check_resume_model(model: nn.Module, checkpoint: Any, path: str | Path) -> None:
    """Before resuming training from ``checkpoint``: its ``model`` must hold exactly ``model``'s keys and shapes,
    the projector included (unlike evaluation, training would silently restart a projector it cannot load).
    Raises CheckpointError naming the file and what differs; a checkpoint without a ``model`` dict is left to the
    resume code."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        return
    own = model.state_dict()
    if state_mismatch(_subset(own, projector=True), _subset(state, projector=True)):
        raise CheckpointError(
            f"{path} cannot be resumed: its projector ({_projector_shape(state)}) differs from "
            f"this run's ({_projector_shape(own)}); resume with the distillation settings and "
            "teacher it was trained with, or start a new --output"
        )
    check_state_matches(
        own, state, path, f"this run's student ({type(model).__name__})", "use the same config or a new --output"
    )


def _projector_shape(state: dict) -> str:
    weight = state.get(PROJECTOR_PREFIX + "embed.weight")
    if weight is None:
        return "none" if not any(k.startswith(PROJECTOR_PREFIX) for k in state) else "non-linear projector"
    return f"Linear({weight.shape[1]}, {weight.shape[0]})"


def _meta(checkpoint: Any) -> dict[str, Any]:
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        return {}
    return {k: checkpoint[k] for k in ("epoch", "max_accuracy") if isinstance(checkpoint.get(k), (int, float))}
