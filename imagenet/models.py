"""Teacher and student networks from a recipe's ``models`` section, with weights loaded safely and exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import get_model

from projector_kd.engine.checkpoint import load_checkpoint, load_state_exactly
from projector_kd.engine.errors import UserError
from projector_kd.engine.export import WEIGHTS_FILE, is_weights_export, load_weights_file

TORCHVISION_FILE = "torchvision_state_dict.safetensors"  # beside model.safetensors in an exported ResNet folder


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


def num_outputs(model: nn.Module) -> int | None:
    """The number of classes ``model`` predicts: the width of its last ``nn.Linear`` (None without one)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1].out_features if linears else None
