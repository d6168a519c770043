"""Optional data path on NVIDIA DALI for both tracks (``--loader dali``: ResNet ``runtime.loader: dali``, DeiT
``data.loader: dali``).

:class:`DaliLoader` replaces a ``DataLoader`` over an image folder and looks the same to the training loop: ``len()``,
the same ``batch_sampler`` and ``sampler`` (so ``set_epoch`` and sharding work unchanged), and batches ``(images,
targets)`` (the ResNet track adds torchdistill's ``{}``, :mod:`imagenet.dali`). It runs the recipe's own transform,
translated stage by stage (:func:`plan_transform`), in a DALI graph:

    decode (only the crop window when the first stage is a random resized crop) -> bilinear or bicubic antialiased
    resize -> centre crop (zero padding) -> [flip -> RandAugment (:class:`RandAugmentPlan`)] -> flip +
    ToTensor/Normalize -> float32 NCHW [-> timm's RandomErasing on the device]

On a CUDA device the decoder is DALI's "mixed" one (nvJPEG: hardware/GPU JPEG decoding) and the rest runs on the GPU;
on the CPU every stage runs on the CPU (for tests: about PIL's speed).

Exact resume: the sample order is the loader's own batch sampler, iterated in this process; every random parameter
(the crop window with torchvision's ``RandomResizedCrop.get_params`` algorithm, the flip, RandAugment's operations,
magnitudes and signs) is drawn here in Python from a Philox generator keyed by (epoch seed, batch number), and random
erasing from (seed, epoch, batch number, rank) (:func:`projector_kd.engine.sampling.batch_seed`). Over the training
loader's :class:`~projector_kd.engine.sampling.ResumableSampler` the epoch seed is a pure function of (seed, epoch) and
the numbering starts at the sampler's start batch, so batch k of an epoch is a pure function of (seed, epoch, k) and a
resumed epoch reads and decodes only the batches it trains. Over another sampler (evaluation) the epoch seed is drawn
from torch's global generator when the epoch starts, as a ``DataLoader`` draws its base seed. File bytes, sizes and
parameters go to DALI through ``fn.external_source`` — JPEGs and 8-bit opaque PNGs as they are, any other file as the
default loader's own RGB (:func:`dali_decodes_as_pil`); images that cannot be read are handled before decoding as
``on_bad_image`` says (``fail``: one line naming the file; ``skip``: the next readable image, counted), and a decode
error inside DALI is traced to its file the same way. docs/dali.md lists what differs from the torchvision loader.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from torchvision import transforms as T

from .data import (
    UNREADABLE_IMAGE_ERRORS,
    DataError,
    innermost_dataset,
    is_jpeg_frame,
    jpeg_segments,
    load_rgb,
    open_image,
    unreadable_image,
)
from .errors import UserError
from .fast_data import DeviceErasing
from .sampling import ResumableSampler, ShardSampler, batch_seed, epoch_seed

logger = logging.getLogger(__name__)

DALI_REQUIREMENT = "nvidia-dali-cuda130==2.4.0"
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params tries 10 windows before its central fallback
UNIFORMS_PER_SAMPLE = 2 * CROP_ATTEMPTS + 3  # area and log-ratio per attempt, top, left, flip
EOI_SEARCH_BYTES = 1024  # a JPEG with no end-of-image marker this close to its end is checked by PIL
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PREFETCH_DEPTH = 2


def require_dali() -> Any:
    """``nvidia.dali``, or a :class:`UserError` saying how to install it."""
    try:
        import nvidia.dali as dali
    except ImportError:
        raise UserError(
            f"--loader dali needs NVIDIA DALI: pip install '.[dali]' (or {DALI_REQUIREMENT}), or use "
            f"--loader torchvision"
        ) from None
    return dali


# ------------------------------------------------------------------------------------------ the transform, planned


@dataclass(frozen=True)
class RandAugmentPlan:
    """timm's ``RandAugment`` as DALI runs it: ``layers`` operations per image, each chosen uniformly (with
    replacement) from ``ops`` (timm's names) and applied with probability ``probability`` at a magnitude drawn
    around ``magnitude`` (timm's ``mstd``: normal with that deviation, uniform in [0, magnitude] when infinite),
    clipped to [0, 10]; ``fill``: the grey the geometric operations fill with (timm: the mean colour, one value in
    DALI); ``translate_pct``: timm's relative translation range."""

    layers: int
    ops: tuple[str, ...]
    probability: float
    magnitude: float
    magnitude_std: float
    fill: int
    translate_pct: float


@dataclass(frozen=True)
class TransformPlan:
    """The stages of a supported torchvision/timm transform. Sizes are (height, width); ``mean``/``std`` are in
    ToTensor units (0..1); ``resize`` is torchvision's ``Resize.size`` (an int or one value: the shorter side);
    ``erasing``: timm's ``RandomErasing`` of the recipe, run on the device after normalisation."""

    random_crop_size: tuple[int, int] | None = None
    random_crop_scale: tuple[float, float] = (0.08, 1.0)
    random_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: tuple[int, ...] | None = None
    resize_max_size: int | None = None
    center_crop: tuple[int, int] | None = None
    flip_probability: float = 0.0
    interpolation: str = "bilinear"
    rand_augment: RandAugmentPlan | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    erasing: RandomErasing | None = None


SUPPORTED = (
    "RandomResizedCrop or Resize, then CenterCrop, RandomHorizontalFlip, timm's RandAugment, ToTensor, Normalize "
    "and timm's RandomErasing, in that order, with bilinear or bicubic interpolation"
)
INTERPOLATIONS = {T.InterpolationMode.BILINEAR: "bilinear", T.InterpolationMode.BICUBIC: "bicubic"}
RAND_AUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def _pair(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def rand_augment_plan(stage: auto_augment.RandAugment) -> RandAugmentPlan | None:
    """:class:`RandAugmentPlan` of timm's ``stage``, or None when DALI cannot run it as timm does (weighted choice,
    an operation of another suite, per-op settings that differ, magnitudes beyond 10)."""
    ops = stage.ops
    first = ops[0] if ops else None
    same = first is not None and all(
        (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max, op.kwargs["fillcolor"])
        == (first.prob, first.magnitude, first.magnitude_std, first.magnitude_max, first.kwargs["fillcolor"])
        for op in ops
    )
    if (
        not same
        or stage.choice_weights is not None
        or any(op.name not in RAND_AUGMENT_OPS for op in ops)
        or (first.magnitude_max or 10) != 10
    ):
        return None
    fill = first.kwargs["fillcolor"]
    return RandAugmentPlan(
        layers=int(stage.num_layers),
        ops=tuple(op.name for op in ops),
        probability=float(first.prob),
        magnitude=float(first.magnitude),
        magnitude_std=float(first.magnitude_std),
        fill=int(round(float(np.mean(fill)))) if isinstance(fill, (tuple, list)) else int(fill),
        translate_pct=float(first.hparams.get("translate_pct", 0.45)),
    )


def plan_transform(transform: Any, where: str) -> TransformPlan:
    """Translate the recipe's transform into a :class:`TransformPlan`; a :class:`UserError` names any stage DALI's
    graph here cannot run (``where``: the dataset, for the message)."""
    stages = list(transform.transforms) if isinstance(transform, T.Compose) else [transform]
    order = (
        (T.RandomResizedCrop, RandomResizedCropAndInterpolation),
        (T.Resize,),
        (T.CenterCrop,),
        (T.RandomHorizontalFlip,),
        (auto_augment.RandAugment,),
        (T.ToTensor, MaybeToTensor),
        (T.Normalize,),
        (RandomErasing,),
    )
    plan: dict[str, Any] = {}
    position = -1
    for stage in stages:
        kind = next((i for i, classes in enumerate(order) if type(stage) in classes), None)
        interpolation = getattr(stage, "interpolation", T.InterpolationMode.BILINEAR)
        unsupported = (
            kind is None
            or kind <= position
            or (kind == 1 and position == 0)
            or interpolation not in INTERPOLATIONS
            or (kind == 4 and rand_augment_plan(stage) is None)
            or (kind == 7 and (position != 6 or stage.num_splits > 1))
        )
        if unsupported:
            raise UserError(
                f"{where}: --loader dali cannot run the transform {stage!r} here; it runs {SUPPORTED} — "
                f"use --loader torchvision for this recipe"
            )
        position = kind
        if kind == 0:
            plan.update(
                random_crop_size=_pair(stage.size),
                random_crop_scale=tuple(map(float, stage.scale)),
                random_crop_ratio=tuple(map(float, stage.ratio)),
                interpolation=INTERPOLATIONS[interpolation],
            )
        elif kind == 1:
            size = (stage.size,) if isinstance(stage.size, int) else tuple(stage.size)
            plan.update(resize=size, resize_max_size=stage.max_size, interpolation=INTERPOLATIONS[interpolation])
        elif kind == 2:
            plan["center_crop"] = _pair(stage.size)
        elif kind == 3:
            plan["flip_probability"] = float(stage.p)
        elif kind == 4:
            plan["rand_augment"] = rand_augment_plan(stage)
        elif kind == 6:
            plan.update(mean=tuple(map(float, stage.mean)), std=tuple(map(float, stage.std)))
        elif kind == 7:
            plan["erasing"] = stage
    if position < 5:
        raise UserError(
            f"{where}: --loader dali needs a transform ending in ToTensor (optionally Normalize); it runs "
            f"{SUPPORTED} — use --loader torchvision for this recipe"
        )
    if plan.get("rand_augment") is not None and plan.get("random_crop_size") is None:
        raise UserError(f"{where}: --loader dali runs RandAugment after a RandomResizedCrop only")
    return TransformPlan(**plan)


# --------------------------------------------------------------------------------------------- per-sample geometry


def random_resized_crop_windows(
    heights: np.ndarray,
    widths: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    uniforms: np.ndarray,
) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params`` for a batch: rows ``(top, left, height, width)``. ``uniforms``
    (B, 2 * CROP_ATTEMPTS + 2) in [0, 1) stand for its random draws: per attempt the area fraction (uniform in
    ``scale``) and the log aspect ratio (uniform in log ``ratio``); a window fits when ``0 < w <= W`` and
    ``0 < h <= H``, w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)) (half to even, as Python's round);
    the first fitting attempt wins and its top/left are uniform over the positions that fit. No fitting attempt: the
    central crop of the whole image with its aspect ratio clamped to ``ratio``."""
    heights = heights.astype(np.int64)
    widths = widths.astype(np.int64)
    area = (heights * widths).astype(np.float64)[:, None]
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :CROP_ATTEMPTS])
    aspect = np.exp(log_low + (log_high - log_low) * uniforms[:, CROP_ATTEMPTS : 2 * CROP_ATTEMPTS])
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(len(heights))
    crop_w, crop_h = w[rows, first], h[rows, first]
    top = np.floor(uniforms[:, 2 * CROP_ATTEMPTS] * (heights - crop_h + 1)).astype(np.int64)
    left = np.floor(uniforms[:, 2 * CROP_ATTEMPTS + 1] * (widths - crop_w + 1)).astype(np.int64)
    fallback = ~fits.any(axis=1)
    if fallback.any():
        in_ratio = widths / heights
        narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
        fb_w = np.where(wide, np.rint(heights * max(ratio)).astype(np.int64), widths)
        fb_h = np.where(narrow, np.rint(widths / min(ratio)).astype(np.int64), heights)
        crop_w, crop_h = np.where(fallback, fb_w, crop_w), np.where(fallback, fb_h, crop_h)
        top = np.where(fallback, (heights - crop_h) // 2, top)
        left = np.where(fallback, (widths - crop_w) // 2, left)
    return np.stack([top, left, crop_h, crop_w], axis=1)


def resized_size(height: int, width: int, size: tuple[int, ...], max_size: int | None) -> tuple[int, int]:
    """torchvision's ``Resize`` output (height, width): two values are the size; one value is the shorter side, the
    longer one truncated (``int(size * long / short)``) and capped by ``max_size``."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop_window(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """torchvision's ``CenterCrop`` window (top, left) in the image's coordinates: ``round((H - h) / 2)`` (half to
    even); a crop larger than the image pads it with zeros, ``(h - H) // 2`` rows above (a negative top)."""
    top = -((crop[0] - height) // 2) if crop[0] > height else int(round((height - crop[0]) / 2.0))
    left = -((crop[1] - width) // 2) if crop[1] > width else int(round((width - crop[1]) / 2.0))
    return top, left


def sample_parameters(plan: TransformPlan, sizes: np.ndarray, uniforms: np.ndarray) -> dict[str, np.ndarray]:
    """Every DALI input but the bytes, for images of ``sizes`` (B, 2: height, width) and ``uniforms`` (B,
    UNIFORMS_PER_SAMPLE): the decode window, the size after resizing, the centre-crop window and the flip."""
    count = len(sizes)
    heights, widths = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
    if plan.random_crop_size is not None:
        window = random_resized_crop_windows(heights, widths, plan.random_crop_scale, plan.random_crop_ratio, uniforms)
        resized = np.tile(np.array(plan.random_crop_size, dtype=np.int64), (count, 1))
    else:
        window = np.stack([np.zeros(count, np.int64), np.zeros(count, np.int64), heights, widths], axis=1)
        resized = window[:, 2:].copy()
        if plan.resize is not None:
            resized = np.array(
                [resized_size(h, w, plan.resize, plan.resize_max_size) for h, w in resized], dtype=np.int64
            ).reshape(count, 2)
    crop = np.zeros((count, 4), dtype=np.int64)
    if plan.center_crop is not None:
        crop[:, 2:] = plan.center_crop
        crop[:, :2] = [center_crop_window(h, w, plan.center_crop) for h, w in resized]
    return {
        "window_anchor": window[:, :2].astype(np.int32),
        "window_shape": window[:, 2:].astype(np.int32),
        "resize_h": resized[:, 0].astype(np.float32),
        "resize_w": resized[:, 1].astype(np.float32),
        "crop_anchor": crop[:, :2].astype(np.int32),
        "crop_shape": crop[:, 2:].astype(np.int32),
        "flip": (uniforms[:, -1] < plan.flip_probability).astype(np.int32),
    }


def batch_generator(epoch_seed: int, batch_number: int) -> np.random.Generator:
    """The Philox generator of batch ``batch_number`` of the epoch seeded ``epoch_seed``: its first draws are
    :func:`batch_uniforms`, then :func:`rand_augment_parameters`."""
    key = np.array([epoch_seed % 2**64, batch_number], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def batch_uniforms(epoch_seed: int, batch_number: int, count: int) -> np.ndarray:
    """The (count, UNIFORMS_PER_SAMPLE) uniforms of batch ``batch_number`` of the epoch seeded ``epoch_seed``."""
    return batch_generator(epoch_seed, batch_number).random((count, UNIFORMS_PER_SAMPLE))


RA_BINS = 101  # DALI magnitude bins: timm's magnitudes 0, 0.1, ..., 10


def rand_augment_parameters(plan: RandAugmentPlan, generator: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Per image and layer, as timm's ``RandAugment`` draws them: the operation (uniform over ``plan.ops``; the
    index ``len(plan.ops)`` — identity — where its ``probability`` says it is not applied), the magnitude bin
    (round(10 m), m drawn around ``plan.magnitude`` and clipped to [0, 10]) and the sign of operations that negate
    randomly (0 or 1)."""
    shape = (count, plan.layers)
    op = generator.integers(0, len(plan.ops), shape)
    applied = generator.random(shape) <= plan.probability
    if math.isinf(plan.magnitude_std):
        magnitude = generator.uniform(0, plan.magnitude, shape)
    elif plan.magnitude_std > 0:
        magnitude = generator.normal(plan.magnitude, plan.magnitude_std, shape)
    else:
        magnitude = np.full(shape, plan.magnitude)
    return {
        "ra_op": np.where(applied, op, len(plan.ops)).astype(np.int32),
        "ra_magnitude": np.rint(np.clip(magnitude, 0, 10) * (RA_BINS - 1) / 10).astype(np.int32),
        "ra_sign": generator.integers(0, 2, shape).astype(np.int32),
    }


def posterize_mask(bits: float) -> np.ndarray:
    """The uint8 mask keeping ``bits`` high bits; 0 bits keeps none (a black image, as ``deit.datasets``'s
    guarded posterize)."""
    bits = int(round(float(bits)))
    return np.array(0 if bits <= 0 else (0xFF ^ (2 ** (8 - min(bits, 8)) - 1)), dtype=np.uint8)


def dali_rand_augment_ops(plan: RandAugmentPlan) -> list:
    """DALI's augmentations for ``plan.ops`` (then identity), with timm's magnitude-to-argument mappings over
    :data:`RA_BINS` bins: angles 30 m/10 degrees, shears 0.3 m/10, translations ``translate_pct`` m/10 of the size,
    enhancement factors 1 +- 0.9 m/10 (those signed at random); posterize bits, solarize thresholds and
    solarize-add shifts from timm's own level functions."""
    from nvidia.dali.auto_aug import augmentations as a

    magnitudes = np.linspace(0, 10, RA_BINS)

    def timm_levels(name: str) -> np.ndarray:
        return np.array([float(auto_augment.LEVEL_TO_ARG[name](m, {})[0]) for m in magnitudes])

    table = {
        "AutoContrast": a.auto_contrast,
        "Equalize": a.equalize,
        "Invert": a.invert,
        "Rotate": a.rotate.augmentation(mag_range=(0, 30), randomly_negate=True),
        "PosterizeIncreasing": a.posterize.augmentation(
            mag_range=timm_levels("PosterizeIncreasing"), mag_to_param=posterize_mask
        ),
        "SolarizeIncreasing": a.solarize.augmentation(mag_range=timm_levels("SolarizeIncreasing")),
        "SolarizeAdd": a.solarize_add.augmentation(mag_range=timm_levels("SolarizeAdd")),
        "ColorIncreasing": a.color.augmentation(mag_range=(0, 0.9), randomly_negate=True),
        "ContrastIncreasing": a.contrast.augmentation(mag_range=(0, 0.9), randomly_negate=True),
        "BrightnessIncreasing": a.brightness.augmentation(mag_range=(0, 0.9), randomly_negate=True),
        "SharpnessIncreasing": a.sharpness.augmentation(mag_range=(0, 0.9), randomly_negate=True),
        "ShearX": a.shear_x.augmentation(mag_range=(0, 0.3), randomly_negate=True),
        "ShearY": a.shear_y.augmentation(mag_range=(0, 0.3), randomly_negate=True),
        "TranslateXRel": a.translate_x.augmentation(mag_range=(0, plan.translate_pct), randomly_negate=True),
        "TranslateYRel": a.translate_y.augmentation(mag_range=(0, plan.translate_pct), randomly_negate=True),
    }
    return [table[name] for name in plan.ops] + [a.identity]


# ------------------------------------------------------------------------------------------------ reading images


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None when ``data`` is not a JPEG whose headers this walk reads
    (:func:`projector_kd.engine.data.jpeg_segments`)."""
    for marker, position, _ in jpeg_segments(data):
        if is_jpeg_frame(marker):
            if position + 9 > len(data):
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return (height, width) if height and width else None
    return None


def dali_decodes_as_pil(data: bytes) -> bool:
    """Whether DALI's decoder gives the default loader's pixels (:func:`projector_kd.engine.data.to_rgb`) for the file
    in ``data``: a JPEG, or an 8-bit PNG with neither alpha nor a transparent colour (tested). DALI drops transparency
    (the default loader composites it over white), scales 16-bit RGB with rounding (PIL keeps the high byte), and other
    formats are not checked against PIL."""
    if data[:2] == b"\xff\xd8":
        return True
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 26:
        return False
    bit_depth, colour_type = data[24], data[25]
    if bit_depth > 8 or colour_type in (4, 6):  # 16-bit, grey + alpha, RGBA
        return False
    position = 8
    while position + 8 <= len(data):  # a transparent colour (tRNS) comes before the image data
        kind = data[position + 4 : position + 8]
        if kind in (b"tRNS", b"IDAT"):
            return kind == b"IDAT"
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return False


def default_loader_png(path: str, data: bytes) -> bytes:
    """The image file ``path`` (its bytes ``data``) as the default loader reads it
    (:func:`projector_kd.engine.data.load_rgb`), as a lossless 8-bit RGB PNG for DALI to decode."""
    buffer = io.BytesIO()
    load_rgb(path, data).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def image_size(path: str, data: bytes) -> tuple[int, int]:
    """(height, width) of the image in ``data`` as PIL sees it (EXIF orientation not applied, as in the torchvision
    loader); a JPEG without its end-of-image marker is decoded by PIL to see whether it is complete. Raises
    :class:`DataError` naming ``path`` — the default loader's message — when PIL cannot read it, also when it is over
    Pillow's pixel limit (:func:`projector_kd.engine.data.open_image`; a JPEG's header size is checked against it)."""
    size = jpeg_size(data)
    limit = Image.MAX_IMAGE_PIXELS
    within_limit = size is not None and (limit is None or size[0] * size[1] <= limit)
    if within_limit and data.rfind(b"\xff\xd9", max(len(data) - EOI_SEARCH_BYTES, 0)) >= 0:
        return size
    try:
        with open_image(io.BytesIO(data)) as image:
            if size is not None:  # a JPEG that may be truncated: decode it as the torchvision loader would
                image.convert("RGB")
            return image.size[1], image.size[0]
    except UNREADABLE_IMAGE_ERRORS as error:
        load_rgb(path)  # names the file with PIL's own message, as the torchvision loader does
        raise unreadable_image(path, error) from None


@dataclass
class PreparedBatch:
    """One batch as fed to DALI: where it is in the epoch, which samples it holds, its labels and inputs."""

    number: int
    indices: list[int]
    samples: list[int]
    labels: np.ndarray
    inputs: tuple


# ------------------------------------------------------------------------------------------------------ the loader


def _unwrapped_dataset(loader: DataLoader) -> Any:
    dataset = innermost_dataset(loader.dataset)  # SeededSamples' seeding applies to transforms run in Python only
    if not hasattr(dataset, "samples") or not hasattr(dataset, "transform"):
        raise UserError(
            f"--loader dali reads ImageFolder datasets (files and labels), not {type(dataset).__name__} "
            f"— use --loader torchvision"
        )
    return dataset


class DaliLoader:
    """A ``DataLoader`` over an image folder replaced by a DALI pipeline over the same files, sampler, batch size and
    transform (see the module docstring), yielding ``(images, targets)``. ``device``: a CUDA device (nvJPEG decoding)
    or the CPU; ``threads``: DALI's CPU threads and the file readers (default: the loader's ``num_workers``, at least
    1)."""

    def __init__(
        self, loader: DataLoader, device: torch.device, train: bool, name: str = "dataset", threads: int | None = None
    ) -> None:
        require_dali()
        self.dataset = _unwrapped_dataset(loader)
        self.plan = plan_transform(self.dataset.transform, name)
        self.device = device
        self.batch_sampler = loader.batch_sampler
        sampler = getattr(self.batch_sampler, "sampler", None)
        if not train and isinstance(sampler, DistributedSampler):  # evaluation counts every image exactly once
            self.batch_sampler = BatchSampler(
                ShardSampler(len(self.dataset), sampler.rank, sampler.num_replicas),
                self.batch_sampler.batch_size,
                drop_last=False,
            )
        self.batch_size = self.batch_sampler.batch_size
        self.input_names = ["encoded", "flip"]
        if self.plan.random_crop_size is not None:
            self.input_names += ["window_anchor", "window_shape"]
        if self.plan.random_crop_size is not None or self.plan.resize is not None:
            self.input_names += ["resize_h", "resize_w"]
        if self.plan.center_crop is not None:
            self.input_names += ["crop_anchor", "crop_shape"]
        if self.plan.rand_augment is not None:
            self.input_names += ["ra_op", "ra_magnitude", "ra_sign"]
        erasing = self.plan.erasing
        self.erasing = DeviceErasing(erasing, device) if erasing is not None and erasing.probability > 0 else None
        self.threads = max(int(threads if threads is not None else loader.num_workers), 1)
        self.on_bad_image = getattr(self.dataset, "on_bad_image", "fail")
        self.skipped: set[int] = set()
        self.sizes = np.full((len(self.dataset), 2), -1, dtype=np.int64)  # filled as images are first read
        self.readers = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="dali-read")
        self.pipeline: Any = None
        self.pipeline_clean = False
        self.epoch: DaliEpoch | None = None
        logger.info(
            "%s: DALI loader, %s decoding, %d threads, %d batches of %d",
            name,
            "GPU (nvJPEG)" if device.type == "cuda" else "CPU",
            self.threads,
            len(self),
            self.batch_size,
        )

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def sampler(self) -> Any:
        return self.batch_sampler.sampler

    @property
    def num_workers(self) -> int:
        return self.threads

    def finish(self, images: torch.Tensor, labels: torch.Tensor, epoch: DaliEpoch, number: int) -> tuple:
        """A batch as the loop receives it: ``(images, labels)``, randomly erased on the device where the recipe
        erases, with draws from (seed, epoch, batch ``number``, rank)."""
        if self.erasing is not None:
            images = self.erasing(images, batch_seed(epoch.seed % 2**63, 0, number, epoch.rank))
        return images, labels

    def __iter__(self) -> DaliEpoch:
        if self.epoch is not None:
            self.epoch.active = False
        self.epoch = DaliEpoch(self)
        return self.epoch

    # ---------------------------------------------------------------------------------------- the DALI pipeline

    def build_pipeline(self) -> Any:
        """The DALI graph of :attr:`plan`, fed by :meth:`DaliEpoch.next_inputs` (with RandAugment: DALI's conditional
        execution, each image through the operation its parameters select)."""
        require_dali()
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.auto_aug.core import select, signed_bin

        gpu = self.device.type == "cuda"
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        )
        plan = self.plan
        names = self.input_names
        dtypes = {"encoded": types.UINT8, "resize_h": types.FLOAT, "resize_w": types.FLOAT}
        rand_augment = plan.rand_augment
        augmentations = dali_rand_augment_ops(rand_augment) if rand_augment is not None else []
        interpolation = types.INTERP_CUBIC if plan.interpolation == "bicubic" else types.INTERP_LINEAR

        def graph() -> Any:
            inputs = dict(
                zip(
                    names,
                    fn.external_source(
                        source=self._next_inputs,
                        num_outputs=len(names),
                        batch=True,
                        dtype=[dtypes.get(n, types.INT32) for n in names],
                    ),
                )
            )
            encoded = inputs["encoded"]
            decoder = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB, "adjust_orientation": False}
            if gpu:
                decoder["jpeg_fancy_upsampling"] = True  # libjpeg-turbo's (and so PIL's) chroma upsampling
            if plan.random_crop_size is not None:
                images = fn.decoders.image_slice(
                    encoded, inputs["window_anchor"], inputs["window_shape"], axes=[0, 1], **decoder
                )
            else:
                images = fn.decoders.image(encoded, **decoder)
            if plan.random_crop_size is not None or plan.resize is not None:
                images = fn.resize(
                    images,
                    resize_y=inputs["resize_h"],
                    resize_x=inputs["resize_w"],
                    interp_type=interpolation,
                    antialias=True,
                )
            if plan.center_crop is not None:
                images = fn.slice(
                    images,
                    inputs["crop_anchor"],
                    inputs["crop_shape"],
                    axes=[0, 1],
                    out_of_bounds_policy="pad",
                    fill_values=0,
                )
            mirror = inputs["flip"]
            if rand_augment is not None:  # the recipe flips before RandAugment
                images = fn.flip(images, horizontal=mirror)
                mirror = 0
                for layer in range(rand_augment.layers):
                    images = select(
                        augmentations,
                        inputs["ra_op"][layer],
                        data=images,
                        magnitude_bin=signed_bin(inputs["ra_magnitude"][layer], random_sign=inputs["ra_sign"][layer]),
                        num_magnitude_bins=RA_BINS,
                        fill_value=rand_augment.fill,
                        interp_type=types.INTERP_LINEAR,
                        shape=plan.random_crop_size,
                    )
            return fn.crop_mirror_normalize(
                images,
                mirror=mirror,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[255.0 * m for m in plan.mean],
                std=[255.0 * s for s in plan.std],
            )

        pipeline = pipeline_def(graph, enable_conditionals=rand_augment is not None)(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=device_id,
            prefetch_queue_depth=PREFETCH_DEPTH,
            seed=0,
        )
        with warnings.catch_warnings():  # DALI's own sharpness augmentation calls an operator DALI renamed
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"nvidia\.dali\..*")
            pipeline.build()
        return pipeline

    def _next_inputs(self) -> tuple:
        if self.epoch is None or not self.epoch.active:
            raise StopIteration
        return self.epoch.next_inputs()

    # -------------------------------------------------------------------------------------------- reading files

    def read(self, index: int) -> tuple[int, bytes, tuple[int, int]]:
        """(sample used, its bytes, its size) for dataset index ``index``: the image itself, or — under
        ``on_bad_image: skip`` — the next readable one (each unreadable file is named once in a warning)."""
        length = len(self.dataset)
        for offset in range(length if self.on_bad_image == "skip" else 1):
            candidate = (index + offset) % length
            if candidate in self.skipped:
                continue
            path = self.dataset.samples[candidate][0]
            try:
                try:
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError as error:
                    raise unreadable_image(path, error) from None
                if self.sizes[candidate, 0] < 0:
                    self.sizes[candidate] = image_size(path, data)
                if not dali_decodes_as_pil(data):
                    data = default_loader_png(path, data)
                return candidate, data, (int(self.sizes[candidate, 0]), int(self.sizes[candidate, 1]))
            except DataError as error:
                if self.on_bad_image != "skip":
                    raise
                self.skip_sample(candidate, error)
        raise DataError(f"no readable image left in {self.dataset.root}")

    def skip_sample(self, index: int, error: DataError) -> None:
        self.skipped.add(index)
        logger.warning("skipping %s (%d skipped so far in this process)", error, len(self.skipped))

    def start_reading(self, indices: list[int]) -> list[Future]:
        """Read the files of ``indices`` in the thread pool, one slice per thread (:meth:`read` on each)."""
        step = math.ceil(len(indices) / self.threads)
        return [
            self.readers.submit(lambda part: [self.read(i) for i in part], indices[start : start + step])
            for start in range(0, len(indices), step)
        ]

    def prepare(
        self, number: int, indices: list[int], epoch_seed: int, reading: list[Future] | None = None
    ) -> PreparedBatch:
        """Batch ``number`` of the epoch: its files (``reading``: already being read, see :meth:`start_reading`) and
        its random parameters, from (epoch seed, number)."""
        reading = self.start_reading(indices) if reading is None else reading
        read = [item for part in reading for item in part.result()]
        samples = [sample for sample, _, _ in read]
        sizes = np.array([size for _, _, size in read], dtype=np.int64).reshape(len(read), 2)
        generator = batch_generator(epoch_seed, number)
        params = sample_parameters(self.plan, sizes, generator.random((len(indices), UNIFORMS_PER_SAMPLE)))
        if self.plan.rand_augment is not None:
            params.update(rand_augment_parameters(self.plan.rand_augment, generator, len(indices)))
        labels = np.array([self.dataset.samples[sample][1] for sample in samples], dtype=np.int64)
        params["encoded"] = [np.frombuffer(data, dtype=np.uint8) for _, data, _ in read]
        inputs = tuple(params[name] for name in self.input_names)
        return PreparedBatch(number=number, indices=list(indices), samples=samples, labels=labels, inputs=inputs)

    def diagnose(self, batches: list[PreparedBatch], error: Exception) -> None:
        """After DALI failed on one of ``batches`` (those fed and not yet returned): find the file PIL cannot read
        either and fail naming it (``fail``) or skip it (``skip``); when PIL reads them all, fail with DALI's reason."""
        for batch in batches:
            for sample in batch.samples:
                path = self.dataset.samples[sample][0]
                try:
                    load_rgb(path)
                except DataError as bad:
                    if self.on_bad_image != "skip":
                        raise
                    self.skip_sample(sample, bad)
                    return
        reason = next(
            (
                line.strip()
                for line in reversed(str(error).splitlines())
                if line.strip() and "no longer valid" not in line
            ),
            type(error).__name__,
        )
        first = self.dataset.samples[batches[0].samples[0]][0]
        raise UserError(
            f"DALI could not decode images that PIL reads (a batch starting with {first}): {reason} — "
            f"use --loader torchvision"
        )

    def to_torch(self, output: Any) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        try:
            tensor = output.as_tensor()
        except RuntimeError:
            raise UserError(
                "--loader dali: the images of a batch differ in size after the transform — add a "
                "RandomResizedCrop or Resize + CenterCrop to the recipe's transform"
            ) from None
        if self.device.type == "cuda":
            images = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, images, cuda_stream=torch.cuda.current_stream(self.device))
            return images
        return torch.from_numpy(np.array(tensor))


def plain_indices(batch: list) -> list[int]:
    """Dataset indices of a batch from the sampler (a :class:`ResumableSampler` yields ``(epoch, index)`` pairs)."""
    return [item[1] if isinstance(item, tuple) else item for item in batch]


class DaliEpoch(Iterator):
    """One pass over a :class:`DaliLoader`: the epoch seed and the sampler's order are drawn when it is created."""

    def __init__(self, loader: DaliLoader) -> None:
        self.loader = loader
        self.active = True
        sampler = getattr(loader.batch_sampler, "sampler", None)
        self.rank = sampler.rank if isinstance(sampler, ResumableSampler) else 0
        if isinstance(sampler, ResumableSampler):  # a pure function of (seed, epoch), from the sampler's start batch
            self.seed = epoch_seed(sampler.seed, sampler.epoch)
            self.number = sampler.start_batch
        else:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as DataLoader draws its base seed
            self.number = 0  # batches taken from the sampler so far
        self.order = (plain_indices(batch) for batch in loader.batch_sampler)
        self.pending: deque[tuple[int, list[int]]] = deque()  # batches to feed again after a pipeline rebuild
        self.in_flight: deque[PreparedBatch] = deque()
        self.ahead: tuple[int, list[int], list[Future]] | None = None  # the next batch, its files being read
        self.started = False

    def _take(self) -> tuple[int, list[int]]:
        if self.pending:
            return self.pending.popleft()
        indices = next(self.order)
        self.number += 1
        return self.number - 1, indices

    def next_inputs(self) -> tuple:
        """The DALI inputs of the next batch (the external source's callback); the batch after it starts being read
        meanwhile, so its files are in memory when DALI asks for it."""
        if self.ahead is None:
            number, indices = self._take()  # StopIteration ends DALI's epoch
            self.ahead = (number, indices, self.loader.start_reading(indices))
        number, indices, reading = self.ahead
        self.ahead = None
        with suppress(StopIteration):
            following, following_indices = self._take()
            self.ahead = (following, following_indices, self.loader.start_reading(following_indices))
        batch = self.loader.prepare(number, indices, self.seed, reading)
        self.in_flight.append(batch)
        return batch.inputs

    def _start(self) -> None:
        loader = self.loader
        if loader.pipeline is not None and loader.pipeline_clean:
            loader.pipeline.reset()
        else:
            loader.pipeline = loader.build_pipeline()
        loader.pipeline_clean = False
        self.started = True

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if not self.active:
            raise StopIteration
        if not self.started:
            self._start()
        loader = self.loader
        while True:
            try:
                outputs = loader.pipeline.run()
                break
            except StopIteration:
                self.active = False
                loader.pipeline_clean = True
                raise
            except RuntimeError as error:  # a decode error: the pipeline is unusable from here on
                if not self.in_flight:
                    raise
                loader.pipeline = None
                loader.diagnose(list(self.in_flight), error)
                if self.ahead is not None:
                    self.pending.appendleft(self.ahead[:2])
                    self.ahead = None
                self.pending.extendleft((b.number, b.indices) for b in reversed(self.in_flight))
                self.in_flight.clear()
                loader.pipeline = loader.build_pipeline()
        batch = self.in_flight.popleft()
        return loader.finish(loader.to_torch(outputs[0]), torch.from_numpy(batch.labels), self, batch.number)
