"""The fast path's CPU training loader, shared by both tracks: decode only what the crop needs, hand uint8 batches to
the main process, convert, normalise and (DeiT) randomly erase them on the device.

A recipe training transform ``RandomResizedCrop -> PIL stages (flip, RandAugment, ...) -> ToTensor -> Normalize
[-> RandomErasing]`` (:func:`recipe_stages`) runs per sample as:

    read the file -> open it (header only) -> the crop box from the recipe stage's own ``get_params``, with the same
    random draws -> decode at the largest JPEG DCT scale s in {1, 2, 4, 8} that still gives the box at least the
    output size (Pillow's ``Image.draft``) -> resize the box to the output size (s = 1: torch's antialiased uint8
    resize, which follows Pillow's filters to within one level; s > 1: Pillow's resize of the box scaled by 1/s)
    -> the recipe's PIL stages, unchanged -> uint8 HWC tensor

and :class:`DeviceFinishedLoader` turns each uint8 NHWC batch into float32 NCHW (channels_last) on the device: pinned
non-blocking copy, ``(x - 255 mean) / (255 std)`` and timm's ``RandomErasing(device=...)``, on a side stream on CUDA,
one batch ahead (as timm's ``PrefetchLoader``). The erasing draws are a pure function of (seed, epoch, batch number,
rank) (:func:`projector_kd.engine.sampling.batch_seed`), so a resumed run sees bit-identical batches.

Images are read by the default loader's rules (:func:`projector_kd.engine.data.to_rgb`: 16-bit, transparency over
white, every PIL mode); an unreadable file raises the default loader's one-line :class:`DataError`, so
``on_bad_image: skip`` works unchanged. docs/faithfulness.md says what differs in pixels, with measured figures.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from .data import (
    JPEG_START_OF_SCAN,
    UNREADABLE_IMAGE_ERRORS,
    innermost_dataset,
    is_jpeg_frame,
    jpeg_segments,
    open_image,
    to_rgb,
    unreadable_image,
)
from .sampling import SeededSamples, batch_seed, rebuild_loader, training_sampler

logger = logging.getLogger(__name__)

DCT_SCALES = (8, 4, 2, 1)  # the scales Pillow's JPEG draft mode decodes at
TORCH_RESIZE = {T.InterpolationMode.BILINEAR: "bilinear", T.InterpolationMode.BICUBIC: "bicubic"}
PIL_RESIZE = {
    T.InterpolationMode.NEAREST: Image.NEAREST,
    T.InterpolationMode.BILINEAR: Image.BILINEAR,
    T.InterpolationMode.BICUBIC: Image.BICUBIC,
    T.InterpolationMode.LANCZOS: Image.LANCZOS,
    T.InterpolationMode.BOX: Image.BOX,
    T.InterpolationMode.HAMMING: Image.HAMMING,
}
TO_TENSOR = ("ToTensor", "MaybeToTensor")  # torchvision's and timm's


class UnsupportedTransform(ValueError):
    """A recipe transform the fast CPU loader cannot run as the recipe does (the message says which stage)."""


@dataclass(frozen=True)
class RecipeStages:
    """A recipe training transform split for the fast loader: the random-resized-crop stage (torchvision's
    ``RandomResizedCrop`` or timm's ``RandomResizedCropAndInterpolation``: its ``get_params``, ``scale``, ``ratio``,
    ``size`` and ``interpolation`` are used as they are), the PIL stages after it (run unchanged), the normalisation
    (ToTensor units) and timm's ``RandomErasing`` when the recipe ends with one."""

    crop: Any
    pil_stages: tuple
    mean: tuple[float, ...]
    std: tuple[float, ...]
    erasing: RandomErasing | None

    @property
    def size(self) -> tuple[int, int]:
        size = self.crop.size
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def recipe_stages(transform: Any) -> RecipeStages:
    """Split ``transform`` (a torchvision/timm ``Compose``) into :class:`RecipeStages`; :class:`UnsupportedTransform`
    when it is not ``random resized crop, PIL stages, ToTensor, Normalize[, RandomErasing]``."""
    stages = list(getattr(transform, "transforms", [transform]))
    if not stages or not (hasattr(stages[0], "get_params") and hasattr(stages[0], "ratio")):
        raise UnsupportedTransform(f"it starts with {stages[0] if stages else 'nothing'!r}, not a RandomResizedCrop")
    names = [type(stage).__name__ for stage in stages]
    to_tensor = next((i for i, name in enumerate(names) if name in TO_TENSOR), None)
    if to_tensor is None:
        raise UnsupportedTransform("it has no ToTensor stage")
    tail = stages[to_tensor + 1 :]
    normalize = tail.pop(0) if tail and isinstance(tail[0], T.Normalize) else None
    erasing = tail.pop(0) if tail and isinstance(tail[0], RandomErasing) else None
    if tail:
        raise UnsupportedTransform(f"it runs {tail[0]!r} on the tensor")
    if erasing is not None and erasing.num_splits > 1:
        raise UnsupportedTransform("its RandomErasing leaves a clean split (num_splits)")
    interpolations = stages[0].interpolation
    if not isinstance(interpolations, (list, tuple)):
        interpolations = [interpolations]
    if any(mode not in PIL_RESIZE for mode in interpolations):
        raise UnsupportedTransform(f"its crop interpolates with {stages[0].interpolation!r}")
    mean = tuple(float(v) for v in (normalize.mean if normalize is not None else (0.0, 0.0, 0.0)))
    std = tuple(float(v) for v in (normalize.std if normalize is not None else (1.0, 1.0, 1.0)))
    return RecipeStages(stages[0], tuple(stages[1:to_tensor]), mean, std, erasing)


