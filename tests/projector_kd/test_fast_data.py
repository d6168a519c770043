"""The fast CPU training loader (``projector_kd.engine.fast_data``): the recipe's crop boxes for the same seed, pixels
within the documented bound of the recipe's on real photos, the default loader's image rules and error lines, and
device batches (normalised, randomly erased) that are a pure function of (seed, epoch, batch)."""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader
from torchvision import transforms as T

from projector_kd.engine import fast_data
from projector_kd.engine.data import CheckedImageFolder, DataError, load_rgb
from projector_kd.engine.sampling import resumable_loader, training_sampler

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PHOTOS = [
    str(Path(os.path.dirname(sklearn.datasets.__file__)) / "images" / name) for name in ("china.jpg", "flower.jpg")
]
FAITHFULNESS_BOUND = 2.0  # mean absolute difference in 8-bit levels (docs/faithfulness.md)


def resnet_transform(size: int = 224) -> T.Compose:
    """The ResNet recipe's training transform (configs/ilsvrc2012/ours/res3418.yaml)."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(MEAN, STD)])


def deit_transform(size: int = 224):
    """The DeiT recipe's training transform as deit.datasets.build_transform builds it (timm's create_transform)."""
    return create_transform(
        size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
        re_mode="pixel", re_count=1, color_jitter=0.4, mean=MEAN, std=STD,
    )  # fmt: skip


TRACKS = pytest.mark.parametrize("recipe", [resnet_transform, deit_transform], ids=["resnet", "deit"])


def recorded_boxes(monkeypatch, crop) -> list:
    """Every crop box ``crop``'s class draws from now on."""
    boxes = []
    real = type(crop).get_params

    def get_params(img, scale, ratio):
        boxes.append(tuple(int(v) for v in real(img, scale, ratio)))
        return boxes[-1]

    monkeypatch.setattr(type(crop), "get_params", staticmethod(get_params))
    return boxes


def write_folder(root: Path, images: dict[str, Image.Image], **save) -> Path:
    for name, image in images.items():
        folder = root / name
        folder.mkdir(parents=True)
        image.save(folder / f"0.{save.get('format', 'png').lower()}", **save)
    return root


def seeded_loader(root: Path, transform, batch_size: int = 4, seed: int = 0, **kwargs) -> DataLoader:
    dataset = CheckedImageFolder(root, transform=transform, **kwargs)
    return resumable_loader(DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True), seed=seed)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """The two real photos, 4 copies each, as an image folder of 2 classes."""
    root = tmp_path_factory.mktemp("photos")
    for label, path in enumerate(PHOTOS):
        (root / f"class{label}").mkdir()
        for copy in range(4):
            (root / f"class{label}" / f"{copy}.jpg").write_bytes(Path(path).read_bytes())
    return root


