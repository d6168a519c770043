"""The DALI loader (``--loader dali``) on DALI's CPU pipeline: the recipe's transforms translated, torchvision's crop
semantics (area and aspect ranges, central fallback, flip rate), pixels against PIL for the same windows, deterministic
batches, exact resume through the entry point without decoding skipped batches, ``-test_only`` accuracy equal to the
torchvision loader's, and bad images named or skipped as with the default loader."""

from __future__ import annotations

import io
import json
import math
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torchvision import transforms as T

from imagenet import dali as resnet_dali
from imagenet.config import check_recipe, find_recipe, load_recipe, resolve
from projector_kd.engine import dali
from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.data import CheckedImageFolder, DataError, load_rgb
from projector_kd.engine.errors import UserError
from projector_kd.engine.sampling import resumable_loader, training_sampler

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CROP = 16  # the crop_recipe fixture's crop size
PIXEL_LEVEL = 1 / 255  # one 8-bit level after ToTensor


def assert_close_to_pil(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Normalised batches against the torchvision/PIL reference, in 8-bit levels. Decoding is identical (DALI's CPU
    decoder is libjpeg-turbo, as PIL's); DALI's antialiased bilinear resize (float filter weights, edge pixels
    replicated) differs from PIL's (fixed-point weights, kernel cut at the edge): measured on these grainy images, a
    mean of 0.2 levels, under 0.4 % of values off by more than one level, at most 3 levels."""
    levels = ((ours - reference) * torch.tensor(STD)[:, None, None]).abs() / PIXEL_LEVEL
    assert ours.shape == reference.shape
    assert levels.max().item() <= 3 + 1e-3 and levels.mean().item() <= 0.25
    assert (levels > 1 + 1e-3).float().mean().item() <= 0.01


def train_transform(size: int = CROP) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(MEAN, STD)])


def val_transform(resize: int = CROP + 2, crop: int = CROP) -> T.Compose:
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(MEAN, STD)])


def torch_loader(root: Path, transform, train: bool, batch_size: int = 8, on_bad_image: str = "fail") -> DataLoader:
    dataset = CheckedImageFolder(root, transform=transform, on_bad_image=on_bad_image)
    sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train)


def seeded_train_loader(data: Path, on_bad_image: str) -> DataLoader:
    """The training loader as the entry point builds it: batches of 8 in the shared sampler's order for seed 0."""
    return resumable_loader(torch_loader(data / "train", train_transform(), True, on_bad_image=on_bad_image), seed=0)


# ------------------------------------------------------------------------------------------------- translation


def test_the_release_recipe_transforms_translate_exactly():
    recipe = load_recipe(find_recipe("configs/ilsvrc2012/ours/res3418.yaml"))
    plans = {
        name: dali.plan_transform(resolve(node["init"]["kwargs"]["transform"]), name)
        for name, node in recipe["datasets"].items()
    }
    assert plans["ilsvrc2012/train"] == dali.TransformPlan(
        random_crop_size=(224, 224),
        random_crop_scale=(0.08, 1.0),
        random_crop_ratio=(3 / 4, 4 / 3),
        flip_probability=0.5,
        mean=tuple(MEAN),
        std=tuple(STD),
    )
    assert plans["ilsvrc2012/val"] == dali.TransformPlan(
        resize=(256,), center_crop=(224, 224), mean=tuple(MEAN), std=tuple(STD)
    )


@pytest.mark.parametrize(
    "stages, named",
    [
        ([T.RandomResizedCrop(8, interpolation=T.InterpolationMode.NEAREST), T.ToTensor()], "RandomResizedCrop"),
        ([T.ColorJitter(0.4), T.ToTensor()], "ColorJitter"),
        ([T.RandomHorizontalFlip(), T.RandomResizedCrop(8), T.ToTensor()], "RandomResizedCrop"),
        ([T.RandomResizedCrop(8)], None),
    ],
)
def test_transforms_dali_cannot_run_exactly_are_refused_by_name(stages, named):
    with pytest.raises(UserError) as raised:
        dali.plan_transform(T.Compose(stages), "train.train_data_loader")
    message = str(raised.value)
    assert message.startswith("train.train_data_loader: --loader dali ") and "use --loader torchvision" in message
    if named:
        assert f"cannot run the transform {named}(" in message
    else:
        assert "needs a transform ending in ToTensor" in message


# ------------------------------------------------------------------------------------------------ crop semantics


def _uniforms(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, dali.UNIFORMS_PER_SAMPLE))


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (64, 64)])
def test_crop_windows_have_torchvision_area_and_aspect_ranges_and_distribution(height, width):
    count = 20000
    sizes = np.tile([height, width], (count, 1))
    top, left, h, w = dali.random_resized_crop_windows(
        sizes[:, 0], sizes[:, 1], (0.08, 1.0), (3 / 4, 4 / 3), _uniforms(count, 0)
    ).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area, aspect = h * w / (height * width), w / h
    # w and h are rounded to whole pixels: the ranges hold up to half a pixel on each side
    slack = 1 / min(h.min(), w.min())
    assert area.min() >= 0.08 * (1 - slack) ** 2 and area.max() <= 1.0
    assert aspect.min() >= 3 / 4 * (1 - slack) / (1 + slack) and aspect.max() <= 4 / 3 * (1 + slack) / (1 - slack)
    # the same statistics from torchvision's own sampler, 4 standard errors apart at most
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    reference = np.array([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    ref_area = reference[:, 2] * reference[:, 3] / (height * width)
    ref_aspect = reference[:, 3] / reference[:, 2]
    for ours, theirs in (
        (area, ref_area),
        (np.log(aspect), np.log(ref_aspect)),
        (top / np.maximum(height - h, 1), reference[:, 0] / np.maximum(height - reference[:, 2], 1)),
    ):
        error = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
        assert abs(ours.mean() - theirs.mean()) <= 4 * error


def test_no_fitting_attempt_falls_back_to_torchvision_central_crop():
    heights, widths = np.array([12, 400]), np.array([60, 10])  # too wide, too tall: no attempt can fit
    windows = dali.random_resized_crop_windows(heights, widths, (0.9, 1.0), (1.0, 1.0), _uniforms(2, 1))
    expected = [
        T.RandomResizedCrop.get_params(torch.zeros(1, h, w), [0.9, 1.0], [1.0, 1.0]) for h, w in zip(heights, widths)
    ]
    assert windows.tolist() == [list(window) for window in expected] == [[0, 24, 12, 12], [195, 0, 10, 10]]
    # an image within the ratio range whose attempts all drew the extreme aspect 0.9: the whole image
    uniforms = _uniforms(1, 2)
    uniforms[:, dali.CROP_ATTEMPTS : 2 * dali.CROP_ATTEMPTS] = 0.0
    whole = dali.random_resized_crop_windows(np.array([100]), np.array([100]), (1.0, 1.0), (0.9, 1.1), uniforms)
    assert whole.tolist() == [[0, 0, 100, 100]]


def test_flip_rate_is_the_recipe_probability():
    plan = dali.TransformPlan(flip_probability=0.5)
    count = sum(
        int(dali.sample_parameters(plan, np.full((256, 2), 32), dali.batch_uniforms(7, number, 256))["flip"].sum())
        for number in range(40)
    )
    trials = 40 * 256
    assert abs(count - trials / 2) <= 4 * math.sqrt(trials / 4)  # binomial(10240, 0.5): 4 standard deviations


@pytest.mark.parametrize(
    "height, width, size, crop",
    [(27, 41, (18,), (16, 16)), (41, 27, (17,), (16, 16)), (12, 60, (20, 30), (24, 24)), (30, 40, (15,), (20, 20))],
)
def test_resize_and_centre_crop_geometry_is_torchvision(height, width, size, crop):
    new = dali.resized_size(height, width, size, None)
    image = Image.new("RGB", (width, height))
    resized = T.Resize(size if len(size) == 2 else size[0])(image)
    assert new == (resized.height, resized.width)
    top, left = dali.center_crop_window(*new, crop)
    marked = np.zeros((new[0], new[1]), dtype=np.uint8)
    marked[max(top, 0), max(left, 0)] = 255  # the first pixel of the window that lies in the image
    cropped = np.asarray(T.CenterCrop(crop)(Image.fromarray(marked)))
    assert cropped[max(-top, 0), max(-left, 0)] == 255 and cropped.sum() == 255


# ---------------------------------------------------------------------------------------------- pipeline output


def _reference_batch(dataset, indices, params, flips) -> torch.Tensor:
    """PIL decode + the same windows + torchvision's resize/flip/ToTensor/Normalize."""
    images = []
    for slot, index in enumerate(indices):
        (top, left), (h, w) = params["window_anchor"][slot], params["window_shape"][slot]
        image = load_rgb(dataset.samples[index][0]).crop((left, top, left + w, top + h))
        image = image.resize((CROP, CROP), Image.BILINEAR)
        if flips[slot]:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        images.append(T.Normalize(MEAN, STD)(T.ToTensor()(image)))
    return torch.stack(images)


def test_train_batches_match_pil_for_the_same_windows_in_the_torchvision_loader_order(jpeg_data):
    loader = torch_loader(jpeg_data / "train", train_transform(), train=True)
    torch.manual_seed(0)
    torchvision_labels = [labels.tolist() for _, labels in loader]
    torch.manual_seed(0)
    epoch = iter(resnet_dali.DaliLoader(loader, torch.device("cpu"), train=True))
    batches = list(epoch)
    torch.manual_seed(0)
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    order = list(loader.batch_sampler)
    assert epoch.seed == seed and len(batches) == len(order) == 3
    assert [labels.tolist() for _, labels, _ in batches] == torchvision_labels
    dataset = loader.dataset
    ours, reference, flips = [], [], 0
    for number, ((images, labels, supp), indices) in enumerate(zip(batches, order)):
        assert images.shape == (8, 3, CROP, CROP) and images.dtype == torch.float32 and supp == {}
        assert labels.tolist() == [dataset.samples[i][1] for i in indices]
        sizes = np.array([load_rgb(dataset.samples[i][0]).size[::-1] for i in indices])
        params = dali.sample_parameters(
            dali.plan_transform(train_transform(), "train"), sizes, dali.batch_uniforms(seed, number, len(indices))
        )
        flips += int(params["flip"].sum())
        ours.append(images)
        reference.append(_reference_batch(dataset, indices, params, params["flip"]))
    assert_close_to_pil(torch.cat(ours), torch.cat(reference))
    assert 0 < flips < 24  # both orientations occur (a wrong flip or window would show as large differences above)


def test_val_batches_match_torchvision(jpeg_data):
    loader = torch_loader(jpeg_data / "val", val_transform(), train=False)
    reference = torch.cat([images for images, _ in loader])
    ours = torch.cat([images for images, _, _ in resnet_dali.DaliLoader(loader, torch.device("cpu"), train=False)])
    assert ours.shape == (21, 3, CROP, CROP)
    assert_close_to_pil(ours, reference)


def test_centre_crop_larger_than_the_image_pads_with_zeros_as_torchvision(jpeg_data):
    transform = T.Compose([T.CenterCrop(44), T.ToTensor(), T.Normalize(MEAN, STD)])
    dataset = CheckedImageFolder(jpeg_data / "val", transform=transform)
    loader = DataLoader(dataset, batch_size=4, sampler=SequentialSampler(dataset))
    images, _, _ = next(iter(resnet_dali.DaliLoader(loader, torch.device("cpu"), train=False)))
    reference = torch.stack([dataset[i][0] for i in range(4)])
    assert torch.allclose(images, reference, atol=1e-5)  # no resampling: decoding and padding are exact


def test_training_batches_are_a_pure_function_of_seed_epoch_and_batch_number(jpeg_data):
    train = resumable_loader(torch_loader(jpeg_data / "train", train_transform(), train=True), seed=3)
    loader = resnet_dali.DaliLoader(train, torch.device("cpu"), train=True)
    sampler = training_sampler(loader)
    torch.manual_seed(0)  # torch's global generator plays no part
    first = [images for images, _, _ in loader]
    sampler.set_epoch(1)
    second_epoch = [images for images, _, _ in loader]
    torch.manual_seed(1)
    sampler.set_epoch(0)
    again = [images for images, _, _ in loader]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, second_epoch))
    sampler.set_epoch(0, start_batch=2)  # resuming at batch 2: batches 0 and 1 are neither read nor decoded
    epoch = iter(loader)
    images, _, _ = next(epoch)
    assert torch.equal(images, first[2])
    with pytest.raises(StopIteration):
        next(epoch)


