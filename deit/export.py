"""Export a DeiT-track student as a timm / Hugging Face folder (see :mod:`projector_kd.engine.export`).

Sources: this project's checkpoints (``checkpoint.pth``, ``ckpt_epoch_N.pth``: they carry the run's config) and the
release's files (``{'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config'}``), whose architecture is
read from the weights' shapes and the named or matching preset. The folder holds the student only (no projector).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from deit.checkpoint import PROJECTOR_PREFIX, model_state
from deit.models import EVAL_INTERPOLATION, STUDENT_PRESETS, TIMM_NAMES, ConvStemDeiT
from projector_kd.engine.checkpoint import CheckpointError, load_checkpoint, load_state_exactly
from projector_kd.engine.errors import UserError
from projector_kd.engine.export import EvalTransform, ModelCard, read_metrics, staged_output_dir, write_model_folder

ARCH_KEYS = ("embed_dim", "depth", "num_heads", "stem_channels", "stem_stride", "patch_size")
ARCH_DEFAULTS = {k: p.default for k, p in inspect.signature(ConvStemDeiT).parameters.items() if k in ARCH_KEYS}
METHODS = {
    "projector": "projector KD, distilled with a linear projector, whitening and a soft-maximum distance",
    "kd": "logit KD, distilled on the teacher's logits only",
    "none": "no distillation, trained on labels only",
}
RELEASE_TEACHER = "RegNetY-160 (timm `regnety_160`, DeiT's teacher, 82.6 % top-1)"


@dataclass
class StudentSource:
    """A student read from a checkpoint: its preset, timm architecture arguments, weights and provenance."""

    preset: str
    arch: dict[str, Any]
    state: dict[str, torch.Tensor]
    transform: EvalTransform
    run_config: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _run_config(checkpoint: dict) -> dict[str, Any] | None:
    """The run's config saved in this project's checkpoints (the release's pickled yacs config has other keys)."""
    cfg = checkpoint.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and "name" in cfg["model"]:
        return cfg
    return None


def _infer_arch(state: dict[str, torch.Tensor], preset: str | None, path: Path) -> tuple[str, dict[str, Any]]:
    """Preset and architecture arguments of a checkpoint without a run config: widths from the weights; heads and
    stem stride (not visible in the weights) from ``preset`` or the preset of the same width and depth."""
    embed_dim = state["pos_embed"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if preset is None:
        matches = [name for name, p in STUDENT_PRESETS.items() if (p["embed_dim"], p["depth"]) == (embed_dim, depth)]
        if len(matches) != 1:
            raise UserError(
                f"{path}: a student of width {embed_dim} and depth {depth} matches no preset; name it with "
                f"--model ({' | '.join(STUDENT_PRESETS)}) and check its number of heads"
            )
        preset = matches[0]
    defaults = {**ARCH_DEFAULTS, **STUDENT_PRESETS[preset]}
    stem_stride = defaults["stem_stride"]
    patch_size = state["conv_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 2)
    arch = {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": defaults["num_heads"],
        "stem_channels": state["conv_embed.conv.0.weight"].shape[0],
        "stem_stride": stem_stride,
        "patch_size": patch_size,
        "img_size": grid * stem_stride * patch_size,
        "num_classes": state["head.weight"].shape[0],
    }
    return preset, arch


def read_student(
    path: str | Path, preset: str | None = None, trusted: bool = False, checkpoint: Any = None
) -> StudentSource:
    """The student in a DeiT-track checkpoint (project or release layout), without its projector. ``checkpoint``:
    the file's content when already loaded."""
    path = Path(path)
    if preset is not None and preset not in STUDENT_PRESETS:
        raise UserError(f"unknown student model {preset!r}; choose one of {sorted(STUDENT_PRESETS)}")
    if checkpoint is None:
        checkpoint = load_checkpoint(path, trusted=trusted)
    state = model_state(checkpoint, path)
    missing = [
        k for k in ("pos_embed", "conv_embed.proj.weight", "conv_embed.conv.0.weight", "head.weight") if k not in state
    ]
    if missing:
        raise CheckpointError(f"{path} is not a conv-stem DeiT checkpoint (no {', '.join(missing)})")
    body = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    cfg = _run_config(checkpoint) if isinstance(checkpoint, dict) else None
    transform = EvalTransform(interpolation=EVAL_INTERPOLATION)
    if cfg is not None:
        model = cfg["model"]
        preset = preset or str(model["name"]).removeprefix("deit_conv_")
        if preset not in STUDENT_PRESETS:
            raise UserError(f"{path}: model.name={model['name']!r} is no student preset; name one with --model")
        defaults = {**ARCH_DEFAULTS, **STUDENT_PRESETS[preset]}
        arch = {k: model[k] if model.get(k) is not None else defaults[k] for k in ARCH_KEYS}
        arch.update(img_size=model["img_size"], num_classes=model["num_classes"])
        transform = EvalTransform(
            img_size=model["img_size"],
            crop_pct=cfg["data"]["crop_pct"],
            interpolation=cfg["data"].get("eval_interpolation", EVAL_INTERPOLATION),
        )
    else:
        preset, arch = _infer_arch(body, preset, path)
        transform.img_size = arch["img_size"]
        if preset == "demo":
            transform.crop_pct = 1.0
    meta = {
        k: checkpoint[k]
        for k in ("epoch", "max_accuracy")
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(k), (int, float))
    }
    return StudentSource(preset=preset, arch=arch, state=body, transform=transform, run_config=cfg, meta=meta)


def timm_args(source: StudentSource) -> dict[str, Any]:
    """``timm.create_model`` arguments rebuilding ``source``'s architecture from its preset: the number of classes,
    the image size and what differs from the preset."""
    preset_args = STUDENT_PRESETS[source.preset]
    return {
        k: v
        for k, v in source.arch.items()
        if k in ("num_classes", "img_size") or v != preset_args.get(k, ARCH_DEFAULTS.get(k))
    }


def build_timm_student(source: StudentSource, path: Path) -> ConvStemDeiT:
    """The timm model ``deit_conv_<preset>`` with ``source``'s weights loaded exactly and its evaluation transform as
    pretrained config."""
    args = timm_args(source)
    model = timm.create_model(
        TIMM_NAMES[source.preset], pretrained_cfg_overlay=source.transform.pretrained_cfg(), **args
    )
    load_state_exactly(model, source.state, path, f"student {TIMM_NAMES[source.preset]}")
    return model.eval()


def model_card(source: StudentSource, path: Path, params: int) -> ModelCard:
    """Title, metrics (the run's metrics.json when it describes this checkpoint, else the checkpoint's best accuracy),
    recipe and teacher of the exported student."""
    cfg = source.run_config
    name = TIMM_NAMES[source.preset]
    metrics: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    run_metrics = read_metrics(path)
    if cfg is not None:
        if run_metrics and run_metrics.get("epochs") == source.meta.get("epoch"):
            metrics = {
                "val top-1 (%)": run_metrics.get("top1"),
                "val top-5 (%)": run_metrics.get("top5"),
                "best val top-1 (%)": run_metrics.get("max_top1"),
            }
        distill, train, data = cfg["distillation"], cfg["train"], cfg["data"]
        recipe = {
            "method": distill["method"],
            "epochs": train["epochs"],
            "distance": distill["distance"],
            "projector": distill["projector"],
            "feature / KD weights": f"{distill['feature_weight']} / {distill['kd_weight']}",
            "optimizer": f"AdamW, base lr {train['base_lr']} per {train['lr_scale_batch']} images, "
            f"weight decay {train['weight_decay']}",
            "batch size per process": data["batch_size"],
            "seed": cfg["seed"],
        }
        teacher = f"timm `{cfg['teacher']['name']}`" if distill["method"] != "none" else "none"
    else:
        recipe = {
            "recipe": "the original release's DeiT recipe (300 epochs, AdamW, RegNetY-160 teacher, "
            "log_corr distance, linear projector)"
        }
        teacher = RELEASE_TEACHER
    if not metrics and "max_accuracy" in source.meta:
        metrics = {"best val top-1 (%) recorded in the checkpoint": source.meta["max_accuracy"]}
    if "epoch" in source.meta:
        metrics["checkpoint epoch"] = source.meta["epoch"]
    method = cfg["distillation"]["method"] if cfg is not None else "projector"
    description = (
        f"Conv-stem DeiT student `{name}` ({source.arch['embed_dim']} wide, depth {source.arch['depth']}, "
        f"{source.arch['num_classes']} classes, {source.arch['img_size']} px), {METHODS[method]}. "
        "Prediction: the mean of the class-token and conv-token heads."
    )
    return ModelCard(
        title=f"{name} ({METHODS[method].split(',')[0]})",
        architecture=name,
        description=description,
        transform=source.transform,
        source=path.name,
        teacher=teacher,
        metrics={k: v for k, v in metrics.items() if v is not None},
        recipe=recipe,
        params=params,
    )


def export_student(
    path: str | Path,
    output: str | Path,
    preset: str | None = None,
    trusted: bool = False,
    force: bool = False,
    checkpoint: Any = None,
) -> Path:
    """Write the student in checkpoint ``path`` to the folder ``output``; returns ``output``."""
    path = Path(path)
    source = read_student(path, preset, trusted, checkpoint)
    model = build_timm_student(source, path)
    card = model_card(source, path, sum(p.numel() for p in model.parameters()))
    with staged_output_dir(output, force, path) as staging:
        write_model_folder(model, staging, card, model_args=timm_args(source))
    return Path(output)