@TRACKS
def test_crop_boxes_and_flips_equal_the_recipe_paths_for_the_same_seed(photo_folder, monkeypatch, recipe):
    transform = recipe()
    boxes = recorded_boxes(monkeypatch, transform.transforms[0])
    recipe_loader = seeded_loader(photo_folder, transform, seed=7)
    fast_loader = fast_data.fast_training_loader(recipe_loader, torch.device("cpu"))
    assert isinstance(fast_loader, fast_data.DeviceFinishedLoader)
    flips = []
    monkeypatch.setattr(torch, "rand", lambda *a, **k: flips.append(torch.empty(*a).uniform_()) or flips[-1])
    for loader in (recipe_loader, fast_loader):
        for epoch in (0, 1):
            training_sampler(loader).set_epoch(epoch)
            list(loader)
    half = len(boxes) // 2
    assert half == 2 * 8 and boxes[:half] == boxes[half:] and len(set(boxes)) > 8
    assert [f.item() for f in flips[: len(flips) // 2]] == [f.item() for f in flips[len(flips) // 2 :]]


@pytest.mark.parametrize("size", [224, 112], ids=["decoded-whole", "dct-scaled"])
@TRACKS
def test_pixels_on_real_photos_are_within_the_documented_bound_of_the_recipes(recipe, size):
    """Same crop box and interpolation: the recipe's PIL crop + resize against the fast path's. At 224 px no window of
    these 640 x 427 photos reaches the 2x DCT scale (torch's resize alone: a hundredth of a level); at 112 px most
    do (DCT-domain downscaling before the antialiased resize: about one level)."""
    crop = fast_data.recipe_stages(recipe(size)).crop
    differences, scales = [], set()
    for k in range(24):
        path = PHOTOS[k % 2]
        random.seed(k), torch.manual_seed(k)
        top, left, height, width = crop.get_params(Image.open(path), crop.scale, crop.ratio)
        window = load_rgb(path).crop((left, top, left + width, top + height))
        reference = np.asarray(window.resize((size, size), fast_data.PIL_RESIZE[crop.interpolation]), dtype=float)
        scales.add(fast_data.dct_scale(height, width, size, size))
        transform = fast_data.FastTrainTransform(fast_data.RecipeStages(crop, (), MEAN, STD, None))
        random.seed(k), torch.manual_seed(k)
        ours = transform(fast_data.read_encoded(path)).numpy().astype(float)
        differences.append(np.abs(ours - reference).mean())
    mean = float(np.mean(differences))
    if size == 224:
        assert scales == {1} and mean <= 0.05
    else:
        assert 2 in scales and 0.3 <= mean <= FAITHFULNESS_BOUND


def test_flips_are_applied_to_the_window_as_the_recipe_applies_them_to_the_crop():
    path = PHOTOS[0]
    stages = fast_data.recipe_stages(resnet_transform(96))
    flipped = fast_data.RecipeStages(stages.crop, (T.RandomHorizontalFlip(1.0),), MEAN, STD, None)
    plain = fast_data.RecipeStages(stages.crop, (), MEAN, STD, None)
    torch.manual_seed(3)
    ours = fast_data.FastTrainTransform(flipped)(fast_data.read_encoded(path))
    torch.manual_seed(3)
    unflipped = fast_data.FastTrainTransform(plain)(fast_data.read_encoded(path))
    assert (ours.float() - unflipped.flip(1).float()).abs().max() <= 1


def whole_image_stages(width: int, height: int) -> fast_data.RecipeStages:
    crop = T.RandomResizedCrop((height, width), scale=(1.0, 1.0), ratio=(width / height, width / height))
    return fast_data.recipe_stages(T.Compose([crop, T.ToTensor()]))


@pytest.mark.parametrize(
    "image, save",
    [
        (Image.fromarray(np.random.default_rng(0).integers(0, 65536, (6, 8), dtype=np.uint16)), {}),
        (Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 8, 4), dtype=np.uint8), "RGBA"), {}),
        (Image.fromarray(np.random.default_rng(2).integers(0, 256, (6, 8, 2), dtype=np.uint8), "LA"), {}),
        (Image.new("RGB", (8, 6), (200, 40, 90)).convert("CMYK"), {"format": "JPEG"}),
        (Image.new("RGB", (8, 6), (200, 40, 90)).convert("L"), {"format": "JPEG"}),
    ],
    ids=["16-bit", "rgba", "la", "cmyk-jpeg", "grey-jpeg"],
)
def test_images_are_read_by_the_default_loaders_rules(tmp_path, image, save):
    buffer = io.BytesIO()
    image.save(buffer, **{"format": "PNG", **save})
    path = tmp_path / "image"
    path.write_bytes(buffer.getvalue())
    ours = fast_data.FastTrainTransform(whole_image_stages(8, 6))(fast_data.read_encoded(str(path)))
    assert ours.shape == (6, 8, 3) and ours.dtype == torch.uint8
    assert torch.equal(ours, torch.from_numpy(np.array(load_rgb(str(path)))))


def test_an_unreadable_image_fails_with_the_default_loaders_line_or_is_skipped(tmp_path, photo_folder, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for folder in photo_folder.iterdir():
        (data / folder.name).mkdir()
        for image in folder.iterdir():
            (data / folder.name / image.name).write_bytes(image.read_bytes())
    bad = data / "class0" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:4000])  # a truncated download
    with pytest.raises(DataError) as expected:
        load_rgb(str(bad))
    transform = fast_data.FastTrainTransform(fast_data.recipe_stages(resnet_transform()))
    with pytest.raises(DataError) as raised:
        transform(fast_data.read_encoded(str(bad)))
    # the default loader's line for the same bytes (Pillow words a truncated file or buffer differently)
    assert str(raised.value) == str(pytest.raises(DataError, load_rgb, str(bad), bad.read_bytes()).value)
    assert str(raised.value).startswith(f"unreadable image {bad} (OSError: ")
    assert str(raised.value).split(")", 1)[1] == str(expected.value).split(")", 1)[1]
    loader = fast_data.fast_training_loader(
        seeded_loader(data, resnet_transform(), batch_size=2, on_bad_image="skip"), torch.device("cpu")
    )
    assert sum(len(labels) for _, labels in loader) == 8
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert len(skips) == 1 and str(bad) in skips[0]


