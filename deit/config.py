"""The DeiT recipe as data: ``configs/deit/<model>.yaml``, an optional ``--config`` file merged over it, CLI flags,
then ``--opts KEY VALUE`` overrides; validated against :data:`SCHEMA` before any work."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from projector_kd.engine.config import apply_overrides, load_yaml, merge_configs, validate
from projector_kd.engine.distributed import DEVICE_NAMES, is_device_name
from projector_kd.engine.errors import UserError

_CHECKOUT_RECIPES = Path(__file__).resolve().parents[1] / "configs" / "deit"
# a checkout reads configs/deit; an installed copy reads the same files shipped as deit/recipes (setup.cfg)
CONFIG_DIR = _CHECKOUT_RECIPES if _CHECKOUT_RECIPES.is_dir() else Path(__file__).resolve().parent / "recipes"
DEFAULT_IMAGENET_ROOT = "~/datasets/ilsvrc2012"
METHODS = ("none", "kd", "projector")
RENAMED_KEYS = {"distillation.proj_weight": "distillation.feature_weight"}  # old name -> name shared with ResNet
logger = logging.getLogger(__name__)


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _probability(v: float) -> bool:
    return 0 <= v <= 1


POSITIVE = (_positive, "> 0")
NON_NEGATIVE = (_non_negative, ">= 0")
PROBABILITY = (_probability, "in [0, 1]")


def _one_of(*choices: str) -> tuple:
    return (lambda v: v in choices, f"one of {', '.join(choices)}")


SCHEMA: dict[str, tuple] = {
    "seed": (int, NON_NEGATIVE),
    "fast": (bool, None),
    "output": (str, None),
    "device": ((str, type(None)), (is_device_name, DEVICE_NAMES)),
    "model.name": (str, _one_of("tiny", "small", "demo")),
    "model.num_classes": (int, POSITIVE),
    "model.img_size": (int, POSITIVE),
    "model.embed_dim": ((int, type(None)), POSITIVE),
    "model.depth": ((int, type(None)), POSITIVE),
    "model.num_heads": ((int, type(None)), POSITIVE),
    "model.drop_path": (float, PROBABILITY),
    "model.stem_channels": ((int, type(None)), POSITIVE),
    "model.stem_stride": (int, POSITIVE),
    "model.patch_size": (int, POSITIVE),
    "model.init": (str, _one_of("release", "deit")),
    "teacher.name": (str, None),
    "teacher.ckpt": ((str, type(None)), None),
    "teacher.hub_tag": ((str, type(None)), None),
    "teacher.trusted": (bool, None),
    "distillation.method": (str, _one_of(*METHODS)),
    "distillation.distance": (str, _one_of("log_corr", "log_diff", "mse", "bn_mse")),
    "distillation.projector": (str, _one_of("linear", "orthogonal", "identity")),
    "distillation.eps": (float, NON_NEGATIVE),
    "distillation.exponent": (float, POSITIVE),
    "distillation.feature_weight": (float, NON_NEGATIVE),
    "distillation.kd_weight": (float, NON_NEGATIVE),
    "distillation.kd_temperature": (float, POSITIVE),
    "data.path": ((str, type(None)), None),
    "data.batch_size": (int, POSITIVE),
    "data.eval_batch_size": ((int, type(None)), POSITIVE),
    "data.num_workers": (int, NON_NEGATIVE),
    "data.pin_memory": (bool, None),
    "data.interpolation": (str, _one_of("bicubic", "bilinear", "nearest")),
    "data.eval_interpolation": (str, _one_of("bicubic", "bilinear", "nearest")),
    "data.crop_pct": (float, (lambda v: 0 < v <= 1, "in (0, 1]")),
    "data.on_bad_image": (str, _one_of("fail", "skip")),
    "data.fast_loader": (bool, None),
    "data.loader": (str, _one_of("torchvision", "dali")),
    "aug.scale": (
        list,
        (
            lambda v: len(v) == 2 and all(isinstance(b, (int, float)) for b in v) and 0 < v[0] <= v[1] <= 1,
            "two numbers 0 < lo <= hi <= 1",
        ),
    ),
    "aug.hflip": (float, PROBABILITY),
    "aug.rand_augment": ((str, type(None)), None),
    "aug.color_jitter": ((float, type(None)), NON_NEGATIVE),
    "aug.reprob": (float, PROBABILITY),
    "aug.remode": (str, _one_of("pixel", "rand", "const")),
    "aug.recount": (int, POSITIVE),
    "aug.mixup": (float, NON_NEGATIVE),
    "aug.cutmix": (float, NON_NEGATIVE),
    "aug.cutmix_minmax": ((list, type(None)), None),
    "aug.mixup_prob": (float, PROBABILITY),
    "aug.mixup_switch_prob": (float, PROBABILITY),
    "aug.mixup_mode": (str, _one_of("batch", "pair", "elem")),
    "aug.smoothing": (float, (lambda v: 0 <= v < 1, "in [0, 1)")),
    "train.epochs": (int, POSITIVE),
    "train.base_lr": (float, POSITIVE),
    "train.warmup_lr": (float, NON_NEGATIVE),
    "train.min_lr": (float, NON_NEGATIVE),
    "train.lr_scale_batch": (int, POSITIVE),
    "train.warmup_epochs": (float, NON_NEGATIVE),
    "train.weight_decay": (float, NON_NEGATIVE),
    "train.betas": (
        list,
        (lambda v: len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ),
    "train.opt_eps": (float, POSITIVE),
    "train.clip_grad": ((float, type(None)), POSITIVE),
    "train.amp": (bool, None),
    "train.clip_scaled_grads": (bool, None),
    "train.lr_after_step": (bool, None),
    "train.accum_iter": (int, POSITIVE),
    "train.save_freq": (int, POSITIVE),
    "train.eval_freq": (int, POSITIVE),
    "train.log_freq": (int, POSITIVE),
}


def recipe_path(model: str) -> Path:
    """The recipe file for a model preset: ``configs/deit/<model>.yaml``."""
    path = CONFIG_DIR / f"{model}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"unknown model {model!r} (no recipe {path}); choose one of {', '.join(known)}")
    return path


def _warn_renamed(old: str, new: str, source: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process tells the user
        return
    logger.warning("%s: %s is now called %s; rename it (the old name still works)", source, old, new)


def rename_old_keys(tree: dict, source: str, warn: bool = True) -> dict:
    """``tree`` (a config file's content) with keys of :data:`RENAMED_KEYS` under their new names, one warning line
    per renamed key (unless ``warn`` is False); both names at once is a UserError."""
    for old, new in RENAMED_KEYS.items():
        *parents, old_leaf = old.split(".")
        new_leaf = new.split(".")[-1]
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        if new_leaf in node:
            raise UserError(f"{source}: {old} and {new} are the same setting — keep only {new}")
        if warn:
            _warn_renamed(old, new, source)
        node[new_leaf] = node.pop(old_leaf)
    return tree


def rename_old_opts(opts: Sequence[str]) -> list[str]:
    """``--opts KEY VALUE ...`` with keys of :data:`RENAMED_KEYS` under their new names (one warning line each)."""
    renamed = list(opts)
    for index in range(0, len(renamed) - 1, 2):
        if renamed[index] in RENAMED_KEYS:
            new = RENAMED_KEYS[renamed[index]]
            _warn_renamed(renamed[index], new, "--opts")
            renamed[index] = new
    return renamed


def imagenet_root() -> str:
    """Where ``data.path: null`` points: ``$IMAGENET_ROOT``, by default ~/datasets/ilsvrc2012 (user folder expanded)."""
    return os.path.expanduser(os.environ.get("IMAGENET_ROOT", DEFAULT_IMAGENET_ROOT))


def data_path_hint(cfg: dict) -> str:
    """How to point the run at its data: ``--data-path``, and ``IMAGENET_ROOT`` where ``data.path`` is the folder that
    variable gives (what ``data.path: null`` reads; a recipe that names its folder, as the demo's, ignores it)."""
    if cfg["data"]["path"] == imagenet_root():
        return "pass --data-path DIR or set IMAGENET_ROOT"
    return "pass --data-path DIR"


def load_config(
    model: str, config_file: str | None = None, flags: dict[str, Any] | None = None, opts: Sequence[str] = ()
) -> dict:
    """Resolve the run's config: ``configs/deit/<model>.yaml`` <- ``config_file`` <- ``flags`` (dotted keys set by CLI
    flags; None values are ignored) <- ``opts``. Unknown keys, wrong types and out-of-range values raise UserError;
    old key names (:data:`RENAMED_KEYS`) in ``config_file`` or ``opts`` are read under their new names with a warning.
    ``data.path: null`` reads ``$IMAGENET_ROOT`` (default ~/datasets/ilsvrc2012), as the ResNet track's recipe does."""
    cfg = load_yaml(recipe_path(model))
    if config_file:
        overlay = rename_old_keys(load_yaml(config_file), str(config_file))
        validate(overlay, SCHEMA, source=str(config_file))
        cfg = merge_configs(cfg, overlay)
    cfg["model"]["name"] = model
    for dotted, value in (flags or {}).items():
        if value is not None:
            *parents, leaf = dotted.split(".")
            node = cfg
            for part in parents:
                node = node[part]
            node[leaf] = value
    cfg = apply_overrides(cfg, rename_old_opts(opts), check_file=lambda merged: validate(merged, SCHEMA))
    validate(cfg, SCHEMA)
    if cfg["data"]["loader"] == "dali":
        from projector_kd.engine.dali import require_dali

        require_dali()  # before any work: one line saying how to install it
    if cfg["data"]["path"] is None:
        cfg["data"]["path"] = imagenet_root()
    if cfg["aug"]["mixup"] > 0 or cfg["aug"]["cutmix"] > 0:
        if cfg["data"]["batch_size"] % 2:
            raise UserError(f"data.batch_size = {cfg['data']['batch_size']} must be even with mixup/cutmix on")
    return cfg


def scaled_lrs(cfg: dict, world_size: int) -> dict[str, float]:
    """Base, warm-up and minimum learning rates scaled by global batch / ``train.lr_scale_batch``, where global batch =
    data.batch_size x train.accum_iter x world size (docs/method.md, DeiT recipe)."""
    train = cfg["train"]
    scale = cfg["data"]["batch_size"] * train["accum_iter"] * world_size / train["lr_scale_batch"]
    return {"lr": train["base_lr"] * scale, "warmup_lr": train["warmup_lr"] * scale, "min_lr": train["min_lr"] * scale}


def precision(cfg: dict, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, channels_last) of the recipe on ``device``: on CUDA bf16 + channels_last on the fast path,
    fp16 when ``train.amp``; float32 and the default layout otherwise."""
    cuda = device.type == "cuda"
    fast = cfg["fast"]
    autocast_dtype = (torch.bfloat16 if fast else torch.float16) if cuda and (fast or cfg["train"]["amp"]) else None
    return autocast_dtype, fast and cuda
