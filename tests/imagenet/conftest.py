"""Fixtures for the ImageNet-track end-to-end and fault tests: its tiny ImageFolder and teacher (from ``tracks``), tiny
torchdistill recipes (``resnet_recipe``) and helpers to run the real entry point."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from resnet_recipe import tiny_recipe
from tracks import assert_same_run, assert_same_state, build_resnet

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "imagenet" / "image_classification.py"


@pytest.fixture(scope="session")
def tiny_data(resnet_images: Path) -> Path:
    """A 3-class, 16 px ImageFolder: 30 train images, 21 val images (:func:`tracks.write_resnet_images`)."""
    return resnet_images


@pytest.fixture
def make_recipe(tmp_path, tiny_data) -> Callable[..., Path]:
    """Write a :func:`tiny_recipe` to ``tmp_path/<name>.yaml`` (data root: the tiny ImageFolder unless given)."""

    def make(name: str = "recipe", **kwargs) -> Path:
        kwargs.setdefault("data_root", tiny_data)
        kwargs.setdefault("dst_ckpt", tmp_path / name / "best.pth")
        path = tmp_path / f"{name}.yaml"
        path.write_text(tiny_recipe(**kwargs))
        return path

    return make


# (height, width): landscape, portrait, square, odd sizes (centre crops that round half to even) and a strip so wide
# that no RandomResizedCrop attempt fits (the central fallback)
JPEG_SIZES = [(30, 40), (40, 30), (32, 32), (27, 41), (41, 27), (12, 60)]


def write_jpeg_folder(root: Path, train_per_class: int = 10, val_per_class: int = 7) -> Path:
    """3 classes of smooth colour fields plus grain, JPEG quality 90, in :data:`JPEG_SIZES` (class-tinted)."""
    rng = np.random.default_rng(0)
    tints = np.array([[60, 0, 0], [0, 60, 0], [0, 0, 60]], dtype=np.float32)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                height, width = JPEG_SIZES[(index + label) % len(JPEG_SIZES)]
                field = rng.uniform(40, 200, (3, 4, 3)).astype(np.uint8)
                smooth = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), dtype=np.float32)
                pixels = np.clip(smooth + tints[label] + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:02d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def jpeg_data(tmp_path_factory) -> Path:
    """:func:`write_jpeg_folder` (3 classes, 30 training and 21 validation JPEGs)."""
    return write_jpeg_folder(tmp_path_factory.mktemp("jpeg-imagefolder"))


@pytest.fixture
def crop_recipe(make_recipe) -> Callable[..., Path]:
    """``crop_recipe(name, data, crop=16, **kwargs)``: the tiny recipe (no teacher) with the release recipe's kind of
    transforms: RandomResizedCrop(crop) + flip for training, Resize(crop + 2) + CenterCrop(crop) for evaluation."""

    def make(name: str, data: Path, crop: int = 16, **kwargs) -> Path:
        path = make_recipe(name, method="baseline", data_root=data, **kwargs)
        text = path.read_text()
        flip = "                - !import_call\n                  key: 'torchvision.transforms.RandomHorizontalFlip'\n"
        random_crop = (
            f"                - !import_call\n                  key: 'torchvision.transforms.RandomResizedCrop'\n"
            f"                  init:\n                    kwargs:\n                      size: {crop}\n"
        )
        to_tensor = (
            "              transforms:\n                - !import_call\n"
            "                  key: 'torchvision.transforms.ToTensor'\n"
        )
        resize = (
            f"              transforms:\n                - !import_call\n"
            f"                  key: 'torchvision.transforms.Resize'\n                  init:\n"
            f"                    kwargs:\n                      size: {crop + 2}\n"
            f"                - !import_call\n                  key: 'torchvision.transforms.CenterCrop'\n"
            f"                  init:\n                    kwargs:\n                      size: {crop}\n"
            f"                - !import_call\n                  key: 'torchvision.transforms.ToTensor'\n"
        )
        assert text.count(flip) == 1 and text.count(to_tensor) == 1
        path.write_text(text.replace(flip, random_crop + flip).replace(to_tensor, resize))
        return path

    return make


@pytest.fixture
def run_entry(run_python) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``imagenet/image_classification.py --device cpu`` with ``args`` in a child process; returns the completed
    process."""

    def run(*args: str | Path, cwd: Path = REPO, timeout: float = 180) -> subprocess.CompletedProcess:
        return run_python(ENTRY, "--device", "cpu", *args, cwd=cwd, timeout=timeout)

    return run


@pytest.fixture
def run_release_command(run_entry) -> Callable[..., subprocess.CompletedProcess]:
    """``run_release_command(data_root, output_dir, log, *args, timeout=180)``: the release's command as users type
    it, from inside ``imagenet/`` (``--config configs/ilsvrc2012/ours/res3418.yaml --log LOG``), on ``data_root``
    into ``output_dir``, with ``args`` after it."""

    def run(data_root: Path, output_dir: Path, log: Path, *args: str | Path, timeout: float = 180):
        release = ("--config", "configs/ilsvrc2012/ours/res3418.yaml", "--log", log)
        return run_entry(
            *release,
            "--data-root",
            data_root,
            "--output_dir",
            output_dir,
            *args,
            cwd=REPO / "imagenet",
            timeout=timeout,
        )

    return run


