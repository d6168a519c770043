"""Export a ResNet-track student as a timm / Hugging Face folder (see :mod:`projector_kd.engine.export`).

Sources: a run folder's ``checkpoint.pth`` or best checkpoint (``dst_ckpt``; the recipe is read from the run's
``config.yaml``), or the release's torchdistill 0.x file (``{'model', 'optimizer', 'best_value', 'lr_scheduler',
'config', 'args'}``). The student is a torchvision ResNet; it is written as the timm ResNet of the same depth
(``model.safetensors``, ``config.json``) and as a torchvision state dict (``torchvision_state_dict.safetensors``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import nn

from imagenet.models import TORCHVISION_FILE
from projector_kd.engine.checkpoint import CheckpointError, check_state_matches, load_checkpoint, load_state_exactly
from projector_kd.engine.errors import UserError
from projector_kd.engine.export import EvalTransform, ModelCard, read_metrics, staged_output_dir, write_model_folder

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RELEASE_TEACHER = "torchvision `resnet34` (IMAGENET1K_V1, 73.31 % top-1)"


@dataclass
class ResNetSource:
    """A ResNet student read from a checkpoint: timm architecture, torchvision weights, recipe and provenance."""

    architecture: str
    state: dict[str, torch.Tensor]
    transform: EvalTransform
    recipe: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    release: bool = False


def torchvision_to_timm(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict under timm's names for ``model``: timm's ResNets use torchvision's parameter
    and buffer names (``conv1``, ``bn1``, ``layerN.M.{conv,bn}K``, ``downsample.{0,1}``, ``fc``), so the mapping is
    the identity; it is checked name by name and shape by shape (CheckpointError naming what differs)."""
    own = model.state_dict()
    check_state_matches(
        own,
        state,
        path,
        f"timm's {model.pretrained_cfg['architecture']}",
        "only torchvision ResNets of the same depth and num_classes map onto it",
    )
    return {k: state[k] for k in own}


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _transform_args(node: dict) -> tuple[str, dict]:
    """(transform class name, its arguments) of a recipe entry: torchdistill 1.x ``{'!import_call': {'key': ...,
    'init': {'kwargs': ...}}}`` (as a run's config.yaml records it) or 0.x ``{'type': ..., 'params': ...}``."""
    node = node.get("!import_call", node)
    name = str(node.get("key") or node.get("type") or "").rsplit(".", 1)[-1]
    args = (node.get("init") or {}).get("kwargs") or node.get("params") or node.get("kwargs") or {}
    return name, args if isinstance(args, dict) else {}


def eval_transform(recipe: dict | None) -> EvalTransform:
    """The evaluation transform a recipe describes (its Resize, CenterCrop and Normalize entries); the ImageNet
    recipe's (resize 256 bilinear, crop 224, ImageNet mean/std) for what it does not say."""
    found: dict[str, dict] = {}
    for node in _walk((recipe or {}).get("datasets", {})):
        name, args = _transform_args(node)
        if name in ("Resize", "CenterCrop", "Normalize") and name not in found and args:
            found[name] = args
    transform = EvalTransform()
    crop = found.get("CenterCrop", {}).get("size")
    if crop is not None:
        transform.img_size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    resize = found.get("Resize", {}).get("size")
    if isinstance(resize, (list, tuple)):
        resize = resize[0]
    transform.crop_pct = transform.img_size / int(resize) if resize else 1.0 if crop is not None else 0.875
    interpolation = found.get("Resize", {}).get("interpolation")
    if isinstance(interpolation, str):
        transform.interpolation = interpolation.rsplit(".", 1)[-1].lower()
    if "mean" in found.get("Normalize", {}):
        transform.mean = tuple(float(v) for v in found["Normalize"]["mean"])
        transform.std = tuple(float(v) for v in found["Normalize"]["std"])
    return transform


def _student_config(recipe: dict | None) -> dict:
    models = (recipe or {}).get("models", {})
    return models.get("student_model") or models.get("model") or {}


def _architecture(recipe: dict | None, state: dict[str, torch.Tensor], path: Path) -> str:
    """The timm ResNet for the student: the recipe's model name when timm has it, else the one whose parameter names
    and shapes the weights have."""
    name = _student_config(recipe).get("key") or _student_config(recipe).get("name")
    if name in RESNETS:
        return name
    num_classes = state["fc.weight"].shape[0]
    for candidate in RESNETS:
        with torch.device("meta"):
            own = timm.create_model(candidate, num_classes=num_classes).state_dict()
        if set(own) == set(state) and all(own[k].shape == state[k].shape for k in own):
            return candidate
    raise UserError(
        f"{path}: the student{f' {name!r}' if name else ''} is not a torchvision ResNet timm has "
        f"({', '.join(RESNETS)}); only those export to timm"
    )


