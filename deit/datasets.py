"""ImageFolder data for the DeiT track: the recipe's transforms, resumable sampling, mixup/cutmix.

Exact resume: the training sampler yields ``(epoch, index)`` pairs in an order that is a pure function of
``(seed, epoch, rank, world_size)``, and :class:`SeededSamples` reseeds python/numpy/torch for every sample from
``(seed, epoch, index)``. So a run resumed at batch k of an epoch sees exactly the batches an uninterrupted run sees,
whatever the number of loader workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import RandAugment
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from projector_kd.data import CheckedImageFolder, DataError, check_image_folder, check_num_classes


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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, sample index)."""
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(epoch, index)`` is drawn with python/numpy/torch seeded from
    ``(seed, epoch, index)``; the caller's generator states are restored afterwards. A plain int index is passed
    through unseeded (evaluation)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        epoch, index = key
        value = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(value)
                np.random.seed(value % 2**32)
                torch.manual_seed(value)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(Sampler):
    """Shuffled, rank-sharded training order that can start mid-epoch.

    Epoch order: ``torch.randperm(n)`` from a generator seeded with ``seed + epoch``, padded by wrap-around to a
    multiple of ``world_size``, then every ``world_size``-th index from ``rank`` (as ``DistributedSampler``). Yields
    ``(epoch, index)`` pairs; :meth:`set_epoch` with ``start_batch = k`` skips the first ``k * batch_size`` of them.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_items / world_size)
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per rank per epoch (the last partial batch is dropped)."""
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, from the start of the epoch."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        total = self.per_rank * self.world_size
        order += (order * math.ceil(total / self.num_items))[: total - self.num_items]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.epoch_indices(self.epoch)[self.start_batch * self.batch_size :]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.batch_size


class ShardSampler(Sampler):
    """Evaluation order: indices ``rank, rank + world_size, ...`` with no padding, so summed counts are exact."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_items, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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
        how_to_set="pass --data-path DIR or set IMAGENET_ROOT",
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
    cfg: dict, rank: int, world_size: int, pin_memory: bool, train: bool = True
) -> tuple[DataLoader | None, DataLoader]:
    """(train loader or None, val loader). The train loader's sampler is a :class:`ResumableSampler`; loader RNG draws
    come from a private generator so they never touch the global RNG state that is checkpointed."""
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