def test_grey_cmyk_and_png_images_decode_to_the_rgb_pixels_pil_gives(tmp_path):
    """ImageNet holds greyscale and CMYK JPEGs (and a PNG): DALI's decoder converts them to the same RGB as PIL's
    ``convert("RGB")`` (no resampling here, so the comparison is exact)."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)).resize((64, 48), Image.BICUBIC)
    for name, mode, kind in (
        ("grey", "L", "JPEG"),
        ("cmyk", "CMYK", "JPEG"),
        ("rgba", "RGBA", "PNG"),
        ("palette", "P", "PNG"),
    ):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        base.convert(mode).save(folder / f"0.{kind.lower()}", format=kind)
    transform = T.Compose([T.ToTensor()])
    dataset = CheckedImageFolder(tmp_path / "images", transform=transform)
    loader = DataLoader(dataset, batch_size=4, sampler=SequentialSampler(dataset))
    images, labels, _ = next(iter(resnet_dali.DaliLoader(loader, torch.device("cpu"), train=False)))
    assert labels.tolist() == [0, 1, 2, 3]
    assert torch.allclose(images, torch.stack([dataset[i][0] for i in range(4)]), atol=1e-6)


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG of ``pixels`` (uint16, H x W greyscale or H x W x 3 RGB), which PIL cannot write in RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 16, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def deep_and_transparent_pngs(tmp_path_factory) -> Path:
    """One 8 x 6 image per class folder: 16-bit greyscale and RGB PNGs (values around the 8-bit rounding points
    included), RGBA and LA PNGs with varied alpha, palette, greyscale and RGB PNGs with a transparent colour."""
    root = tmp_path_factory.mktemp("deep-and-transparent")
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (6, 8), dtype=np.uint16)
    grey16[0, :4] = [128, 129, 383, 65535]  # round(v / 257) = 0, 1, 1, 255 where the high byte is 0, 0, 1, 255
    rgb16 = rng.integers(0, 65536, (6, 8, 3), dtype=np.uint16)
    rgb16[0, 0] = [128, 129, 383]
    rgba = rng.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    coarse = rgba[..., :3] // 64 * 64  # few colours, so the transparent one occurs often
    for name in ("a_grey16", "b_rgb16", "c_rgba", "d_la", "e_palette_trns", "f_grey_trns", "g_rgb_trns"):
        (root / name).mkdir()
    write_png16(root / "a_grey16" / "0.png", grey16)
    write_png16(root / "b_rgb16" / "0.png", rgb16)
    Image.fromarray(rgba, "RGBA").save(root / "c_rgba" / "0.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(root / "d_la" / "0.png")
    palette = Image.fromarray(coarse).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.save(root / "e_palette_trns" / "0.png", transparency=int(np.asarray(palette)[0, 0]))
    Image.fromarray(coarse[..., 0], "L").save(root / "f_grey_trns" / "0.png", transparency=int(coarse[0, 0, 0]))
    Image.fromarray(coarse).save(root / "g_rgb_trns" / "0.png", transparency=tuple(int(v) for v in coarse[0, 0]))
    return root


# the whole-image decoder, and the crop-window decoder over the whole image (scale 1, the image's own aspect)
PNG_TRANSFORMS = pytest.mark.parametrize(
    "transform",
    [
        T.Compose([T.ToTensor()]),
        T.Compose([T.RandomResizedCrop((6, 8), scale=(1, 1), ratio=(4 / 3, 4 / 3)), T.ToTensor()]),
    ],
    ids=["whole-image", "crop-window-decoder"],
)


def dali_and_default_pixels(root: Path, transform, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 7 images of ``root`` through the DALI loader on ``device`` (moved to the CPU) and the default loader's."""
    dataset = CheckedImageFolder(root, transform=transform)
    loader = DataLoader(dataset, batch_size=7, sampler=SequentialSampler(dataset))
    images, labels, _ = next(iter(resnet_dali.DaliLoader(loader, device, train=False)))
    assert images.device == device and labels.tolist() == list(range(7))
    return images.cpu(), torch.stack([dataset[i][0] for i in range(7)])