def test_device_batches_are_the_recipes_normalisation_and_a_pure_function_of_seed_epoch_and_batch(photo_folder):
    loader = fast_data.fast_training_loader(
        seeded_loader(photo_folder, deit_transform(32), seed=3), torch.device("cpu")
    )
    assert len(loader) == 2 and training_sampler(loader) is loader.sampler and loader.num_workers == 0
    loader.erasing.erasing.probability = 0.0  # first without erasing: the normalisation alone
    uint8 = next(iter(loader.loader))[0]
    images, labels = next(iter(loader))
    expected = T.Normalize(MEAN, STD)(uint8.permute(0, 3, 1, 2).float() / 255)
    assert images.shape == (4, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images, expected, rtol=0, atol=2e-6)
    loader.erasing.erasing.probability = 1.0
    torch.manual_seed(0), random.seed(0)
    first = [images for images, _ in loader]
    torch.manual_seed(1), random.seed(1)  # the global generators play no part
    again = [images for images, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], expected)
    state = random.getstate(), torch.get_rng_state()
    loader.sampler.set_epoch(0, start_batch=1)  # resumed at batch 1: batch 1 of the uninterrupted epoch
    (resumed, _), *rest = list(loader)
    assert torch.equal(resumed, first[1]) and not rest
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])  # draws restored after
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], first[0])


def test_a_transform_it_cannot_run_keeps_the_recipes_loader(photo_folder, caplog):
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    with caplog.at_level(logging.INFO, logger=fast_data.__name__):
        loader = fast_data.fast_training_loader(seeded_loader(photo_folder, transform), torch.device("cpu"), "train")
    assert isinstance(loader, DataLoader) and training_sampler(loader) is loader.sampler
    assert next(iter(loader))[0].dtype == torch.float32
    assert caplog.messages[-1].startswith(
        "train: the fast CPU loader cannot run this transform (it starts with Resize("
    )


CUT_ENCODINGS = [dict(quality=90), dict(quality=75, progressive=True), dict(quality=95, subsampling=0)]


@pytest.mark.parametrize("save", CUT_ENCODINGS, ids=["baseline", "progressive", "4:4:4"])
@pytest.mark.parametrize("scale", [1, 2, 8])
def test_a_row_cut_jpeg_decodes_the_rows_it_keeps_as_the_whole_file_does(save, scale):
    noise = np.random.default_rng(0).integers(0, 256, (160, 123, 3), dtype=np.uint8)
    for pixels in [*sklearn.datasets.load_sample_images().images, noise]:
        data = io.BytesIO()
        Image.fromarray(pixels).save(data, "JPEG", **save)
        data = data.getvalue()
        for rows in (1, 17, pixels.shape[0] - fast_data.ROW_MARGIN - 1):
            cut = fast_data.rows_cut(data, rows + fast_data.ROW_MARGIN)
            assert cut is not None and len(cut) == len(data)
            decoded = []
            for encoded in (cut, data):
                image = Image.open(io.BytesIO(encoded))
                image.draft("RGB", (image.width // scale, image.height // scale))
                decoded.append(np.asarray(image.convert("RGB")))
            kept = -(-rows // scale)
            assert Image.open(io.BytesIO(cut)).height == rows + fast_data.ROW_MARGIN
            np.testing.assert_array_equal(decoded[0][:kept], decoded[1][:kept])


def test_only_whole_baseline_or_progressive_jpegs_are_cut():
    data = io.BytesIO()
    Image.fromarray(sklearn.datasets.load_sample_image("china.jpg")).save(data, "JPEG")
    data = data.getvalue()
    assert fast_data.rows_cut(data, 100) is not None
    assert fast_data.rows_cut(data, 427) is None  # not taller than the rows asked for
    assert fast_data.rows_cut(data[:-100], 100) is None  # truncated: no EOI
    assert fast_data.rows_cut(b"\x89PNG\r\n\x1a\n" + data[8:], 100) is None
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    assert fast_data.rows_cut(png.getvalue(), 10) is None


def test_a_truncated_jpeg_is_decoded_whole_as_before(tmp_path):
    data = io.BytesIO()
    Image.fromarray(sklearn.datasets.load_sample_image("flower.jpg")).save(data, "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    crop = T.RandomResizedCrop(64)
    torch.manual_seed(0)
    with pytest.raises(DataError, match="unreadable image .*truncated.jpg"):
        fast_data.decode_window(fast_data.read_encoded(str(path)), crop, (64, 64))