@pytest.fixture
def run_entry_on_two_ranks(run_torchrun) -> Callable[..., subprocess.CompletedProcess]:
    """``imagenet/image_classification.py --device cpu`` with ``args`` on two gloo ranks under torchrun (environment
    ``env``, default ``child_env``); returns the completed launcher process."""

    def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
        return run_torchrun(ENTRY, "--device", "cpu", *args, env=env, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def tiny_models() -> Callable[..., torch.nn.Module]:
    """:func:`tracks.build_resnet`."""
    return build_resnet


@pytest.fixture(scope="session")
def teacher_ckpt(resnet_teacher: Path) -> Path:
    """:func:`tracks.save_resnet_teacher` (shared, read-only)."""
    return resnet_teacher


@pytest.fixture(scope="session")
def recipe_text() -> Callable[..., str]:
    """:func:`tiny_recipe`, for fixtures with a wider scope than ``make_recipe``."""
    return tiny_recipe


@pytest.fixture
def cli(run_main) -> Callable[..., tuple[int, str, str]]:
    """The entry point (``--device cpu``) in this process through ``run_cli`` (exactly what the script runs): returns
    ``(exit status, stdout, stderr)``."""
    from imagenet.image_classification import main

    def run(*args: str | Path) -> tuple[int, str, str]:
        result = run_main(main, ["--device", "cpu", *args])
        return result.returncode, result.stdout, result.stderr

    return run


@pytest.fixture
def cli_error(run_main, one_error_line) -> Callable[..., str]:
    """``cli_error(*args)``: the entry point in this process, as :func:`cli`, must end with exit status 2 and one
    ``error: ...`` line; returns that line."""
    from imagenet.image_classification import main

    return lambda *args: one_error_line(run_main(main, ["--device", "cpu", *args]))


def reference_accuracy(model: torch.nn.Module, val_root: Path) -> tuple[float, float]:
    """Top-1 / top-5 (%) of ``model`` over the tiny val folder, computed here, image by image, in float64."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(
        str(val_root), transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    )
    model = model.double().eval()
    top1 = top5 = 0
    with torch.no_grad():
        for image, label in dataset:
            logits = model(image[None].double())[0]
            ranked = logits.argsort(descending=True).tolist()
            top1 += ranked[0] == label
            top5 += label in ranked[:5]
    return 100.0 * top1 / len(dataset), 100.0 * top5 / len(dataset)


@pytest.fixture(scope="session")
def accuracy_of() -> Callable[[torch.nn.Module, Path], tuple[float, float]]:
    """:func:`reference_accuracy`."""
    return reference_accuracy


@pytest.fixture(scope="session")
def same_state() -> Callable[..., None]:
    """:func:`assert_same_state`."""
    return assert_same_state


@pytest.fixture
def train_image_in_batch() -> Callable[..., Path]:
    """``(data, batch, batch_size=8, seed=0)`` -> the first file of batch ``batch`` (0-based) of epoch 0 that a
    single-process run with ``--seed seed`` trains on (the order of
    :class:`projector_kd.engine.sampling.ResumableSampler` over ImageFolder's sorted files)."""
    from torchvision.datasets import ImageFolder

    from projector_kd.engine.sampling import ResumableSampler

    def find(data: Path, batch: int, batch_size: int = 8, seed: int = 0) -> Path:
        files = ImageFolder(data / "train").samples
        order = ResumableSampler(len(files), batch_size, seed).epoch_indices(0)
        return Path(files[order[batch * batch_size]][0])

    return find


@pytest.fixture
def stopped_run(cli, monkeypatch, sigterm_before) -> Callable[..., tuple[dict, str]]:
    """``stopped_run(epoch, step, output_dir, *args)``: the entry point (in this process, :func:`cli`) with ``args``
    into ``output_dir``, SIGTERM arriving just before training step ``step`` (1-based) of ``epoch``. Asserts it stopped
    resumably; returns its checkpoint and its stderr."""
    from projector_kd.engine.checkpoint import load_checkpoint
    from projector_kd.engine.signals import EXIT_STATUS_STOPPED

    def run(epoch: int, step: int, output_dir: Path, *args: str | Path) -> tuple[dict, str]:
        with monkeypatch.context() as patch:
            sigterm_before(patch, epoch, step)
            status, _, err = cli(*args, "--output_dir", output_dir)
        assert status == EXIT_STATUS_STOPPED, err
        return load_checkpoint(output_dir / "checkpoint.pth"), err

    return run


@pytest.fixture
def straight_and_stopped(cli, tmp_path, stopped_run) -> Callable[..., tuple[dict, str]]:
    """``straight_and_stopped(epoch, step, *args)``: the entry point with ``args`` run into ``tmp_path/straight`` to the
    end, then :func:`stopped_run` into ``tmp_path/interrupted``; returns the stopped run's checkpoint and stderr."""

    def run(epoch: int, step: int, *args: str | Path) -> tuple[dict, str]:
        status, _, err = cli(*args, "--output_dir", tmp_path / "straight")
        assert status == 0, err
        return stopped_run(epoch, step, tmp_path / "interrupted", *args)

    return run


@pytest.fixture(scope="session")
def same_run() -> Callable[[Path, Path], None]:
    """:func:`tracks.assert_same_run`."""
    return assert_same_run


@pytest.fixture(scope="session")
def engine_loop() -> Callable[..., object]:
    """``engine_loop(box, teacher, device, output_dir, autocast_dtype)`` -> the shared training loop over ``box`` (a
    :class:`imagenet.engine.BoxTrack` with channels_last inputs, 10 steps per epoch), writing into ``output_dir``:
    ``loop.train_step((images, labels, None))`` is the training step."""
    from imagenet.engine import BoxTrack
    from projector_kd.engine.loop import TrainingLoop

    def build(box, teacher: torch.nn.Module, device: torch.device, output_dir: Path, autocast_dtype) -> object:
        track = BoxTrack(
            box, teacher, device, 0, output_dir / "best.pth", 1, autocast_dtype, channels_last=True, steps_per_epoch=10
        )
        return TrainingLoop(track, output_dir)

    return build