@PNG_TRANSFORMS
def test_16_bit_and_transparent_pngs_give_the_default_loaders_pixels(deep_and_transparent_pngs, transform):
    """DALI alone drops transparency (the default loader composites over white) and rounds 16-bit RGB to 8 bits (PIL
    keeps the high byte); such files reach DALI as the default loader's own RGB, so the pixels are identical."""
    first_two = sorted(deep_and_transparent_pngs.glob("*/0.png"))[:2]
    assert [Image.open(path).mode for path in first_two] == ["I;16", "RGB"]
    images, reference = dali_and_default_pixels(deep_and_transparent_pngs, transform, torch.device("cpu"))
    assert images.shape == reference.shape == (7, 3, 6, 8)
    assert ((images - reference) * 255).abs().amax(dim=(1, 2, 3)).round().tolist() == [0] * 7  # per image, in levels
    assert (reference[0, :, 0, :4] * 255).round().tolist() == [[0, 1, 1, 255]] * 3  # 16-bit scale, rounded
    assert (reference[1, :, 0, 0] * 255).round().tolist() == [0, 0, 1]  # PIL's high byte of 128, 129, 383


@pytest.mark.gpu
@PNG_TRANSFORMS
def test_mixed_decoder_gives_the_default_loaders_pixels_for_16_bit_and_transparent_pngs(
    deep_and_transparent_pngs, transform, gpu_device
):
    """On CUDA: the lossless 8-bit PNGs these files reach DALI as decode through the "mixed" decoder to exactly the
    default loader's pixels, as on the CPU."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed: pip install -r requirements-dali.txt")
    images, reference = dali_and_default_pixels(deep_and_transparent_pngs, transform, gpu_device)
    assert ((images - reference) * 255).abs().amax(dim=(1, 2, 3)).round().tolist() == [0] * 7


@pytest.mark.parametrize(
    "mode, save, handed_as_is",
    [
        ("RGB", {"format": "JPEG"}, True),
        ("CMYK", {"format": "JPEG"}, True),
        ("RGB", {"format": "PNG"}, True),
        ("P", {"format": "PNG"}, True),
        ("L", {"format": "PNG"}, True),
        ("P", {"format": "PNG", "transparency": 0}, False),
        ("RGBA", {"format": "PNG"}, False),
        ("I;16", {"format": "PNG"}, False),
        ("RGB", {"format": "BMP"}, False),
        ("RGB", {"format": "WEBP", "lossless": True}, False),
    ],
)
def test_only_files_dali_decodes_as_pil_reach_it_as_they_are(mode, save, handed_as_is):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 40, 90)).convert(mode).save(buffer, **save)
    assert dali.dali_decodes_as_pil(buffer.getvalue()) is handed_as_is


def test_sharding_training_keeps_the_distributed_sampler_evaluation_counts_each_image_once(jpeg_data):
    dataset = CheckedImageFolder(jpeg_data / "val", transform=val_transform())
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    assert resnet_dali.DaliLoader(loader, torch.device("cpu"), train=True).batch_sampler is loader.batch_sampler
    evaluation = resnet_dali.DaliLoader(loader, torch.device("cpu"), train=False)
    labels = torch.cat([labels for _, labels, _ in evaluation])
    assert labels.tolist() == [dataset.samples[i][1] for i in range(1, 21, 2)]  # rank 1 of 2: 10 of 21, no padding


def test_runtime_loader_is_checked_with_the_recipe(make_recipe):
    recipe = load_recipe(make_recipe("check"))
    recipe["runtime"]["loader"] = "dali"
    check_recipe(recipe, "recipe.yaml")
    recipe["runtime"]["loader"] = "nvjpeg"
    with pytest.raises(
        UserError,
        match=r"^recipe\.yaml: runtime: loader = 'nvjpeg' is out of range \(must be "
        r"torchvision or dali\)$",
    ):
        check_recipe(recipe, "recipe.yaml")


# ---------------------------------------------------------------------------------------------- bad images


def test_a_truncated_jpeg_fails_naming_the_file_or_is_skipped_and_counted(
    jpeg_data, tmp_path, caplog, train_image_in_batch
):
    data = shutil.copytree(jpeg_data, tmp_path / "data")
    bad = train_image_in_batch(data, 1)  # read in the seeded order (drop_last leaves some images out)
    content = bad.read_bytes()
    bad.write_bytes(content[:-200])  # header intact, scan cut short: DALI alone would decode it, grey-filled
    with pytest.raises(DataError) as expected:
        load_rgb(str(bad))
    with pytest.raises(DataError) as raised:
        list(resnet_dali.DaliLoader(seeded_train_loader(data, "fail"), torch.device("cpu"), True))
    assert str(raised.value) == str(expected.value)  # the torchvision loader's line, naming the file
    assert str(raised.value).startswith(f"unreadable image {bad} (OSError: image file is truncated")
    loader = resnet_dali.DaliLoader(seeded_train_loader(data, "skip"), torch.device("cpu"), True)
    assert sum(len(labels) for _, labels, _ in loader) == 24
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert len(skips) == 1 and str(bad) in skips[0] and skips[0].endswith("(1 skipped so far in this process)")


def test_a_decode_error_inside_dali_is_traced_to_its_file(jpeg_data, tmp_path, monkeypatch):
    """A PNG whose header reads but whose pixel data is corrupt passes the size check and fails in DALI's decoder."""
    diagnosed = []
    real_diagnose = resnet_dali.DaliLoader.diagnose
    monkeypatch.setattr(
        resnet_dali.DaliLoader,
        "diagnose",
        lambda self, batches, error: (diagnosed.append(str(error)), real_diagnose(self, batches, error))[1],
    )
    data = shutil.copytree(jpeg_data, tmp_path / "data")
    bad = data / "val" / "class2" / "03.png"
    Image.open(data / "val" / "class2" / "03.jpg").save(bad)
    (data / "val" / "class2" / "03.jpg").unlink()
    raw = bytearray(bad.read_bytes())
    start = raw.index(b"IDAT") + 8
    raw[start : start + 64] = bytes(64)
    bad.write_bytes(bytes(raw))
    loader = torch_loader(data / "val", val_transform(), train=False)
    with pytest.raises(UserError) as raised:
        list(resnet_dali.DaliLoader(loader, torch.device("cpu"), train=False))
    assert str(raised.value).startswith(f"unreadable image {bad} (")
    skipping = resnet_dali.DaliLoader(
        torch_loader(data / "val", val_transform(), False, on_bad_image="skip"), torch.device("cpu"), train=False
    )
    labels = torch.cat([labels for _, labels, _ in skipping])
    assert len(labels) == 21 and skipping.skipped == {skipping.dataset.samples.index((str(bad), 2))}
    assert len(diagnosed) == 2 and all("Error in CPU operator" in error for error in diagnosed)  # DALI's own errors


