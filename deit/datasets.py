"""ImageFolder data for the DeiT track: the recipe's transforms, loaders, mixup/cutmix.

Exact resume comes from the shared samplers of :mod:`projector_kd.engine.sampling`: a run resumed at batch k of an epoch
sees exactly the batches an uninterrupted run sees, and never reads the k batches already trained.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment
from torch.utils.data import DataLoader
from torchvision import transforms

from deit.config import data_path_hint
from projector_kd.engine.data import CheckedImageFolder, DataError, check_image_folder, check_num_classes
from projector_kd.engine.fast_data import fast_training_loader
from projector_kd.engine.sampling import ResumableSampler, SeededSamples, ShardSampler


def safe_posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits per channel; 0 bits gives a black image.

    timm 1.0.x RandAugment ``inc1`` asks for 0 bits when the sampled magnitude reaches 10 (``rand-m9-mstd0.5``:
    about 1 image in 650); Pillow >= 13 rejects 0 bits with ``ValueError``, older Pillow returned a black image.
    This op restores the older result so whole epochs run.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def guard_posterize(transform: Any) -> int:
    """Replace the posterize op of every timm RandAugment inside ``transform`` by :func:`safe_posterize`.

    Returns the number of ops replaced.
    """
    replaced = 0
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = safe_posterize
                    replaced += 1
    return replaced


def build_transform(is_train: bool, cfg: dict) -> transforms.Compose:
    """The recipe's transforms, ImageNet mean/std.

    Training: RandomResizedCrop with ``data.interpolation`` (bicubic), flip, RandAugment, colour jitter, random erasing
    (posterize guarded). Evaluation: resize the shorter side to ``floor(img_size / crop_pct)`` with
    ``data.eval_interpolation`` (bilinear as the release's code, bicubic as the DeiT recipe), then center crop."""
    img_size = cfg["model"]["img_size"]
    data, aug = cfg["data"], cfg["aug"]
    if is_train:
        transform = create_transform(
            img_size,
            is_training=True,
            scale=tuple(aug["scale"]),
            hflip=aug["hflip"],
            color_jitter=aug["color_jitter"],
            auto_augment=aug["rand_augment"],
            interpolation=data["interpolation"],
            re_prob=aug["reprob"],
            re_mode=aug["remode"],
            re_count=aug["recount"],
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        )
        guard_posterize(transform)
        return transform
    interpolation = transforms.InterpolationMode(data["eval_interpolation"])
    return transforms.Compose(
        [
            transforms.Resize(int(math.floor(img_size / data["crop_pct"])), interpolation=interpolation),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def build_dataset(split: str, cfg: dict) -> CheckedImageFolder:
    """``<data.path>/<split>`` as an ImageFolder with the recipe's transform for that split."""
    root = Path(cfg["data"]["path"]) / split
    dataset = CheckedImageFolder(
        root, transform=build_transform(split == "train", cfg), on_bad_image=cfg["data"]["on_bad_image"]
    )
    return dataset


def check_data(cfg: dict, splits: tuple[str, ...]) -> None:
    """Check the ImageFolder layout under ``data.path`` and its number of classes before any work (DataError naming
    the path)."""
    check_image_folder(
        cfg["data"]["path"],
        splits=splits,
        how_to_set=data_path_hint(cfg),
        on_bad_image=cfg["data"]["on_bad_image"],
    )
    for split in splits:
        check_num_classes(
            Path(cfg["data"]["path"]) / split,
            cfg["model"]["num_classes"],
            "model.num_classes",
            "set --opts model.num_classes {found} or point --data-path at the right folder",
        )


def build_loaders(
    cfg: dict,
    rank: int,
    world_size: int,
    pin_memory: bool,
    train: bool = True,
    device: torch.device | None = None,
) -> tuple[Any, DataLoader]:
    """(train loader or None, val loader). The train loader's sampler is a :class:`ResumableSampler`; loader RNG draws
    come from a private generator so they never touch the global RNG state that is checkpointed. On the fast path
    (``fast: true``) with ``data.fast_loader`` the train loader is the fast CPU loader
    (:func:`projector_kd.engine.fast_data.fast_training_loader`: crop-window decoding, uint8 batches normalised and
    randomly erased on ``device``); with ``data.loader: dali`` both loaders are DALI's
    (:class:`projector_kd.engine.dali.DaliLoader` on ``device``: the same files, sampler and transform, random erasing
    on the device)."""
    data = cfg["data"]
    workers = data["num_workers"]
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0 and cfg["fast"])
    val_set = build_dataset("val", cfg)
    val_loader = DataLoader(
        val_set,
        batch_size=data["eval_batch_size"] or data["batch_size"],
        sampler=ShardSampler(len(val_set), rank, world_size),
        **common,
    )
    dali = data["loader"] == "dali"
    if dali:
        from projector_kd.engine.dali import DaliLoader

        val_loader = DaliLoader(val_loader, device or torch.device("cpu"), train=False, name="val")
    if not train:
        return None, val_loader
    train_set = build_dataset("train", cfg)
    step_batch = data["batch_size"] * cfg["train"]["accum_iter"]  # one optimizer step's images on this rank
    sampler = ResumableSampler(len(train_set), step_batch, cfg["seed"], rank, world_size)
    if sampler.batches_per_epoch == 0:
        raise DataError(
            f"{Path(data['path']) / 'train'} has {len(train_set)} images: fewer than one batch of "
            f"{step_batch} per rank (data.batch_size x train.accum_iter); lower data.batch_size"
        )
    generator = torch.Generator()
    generator.manual_seed(cfg["seed"])
    train_loader = DataLoader(
        SeededSamples(train_set, cfg["seed"]),
        batch_size=step_batch,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        **common,
    )
    if dali:
        return DaliLoader(train_loader, device or torch.device("cpu"), train=True, name="train"), val_loader
    if cfg["fast"] and data["fast_loader"] and device is not None:
        return fast_training_loader(train_loader, device, "train"), val_loader
    return train_loader, val_loader


def build_mixup(cfg: dict) -> Mixup | None:
    """timm Mixup/CutMix producing label-smoothed soft targets, or None when both are off."""
    aug = cfg["aug"]
    if aug["mixup"] <= 0 and aug["cutmix"] <= 0 and aug["cutmix_minmax"] is None:
        return None
    return Mixup(
        mixup_alpha=aug["mixup"],
        cutmix_alpha=aug["cutmix"],
        cutmix_minmax=aug["cutmix_minmax"],
        prob=aug["mixup_prob"],
        switch_prob=aug["mixup_switch_prob"],
        mode=aug["mixup_mode"],
        label_smoothing=aug["smoothing"],
        num_classes=cfg["model"]["num_classes"],
    )
