"""Teacher and student networks from a recipe's ``models`` section, with weights loaded safely and exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import get_model

from projector_kd.checkpoint import CheckpointError, load_checkpoint
from projector_kd.errors import UserError
from projector_kd.export import WEIGHTS_FILE, is_weights_export, load_weights_file

TORCHVISION_FILE = "torchvision_state_dict.safetensors"  # beside model.safetensors in an exported ResNet folder


def _mismatch(model: nn.Module, state: dict) -> str:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    parts = []
    if shapes:
        parts.append(f"shape mismatch {', '.join(shapes[:3])}" + (" ..." if len(shapes) > 3 else ""))
    if missing:
        parts.append(f"missing keys {missing[:3]}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    if unexpected:
        parts.append(
            f"unexpected keys {unexpected[:3]}" + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else "")
        )
    return "; ".join(parts)


def load_state_exactly(model: nn.Module, state: Any, path: str | Path, what: str) -> None:
    """``model.load_state_dict(state, strict=True)``, or one line naming the file and every kind of mismatch."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            f"checkpoint {path} holds no state dict for {what} — expected {{'model': state_dict, ...}}"
        )
    problem = _mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"checkpoint {path} does not match {what} ({type(model).__name__}): {problem} — "
            f"it was written for another model, width or num_classes"
        )
    model.load_state_dict(state, strict=True)


def read_checkpoint(path: str | Path, trusted: bool = False) -> Any:
    """The content of a checkpoint file, or the state dict of an exported folder (its torchvision weights, else
    ``model.safetensors``) or ``.safetensors`` file (see scripts/export.py)."""
    if is_weights_export(path):
        return load_weights_file(path, preferred=(TORCHVISION_FILE, WEIGHTS_FILE))
    return load_checkpoint(path, trusted=trusted)


def load_weights(model: nn.Module, path: str | Path, what: str, trusted: bool = False) -> dict:
    """Load ``{'model': state_dict, ...}`` (or a bare state dict, an exported folder or a ``.safetensors`` file) from
    ``path`` into ``model``; returns the file's content."""
    checkpoint = read_checkpoint(path, trusted=trusted)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    load_state_exactly(model, state, path, what)
    return checkpoint


def build_model(config: dict, name: str, distributed: bool) -> nn.Module:
    """The network described by ``models.<name>`` (torchvision first, then torchdistill's registry)."""
    kwargs = config.get("kwargs") or {}
    try:
        model = get_image_classification_model({**config, "kwargs": kwargs}, distributed)
        if model is None:
            model = get_model(config["key"], config.get("repo_or_dir"), **kwargs)
    except TypeError as error:
        raise UserError(f"models.{name}.kwargs: {error} — fix the argument name") from None
    except ValueError as error:
        raise UserError(f"models.{name}.key = {config['key']!r}: {error}") from None
    except (OSError, RuntimeError) as error:
        weights = kwargs.get("weights")
        raise UserError(
            f"models.{name}: could not get the pretrained weights {weights!r} for {config['key']} "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}) — put the file in "
            f"{torch.hub.get_dir()}/checkpoints or set models.{name}.src_ckpt (--teacher_ckpt)"
        ) from None
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def num_outputs(model: nn.Module) -> int | None:
    """The number of classes ``model`` predicts: the width of its last ``nn.Linear`` (None without one)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1].out_features if linears else None
