"""DeiT-track checkpoints: the release's layout and this project's, loaded safely and exactly.

Every layout is ``{'model': state_dict, ...}``. The release adds ``optimizer``, ``lr_scheduler``, ``max_accuracy``,
``epoch`` and a pickled yacs ``config`` (read by :func:`projector_kd.engine.checkpoint.load_checkpoint` with
``weights_only=True``), and keeps the projector inside the student's keys as ``distillation_loss.*``. This project's
layouts carry a ``format`` tag: :data:`CHECKPOINT_FORMAT` (``projector_kd.deit/2``) holds the student alone under
``model`` and the projector under ``projector`` (the run's fields are :mod:`projector_kd.engine.loop`'s);
``projector_kd.deit/1`` held the projector inside ``model`` as the release does, the optimizer's parameter groups as
(decay, no decay), and named the position ``next_batch`` and the best top-1 ``max_accuracy``
(:func:`upgrade_checkpoint` reads it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from projector_kd.engine.checkpoint import CheckpointError, check_state_matches, load_checkpoint, load_state_exactly
from projector_kd.engine.export import is_weights_export, load_weights_file

CHECKPOINT_FORMAT = "projector_kd.deit/2"
EARLIER_FORMAT = "projector_kd.deit/1"
PROJECTOR_PREFIX = "distillation_loss."
logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What :func:`load_student_checkpoint` did: the ``loaded`` keys, the projector's keys left out, checkpoint meta."""

    path: Path
    loaded: list[str]
    projector_skipped: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def model_state(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The student state dict inside a checkpoint (``{'model': sd}`` or a raw state dict), without ``module.`` and
    without the release's projector keys (``distillation_loss.*``)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path} holds no model state dict (expected a dict of tensors or {{"model": ...}})')
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}


def projector_state(checkpoint: Any) -> dict[str, torch.Tensor] | None:
    """The projector's state in a checkpoint of any layout (``projector``, or the release's ``distillation_loss.*``
    keys of ``model``), or None when it holds none."""
    if not isinstance(checkpoint, dict):
        return None
    if checkpoint.get("projector") is not None:
        return checkpoint["projector"]
    state = checkpoint.get("model")
    if not isinstance(state, dict):
        return None
    inner = {k.removeprefix("module."): v for k, v in state.items()}
    found = {k.removeprefix(PROJECTOR_PREFIX): v for k, v in inner.items() if k.startswith(PROJECTOR_PREFIX)}
    return found or None


def load_student_checkpoint(model: nn.Module, path: str | Path, *, trusted: bool = False) -> LoadReport:
    """Load a student checkpoint into ``model`` exactly; returns a :class:`LoadReport`.

    ``path``: a checkpoint (release or project layout), an exported folder or a ``.safetensors`` file
    (scripts/export.py; read without unpickling). Every student key must exist on both sides with the same shape,
    else CheckpointError naming the file and the keys (a wrong ``num_classes`` is named as such). The projector is not
    needed to predict: its keys are left out (and listed in the report).
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
        own,
        state,
        path,
        f"the model ({type(model).__name__})",
        "check --model, the width (model.embed_dim/depth) and model.img_size",
    )
    model.load_state_dict(state, strict=True)
    projector = projector_state(checkpoint) or {}
    return LoadReport(
        path=path, loaded=sorted(state), projector_skipped=sorted(projector), meta=checkpoint_meta(checkpoint)
    )


def check_resume_state(student: nn.Module, projector: nn.Module | None, checkpoint: dict, path: str | Path) -> None:
    """Before resuming training from ``checkpoint`` (today's layout): load its ``model`` into ``student`` and its
    ``projector`` into ``projector`` exactly, or raise CheckpointError naming the file and what differs (unlike
    evaluation, training would silently restart a projector it cannot load)."""
    saved = checkpoint.get("projector")
    if (saved is None) != (projector is None):
        raise CheckpointError(
            f"{path} cannot be resumed: it was trained {'without' if saved is None else 'with'} a projector and this "
            f"run {'has' if projector is not None else 'has none'} — resume with the distillation settings it was "
            "trained with, or start a new --output"
        )
    hint = "use the same config or a new --output"
    load_state_exactly(student, checkpoint["model"], path, "this run's student", hint=hint)
    if projector is not None:
        load_state_exactly(projector, saved, path, "this run's projector (teacher width, distillation.projector)", hint)


def load_resume_state(track: Any, state: dict, path: str | Path) -> None:
    """Resume a :class:`deit.engine.DeiTTrack` from ``state`` (today's layout): student and projector
    (:func:`check_resume_state`), optimizer, schedule and GradScaler, or one line naming the file and the mismatch."""
    check_resume_state(track.student_module, track.projector_loss, state, path)
    try:
        track.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path} does not match this run's optimizer ({str(err).splitlines()[0]}); use the same config or a "
            "new --output"
        ) from None
    track.scheduler.load_state_dict(state["lr_scheduler"])
    if track.scaler is not None and state["scaler"] is not None:
        track.scaler.load_state_dict(state["scaler"])


def checkpoint_meta(checkpoint: Any) -> dict[str, Any]:
    """The ``epoch`` and the best top-1 (``best_top1``; the release's ``max_accuracy``) a checkpoint records."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        return {}
    meta = {k: checkpoint[k] for k in ("epoch", "best_top1") if isinstance(checkpoint.get(k), (int, float))}
    if "best_top1" not in meta and isinstance(checkpoint.get("max_accuracy"), (int, float)):
        meta["best_top1"] = checkpoint["max_accuracy"]
    return meta


def upgrade_checkpoint(state: Any, path: Path, cfg: dict) -> Any:
    """A ``projector_kd.deit/1`` checkpoint in today's layout (any other content unchanged): the projector moves out
    of ``model``, the optimizer's two parameter groups swap to (no decay, decay) as timm orders them, and the
    position, best top-1 and history take today's names. ``cfg``: this run's config (its ``eval_freq`` says which
    of the recorded epochs were validated)."""
    if not isinstance(state, dict) or state.get("format") != EARLIER_FORMAT:
        return state
    groups = state["optimizer"]["param_groups"]
    if len(groups) != 2:
        raise CheckpointError(
            f"{path} ({EARLIER_FORMAT}) has {len(groups)} parameter groups, expected 2 — use a new --output"
        )
    history = state["history"]
    eval_freq, epochs = cfg["train"]["eval_freq"], cfg["train"]["epochs"]
    validated = [e for e in history["epoch"] if (e + 1) % eval_freq == 0 or e == epochs - 1]
    return {
        **{k: v for k, v in state.items() if k not in ("next_batch", "max_accuracy")},
        "format": CHECKPOINT_FORMAT,
        "model": model_state(state, path),
        "projector": projector_state(state),
        "optimizer": {**state["optimizer"], "param_groups": [groups[1], groups[0]]},
        "step_in_epoch": state["next_batch"],
        "best_top1": state["max_accuracy"],
        "history": {**history, "val_epoch": validated[: len(history["val_top1"])]},
    }