# ------------------------------------------------------------------------------------------- decoding the crop


@dataclass(frozen=True)
class EncodedImage:
    """A file's bytes, read and not yet decoded (what the fast dataset's loader hands its transform)."""

    path: str
    data: bytes


def read_encoded(path: str) -> EncodedImage:
    """The bytes of ``path``; a file that cannot be read raises the default loader's :class:`DataError`."""
    try:
        with open(path, "rb") as handle:
            return EncodedImage(path, handle.read())
    except OSError as error:
        raise unreadable_image(path, error) from None


def dct_scale(box_height: int, box_width: int, out_height: int, out_width: int) -> int:
    """The largest JPEG DCT scale s (1, 2, 4 or 8) at which a ``box_height`` x ``box_width`` window still covers the
    output size: ``box / s >= output`` in both directions."""
    return next((s for s in DCT_SCALES if box_height >= s * out_height and box_width >= s * out_width), 1)


def _uint8_view(image: Image.Image) -> torch.Tensor:
    """``image`` (RGB) as an (H, W, 3) uint8 tensor over a read-only copy of its pixels."""
    with warnings.catch_warnings():  # read-only: torch warns although nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image))


def torch_resize(window: Image.Image, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``window`` (RGB) resized to ``size`` (height, width) with antialiasing by torch's uint8 kernels (``mode``
    bilinear or bicubic: Pillow's filters, to within one level), as an (H, W, 3) uint8 tensor."""
    pixels = _uint8_view(window)
    height, width = pixels.shape[:2]
    # (1, 3, H, W) over the (H, W, 3) pixels, strided as channels_last with a batch stride of H * W * 3 (which keeps
    # torch's result channels_last too): its vectorised kernels, and no transposing copy on either side
    batch = pixels.as_strided((1, 3, height, width), (height * width * 3, 1, width * 3, 3))
    return F.interpolate(batch, size=size, mode=mode, antialias=True)[0].permute(1, 2, 0).contiguous()


ROW_MARGIN = 32  # rows decoded past the window: whole iDCT blocks and chroma upsampling context for its last rows
SOF_HEIGHTS = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman frames: rows can be cut short


def jpeg_height_offset(data: bytes) -> int | None:
    """The byte offset of the frame height in ``data`` when it is a well-formed baseline/extended/progressive JPEG
    (SOI, length-framed segments up to the first SOS, one frame header, ending with EOI); None otherwise."""
    if len(data) < 4 or data[-2:] != b"\xff\xd9":
        return None
    offset = None
    for marker, position, length in jpeg_segments(data):
        if is_jpeg_frame(marker):
            if offset is not None or marker not in SOF_HEIGHTS or length < 8:
                return None
            offset = position + 5
        elif marker == JPEG_START_OF_SCAN:
            return offset
    return None


def rows_cut(data: bytes, rows: int) -> bytes | None:
    """A copy of JPEG ``data`` whose frame header declares only its first ``rows`` rows (a decoder then stops
    there, the pixels of those rows as in a full decode save the last few: keep :data:`ROW_MARGIN` spare); None
    when ``data`` is not a JPEG that can be cut (:func:`jpeg_height_offset`) or is not taller than ``rows``."""
    offset = jpeg_height_offset(data)
    if offset is None or int.from_bytes(data[offset : offset + 2], "big") <= rows:
        return None
    return b"".join((data[:offset], rows.to_bytes(2, "big"), data[offset + 2 :]))


def _load_rgb(image: Image.Image, scale: int, width: int) -> tuple[Image.Image, float]:
    """(``image`` decoded at DCT scale ``scale`` when it is a JPEG, made RGB; its width over ``width``)."""
    factor = 1.0
    if scale > 1 and image.format == "JPEG":
        drafted = image.draft("RGB", (image.width // scale, image.height // scale))
        if drafted is not None:
            factor = drafted[1][2] / width
    image.load()
    return (image if image.mode == "RGB" and "transparency" not in image.info else to_rgb(image)), factor


def decode_window(
    encoded: EncodedImage, crop: Any, size: tuple[int, int]
) -> tuple[Image.Image, tuple[float, float, float, float], T.InterpolationMode]:
    """(RGB image, window (top, left, height, width) in its pixels, interpolation) for ``crop``'s random window of
    the image: the box from ``crop.get_params`` on the image's header (the recipe's own draws), the interpolation
    drawn as the recipe draws it when it lists several, the image decoded at the largest DCT scale that keeps the
    window at least ``size`` (:func:`dct_scale`; JPEG only: the window is then in the scaled pixels, fractional)
    and made RGB by the default loader's rules. A file that cannot be decoded raises the default loader's
    :class:`DataError`."""
    try:
        image = open_image(io.BytesIO(encoded.data))
        box = crop.get_params(image, crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, (list, tuple)):
            interpolation = random.choice(interpolation)
        scale = dct_scale(box[2], box[3], *size)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise unreadable_image(encoded.path, error) from None
    cut = rows_cut(encoded.data, box[0] + box[2] + ROW_MARGIN) if image.format == "JPEG" else None
    if cut is not None:
        with contextlib.suppress(*UNREADABLE_IMAGE_ERRORS):  # a cut that does not decode: the whole file below
            rgb, factor = _load_rgb(open_image(io.BytesIO(cut)), scale, image.width)
            return rgb, tuple(value * factor for value in box), interpolation
    try:
        rgb, factor = _load_rgb(image, scale, image.width)
    except UNREADABLE_IMAGE_ERRORS as error:
        raise unreadable_image(encoded.path, error) from None
    return rgb, tuple(value * factor for value in box), interpolation


FLIPS = (T.RandomHorizontalFlip, T.RandomVerticalFlip)


class FastTrainTransform:
    """The recipe's training transform on an :class:`EncodedImage` as the fast loader runs it, ending in an (H, W,
    3) uint8 tensor (normalisation and erasing follow on the device): :func:`decode_window`, then the window resized
    to the crop size — at DCT scale 1 by :func:`torch_resize`, the recipe's flips that directly follow the crop
    applied to the resized window (flips commute with the symmetric resampling filters; their draws keep their
    order), else by Pillow from the scaled pixels — then the recipe's other PIL stages, unchanged."""

    def __init__(self, stages: RecipeStages) -> None:
        self.stages = stages
        leading = next((i for i, stage in enumerate(stages.pil_stages) if not isinstance(stage, FLIPS)), None)
        self.flips = stages.pil_stages[:leading]
        self.rest = stages.pil_stages[len(self.flips) :]

    def __call__(self, encoded: EncodedImage) -> torch.Tensor:
        size = self.stages.size
        image, (top, left, height, width), interpolation = decode_window(encoded, self.stages.crop, size)
        mode = TORCH_RESIZE.get(interpolation)
        if mode is not None and all(float(v).is_integer() for v in (top, left, height, width)):
            window = image.crop((int(left), int(top), int(left + width), int(top + height)))
            pixels = torch_resize(window, size, mode)
            for flip in self.flips:  # the flip's own draw, its flip applied to the (smaller) resized window
                if torch.rand(1) < flip.p:
                    pixels = pixels.flip(1 if isinstance(flip, T.RandomHorizontalFlip) else 0)
            if not self.rest:
                return pixels
            image = Image.frombuffer("RGB", (size[1], size[0]), pixels.numpy(), "raw", "RGB", 0, 1)
        else:
            image = image.resize(size[::-1], PIL_RESIZE[interpolation], box=(left, top, left + width, top + height))
            for flip in self.flips:
                image = flip(image)
        for stage in self.rest:
            image = stage(image)
        return _uint8_view(image.convert("RGB") if image.mode != "RGB" else image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stages})"


# ---------------------------------------------------------------------------------------- finishing on the device


@contextlib.contextmanager
def seeded_draws(seed: int, device: torch.device) -> Iterator[None]:
    """Within the block, Python's ``random`` and torch's generator of ``device`` are seeded with ``seed``; both are
    restored afterwards (what timm's ``RandomErasing`` draws from)."""
    state = random.getstate()
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    try:
        with torch.random.fork_rng(devices=[index] if cuda else []):
            random.seed(seed)
            (torch.cuda.default_generators[index] if cuda else torch.random.default_generator).manual_seed(seed)
            yield
    finally:
        random.setstate(state)


class DeviceErasing:
    """timm's ``RandomErasing`` run on ``device`` batches, its draws seeded per batch from (seed, epoch, batch
    number, rank) (:func:`seeded_draws`, :func:`projector_kd.engine.sampling.batch_seed`)."""

    def __init__(self, recipe: RandomErasing, device: torch.device) -> None:
        self.device = device
        self.erasing = copy.copy(recipe)
        self.erasing.device = device

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        with seeded_draws(seed, self.device):
            return self.erasing(images)


def _pinned_copy(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


class DeviceFinishedLoader:
    """A training ``DataLoader`` of uint8 NHWC image batches (first element of each batch; the rest — labels,
    torchdistill's supplementary dict — pass through, tensors moved to ``device``) seen as one of normalised float32
    NCHW batches on ``device`` (channels_last), optionally randomly erased (:class:`DeviceErasing`). It keeps what
    the training loops read: ``len()``, ``batch_sampler`` and ``sampler`` (a
    :class:`~projector_kd.engine.sampling.ResumableSampler`), ``dataset``, ``num_workers``."""

    def __init__(
        self,
        loader: DataLoader,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        erasing: RandomErasing | None = None,
    ) -> None:
        self.loader = loader
        self.device = device
        self.mean = torch.tensor([255 * m for m in mean], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=device).view(1, -1, 1, 1)
        self.erasing = DeviceErasing(erasing, device) if erasing is not None and erasing.probability > 0 else None
        self.stream: torch.cuda.Stream | None = None

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    @property
    def sampler(self) -> Any:
        return self.loader.batch_sampler.sampler

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def num_workers(self) -> int:
        return self.loader.num_workers

    def __len__(self) -> int:
        return len(self.loader)

    def finish(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """One uint8 NHWC batch as normalised float32 NCHW on the device (erased with draws from ``seed``)."""
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
        return self.erasing(images, seed) if self.erasing is not None else images

    def __iter__(self) -> Iterator[Any]:
        sampler = training_sampler(self.loader)
        epoch, number, seed, rank = sampler.epoch, sampler.start_batch, sampler.seed, sampler.rank
        cuda = self.device.type == "cuda"
        if cuda and self.stream is None:  # one stream for the loader's life: the allocator pools blocks per stream
            self.stream = torch.cuda.Stream(device=self.device)
        consumer = torch.cuda.current_stream(self.device) if cuda else None
        ready = None
        for images, *rest in self.loader:
            if consumer is not None:  # blocks the consumer released may be reused below: wait for its queued work
                self.stream.wait_stream(consumer)
            with torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
                batch = [self.finish(images, batch_seed(seed, epoch, number, rank))]
                batch += [_pinned_copy(value, self.device) for value in rest]
            number += 1
            if ready is not None:
                yield ready
            if consumer is not None:
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_stream(self.stream)
            ready = batch
        if ready is not None:
            yield ready


# --------------------------------------------------------------------------------------------------- the loader


def _with_innermost(dataset: Any, replacement: Any) -> Any:
    """``dataset``'s wrapper chain (shallow copies) around ``replacement`` instead of its image folder."""
    if isinstance(dataset, SeededSamples):
        return SeededSamples(_with_innermost(dataset.dataset, replacement), dataset.seed)
    if hasattr(dataset, "org_dataset"):
        wrapper = copy.copy(dataset)
        wrapper.org_dataset = _with_innermost(dataset.org_dataset, replacement)
        return wrapper
    return replacement


def fast_training_loader(loader: DataLoader, device: torch.device, name: str = "training") -> Any:
    """``loader`` (a resumable training loader over an image folder with the recipe's transform) as the fast CPU
    loader: the same files, sampler, batches, workers and per-sample seeds, the transform run as
    :class:`FastTrainTransform` and finished on ``device`` by :class:`DeviceFinishedLoader` (pinned memory on CUDA,
    persistent workers). A transform it cannot run (:func:`recipe_stages`) keeps the recipe's loader, with one log
    line saying why."""
    folder = innermost_dataset(loader.dataset)
    batches = loader.batch_sampler  # rebuilt from its sampler, so that the new loader's .sampler is that one too
    settings = dict(
        sampler=batches.sampler,
        batch_size=batches.batch_size,
        drop_last=batches.drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=loader.num_workers > 0,
    )
    try:
        if not hasattr(folder, "samples") or not hasattr(folder, "loader"):
            raise UnsupportedTransform(f"it reads {type(folder).__name__}, not an image folder")
        stages = recipe_stages(folder.transform)
    except UnsupportedTransform as reason:
        logger.info("%s: the fast CPU loader cannot run this transform (%s); using the recipe's loader", name, reason)
        return rebuild_loader(loader, **settings)
    fast_folder = copy.copy(folder)
    fast_folder.loader = read_encoded
    fast_folder.transform = FastTrainTransform(stages)
    fast = rebuild_loader(loader, dataset=_with_innermost(loader.dataset, fast_folder), **settings)
    logger.info(
        "%s: fast CPU loader (crop-window JPEG decoding, uint8 batches normalised%s on %s)",
        name,
        " and randomly erased" if stages.erasing is not None else "",
        device,
    )
    return DeviceFinishedLoader(fast, device, stages.mean, stages.std, stages.erasing)