def read_student(path: str | Path, trusted: bool = False, checkpoint: Any = None) -> ResNetSource:
    """The student in a ResNet-track checkpoint (this project's or the release's), with its recipe when known."""
    path = Path(path)
    if checkpoint is None:
        checkpoint = load_checkpoint(path, trusted=trusted)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no model state dict (expected a dict of tensors or {{'model': ...}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "fc.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise CheckpointError(f"{path} is not a ResNet checkpoint (no fc.weight / layer1.0.conv1.weight)")
    recipe = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    run_config = path.parent / "config.yaml"
    if run_config.is_file():
        try:
            recorded = yaml.safe_load(run_config.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError):  # a hand-edited record: the recipe's defaults are used
            recorded = {}
        recipe = recorded.get("recipe", recipe) if isinstance(recorded, dict) else recipe
    meta = {k: checkpoint[k] for k in ("epoch", "best_value") if isinstance(checkpoint.get(k), (int, float))}
    return ResNetSource(
        architecture=_architecture(recipe, state, path),
        state=state,
        transform=eval_transform(recipe),
        recipe=recipe,
        meta=meta,
        release="args" in checkpoint,
    )


def build_timm_student(source: ResNetSource, path: Path) -> nn.Module:
    """timm's ResNet with ``source``'s weights (exactly) and its evaluation transform as pretrained config."""
    model = timm.create_model(
        source.architecture,
        num_classes=source.state["fc.weight"].shape[0],
        pretrained_cfg_overlay=source.transform.pretrained_cfg(),
    )
    load_state_exactly(model, torchvision_to_timm(source.state, model, path), path, f"timm {source.architecture}")
    return model.eval()


def _component(node: Any) -> str | None:
    """``SGD {...}`` for a recipe's optimizer / scheduler entry (torchdistill 1.x ``key`` or 0.x ``type``)."""
    if not isinstance(node, dict) or not (node.get("key") or node.get("type")):
        return None
    return f"{node.get('key') or node.get('type')} {node.get('kwargs') or node.get('params') or {}}"


def model_card(source: ResNetSource, path: Path, params: int) -> ModelCard:
    """Title, metrics (the run's metrics.json when it names this checkpoint, else the checkpoint's best value),
    recipe and teacher."""
    recipe = source.recipe or {}
    teacher_config = recipe.get("models", {}).get("teacher_model") or {}
    teacher_name = teacher_config.get("key") or teacher_config.get("name")
    teacher = f"torchvision `{teacher_name}`" if teacher_name else RELEASE_TEACHER if source.release else "none"
    method = "projector KD" if teacher != "none" else "no distillation"
    train = recipe.get("train") if isinstance(recipe.get("train"), dict) else {}
    criterion = train.get("criterion") if isinstance(train.get("criterion"), dict) else {}
    terms = (criterion.get("kwargs") or {}).get("sub_terms") or {}
    summary = {
        "epochs": train.get("num_epochs"),
        "optimizer": _component(train.get("optimizer")),
        "scheduler": _component(train.get("scheduler")),
        "loss terms": ", ".join(terms) or None,
    }
    metrics: dict[str, Any] = {}
    run_metrics = read_metrics(path)
    if run_metrics.get("checkpoint") and Path(run_metrics["checkpoint"]).name == path.name:
        metrics = {
            "val top-1 (%)": run_metrics.get("top1"),
            "val top-5 (%)": run_metrics.get("top5"),
            "teacher val top-1 (%)": run_metrics.get("teacher_top1"),
        }
    if not any(v is not None for v in metrics.values()) and "best_value" in source.meta:
        metrics = {"best val top-1 (%) recorded in the checkpoint": source.meta["best_value"]}
    if "epoch" in source.meta:
        metrics["checkpoint epoch"] = source.meta["epoch"]
    return ModelCard(
        title=f"{source.architecture} ({method})",
        architecture=source.architecture,
        description=(
            f"ResNet student `{source.architecture}` ({source.state['fc.weight'].shape[0]} classes) from "
            f"the ResNet track of the paper's reference implementation, trained with {method} (the method: "
            "a linear projector, whitening and a soft-maximum distance on the last stage's pooled features, "
            f"plus logit KD). `{TORCHVISION_FILE}` holds the same weights for "
            f"`torchvision.models.{source.architecture}`."
        ),
        transform=source.transform,
        source=path.name,
        teacher=teacher,
        metrics={k: v for k, v in metrics.items() if v is not None},
        recipe={k: v for k, v in summary.items() if v is not None},
        params=params,
    )


def export_student(
    path: str | Path, output: str | Path, trusted: bool = False, force: bool = False, checkpoint: Any = None
) -> Path:
    """Write the student in checkpoint ``path`` to the folder ``output`` (timm + torchvision weights, config, card)."""
    path = Path(path)
    source = read_student(path, trusted, checkpoint)
    model = build_timm_student(source, path)
    card = model_card(source, path, sum(p.numel() for p in model.parameters()))
    with staged_output_dir(output, force, path) as staging:
        write_model_folder(
            model,
            staging,
            card,
            model_args={"num_classes": model.num_classes},
            extra_weights={TORCHVISION_FILE: source.state},
        )
    return Path(output)