def test_without_dali_the_loader_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(
        UserError,
        match=r"--loader dali needs NVIDIA DALI: pip install '\.\[dali\]' \(or "
        r"nvidia-dali-cuda130==2\.4\.0\), or use --loader torchvision",
    ):
        dali.require_dali()


@pytest.mark.gpu
def test_mixed_pipeline_on_the_gpu_gives_the_cpu_pipelines_batches(jpeg_data, gpu_device):
    """On CUDA: DALI's "mixed" decoder (nvJPEG) and the GPU resize / crop / flip / normalise give the CPU pipeline's
    batches (same windows and flips: they are drawn in Python) up to JPEG decoder rounding, with the same labels, as
    float32 NCHW on the GPU, and a second epoch with the same seed repeats them exactly."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed: pip install -r requirements-dali.txt")
    train = resumable_loader(torch_loader(jpeg_data / "train", train_transform(), train=True), seed=3)
    val = torch_loader(jpeg_data / "val", val_transform(), train=False)
    for loader, is_train in ((train, True), (val, False)):
        epochs = []
        for device in (torch.device("cpu"), gpu_device, gpu_device):
            torch.manual_seed(0)  # the evaluation loader draws its epoch seed from torch's generator
            epochs.append(list(resnet_dali.DaliLoader(loader, device, train=is_train)))
        on_cpu, on_gpu, again = epochs
        assert len(on_gpu) == len(on_cpu) == 3
        for (images, labels, _), (cpu_images, cpu_labels, _), (repeat, _, _) in zip(on_gpu, on_cpu, again):
            assert images.device == gpu_device and images.dtype == torch.float32 and images.shape == cpu_images.shape
            assert torch.equal(labels.cpu(), cpu_labels) and torch.equal(images, repeat)
            levels = ((images.cpu() - cpu_images) * torch.tensor(STD)[:, None, None]).abs() / PIXEL_LEVEL
            # nvJPEG's IDCT rounds differently from libjpeg-turbo's (a level or two); a wrong window or flip is tens
            assert levels.mean().item() <= 0.5 and levels.max().item() <= 8 + 1e-3


# ----------------------------------------------------------------------------------------- through the entry point


@pytest.mark.parametrize(
    "epoch, step, decoded", [(1, 2, [2]), (0, 3, [0, 1, 2])], ids=["mid-epoch", "after-the-epochs-last-step"]
)
def test_stopped_and_resumed_dali_run_is_bit_identical_without_decoding_skipped_batches(
    crop_recipe, jpeg_data, cli, tmp_path, monkeypatch, straight_and_stopped, same_run, epoch, step, decoded
):
    """Stopped after the last step of an epoch, the rerun reads no training batch of it (it validates it first)."""
    recipe = crop_recipe("resume", jpeg_data, epochs=2, student_dropout=0.2)
    common = ("--config", recipe, "--seed", "0", "--loader", "dali")
    stopped, _ = straight_and_stopped(epoch, step, *common)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (epoch, step)

    prepared = []
    real_prepare = resnet_dali.DaliLoader.prepare

    def prepare(self, number, indices, seed, reading=None):
        prepared.append((self.plan.random_crop_size is not None, number))
        return real_prepare(self, number, indices, seed, reading)

    monkeypatch.setattr(resnet_dali.DaliLoader, "prepare", prepare)
    status, out, err = cli(*common, "--output_dir", tmp_path / "interrupted")
    assert status == 0, err
    assert "resuming from" in out and f"at epoch {epoch} step {step}" in out
    assert (f"epoch {epoch} was trained before the resume: validating it" in out) == (step == 3)
    assert [number for train, number in prepared if train] == decoded  # trained batches are not decoded again
    same_run(tmp_path / "straight", tmp_path / "interrupted")


def test_test_only_accuracy_equals_the_torchvision_loader(crop_recipe, jpeg_data, cli, tmp_path):
    recipe = crop_recipe("eval", jpeg_data, epochs=2)
    status, _, err = cli("--config", recipe, "--seed", "0", "--output_dir", tmp_path / "run")
    assert status == 0, err
    results = {}
    for loader in ("torchvision", "dali"):
        status, out, err = cli("--config", recipe, "--output_dir", tmp_path / "run", "-test_only", "--loader", loader)
        assert status == 0, err
        metrics = json.loads((tmp_path / "run" / "test_only" / "metrics.json").read_text())
        results[loader] = (metrics["top1"], metrics["top5"])
    # val pixels differ by at most one 8-bit level (test above): no prediction of this model moves
    assert results["dali"] == results["torchvision"] and 33.0 < results["dali"][0] <= 100.0


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_bad_image_through_the_entry_point(crop_recipe, jpeg_data, cli, tmp_path, policy, train_image_in_batch):
    data = shutil.copytree(jpeg_data, tmp_path / "data")
    bad = train_image_in_batch(data, 0)  # in the first batch: no step trained, no checkpoint to write
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    recipe = crop_recipe("bad", data, on_bad_image=policy)
    status, _, err = cli("--config", recipe, "--seed", "0", "--loader", "dali")
    if policy == "fail":
        assert status == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: unreadable image {bad} (UnidentifiedImageError: ")
        assert "— fix or delete the file, or set on_bad_image: skip" in lines[0]
        if "resumable checkpoint" in lines[0]:  # met mid-epoch: the position was saved first, as with torchvision
            assert (tmp_path / "bad" / "checkpoint.pth").is_file()
            assert lines[0].endswith("run the same command again to continue")
    else:
        assert status == 0, err
        assert f"skipping unreadable image {bad}" in (tmp_path / "bad" / "log.txt").read_text()


def test_two_gloo_ranks_shard_training_and_count_each_val_image_once(
    crop_recipe, jpeg_data, run_entry_on_two_ranks, cli, tmp_path
):
    recipe = crop_recipe("ddp", jpeg_data, batch_size=4)
    result = run_entry_on_two_ranks("--config", recipe, "--world_size", "2", "--seed", "0", "--loader", "dali")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and load_checkpoint(tmp_path / "ddp" / "checkpoint.pth")["global_step"] == 3
    # one process over all 21 val images gives the same accuracy: the 2 shards count each image once (k/21, not k/22)
    status, _, err = cli("--config", recipe, "--output_dir", tmp_path / "ddp", "-test_only", "--loader", "dali")
    assert status == 0, err
    single = json.loads((tmp_path / "ddp" / "test_only" / "metrics.json").read_text())
    assert (metrics["top1"], metrics["top5"]) == (single["top1"], single["top5"])
    assert round(metrics["top1"] * 21 / 100, 6) == round(metrics["top1"] * 21 / 100) and 0 < metrics["top1"] < 100
