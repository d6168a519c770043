"""Fixtures for the ImageNet-track end-to-end and fault tests: a tiny ImageFolder, tiny torchdistill recipes written
like the demo ones (WRN-10-1 student, WRN-10-2 teacher, 16 px, 3 classes) and helpers to run the real entry point."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "imagenet" / "image_classification.py"
NUM_CLASSES = 3
TRAIN_PER_CLASS = 10  # 30 images, batch 8, drop_last: 3 steps per epoch
VAL_PER_CLASS = 7  # 21 images: odd, so a 2-rank sampler that pads would count one image twice
IMAGE_SIZE = 16


def write_image_folder(
    root: Path, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS, size: int = IMAGE_SIZE
) -> Path:
    """Class c images: noise around a class-specific colour (learnable in a few steps)."""
    rng = np.random.default_rng(0)
    colours = np.array([[150, 100, 100], [100, 150, 100], [100, 100, 150]])
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(NUM_CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(colours[label] + rng.normal(0, 80, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return root


def _model(key_width: int, num_classes: int, indent: str, dropout: float = 0.0) -> str:
    return (
        f"{indent}key: 'wide_resnet'\n{indent}kwargs:\n{indent}  depth: 10\n{indent}  k: {key_width}\n"
        f"{indent}  dropout_p: {dropout}\n{indent}  num_classes: {num_classes}\n{indent}  pretrained: false\n"
        f"{indent}  progress: false\n"
    )


_FLIP = """\
                - !import_call
                  key: 'torchvision.transforms.RandomHorizontalFlip'
                  init:
                    kwargs:
                      p: 0.5
"""
_TO_TENSOR = """\
                - !import_call
                  key: 'torchvision.transforms.ToTensor'
                  init:
"""
_NORMALIZE = """\
                - &normalize !import_call
                  key: 'torchvision.transforms.Normalize'
                  init:
                    kwargs:
                      mean: [0.5, 0.5, 0.5]
                      std: [0.5, 0.5, 0.5]
"""


def _compose(*transforms: str) -> str:
    """A dataset's ``transform:`` entry: torchvision's Compose of ``transforms`` (YAML list items)."""
    return (
        "        transform: !import_call\n          key: 'torchvision.transforms.Compose'\n          init:\n"
        "            kwargs:\n              transforms:\n" + "".join(transforms)
    )


def tiny_recipe(
    dst_ckpt: Path,
    *,
    method: str = "projector",
    teacher_ckpt: Path | str | None = None,
    data_root: Path | str = "tiny-data",
    epochs: int = 1,
    batch_size: int = 8,
    num_workers: int = 0,
    lr: float = 0.05,
    on_bad_image: str = "fail",
    student_width: int = 1,
    teacher_width: int = 2,
    num_classes: int = NUM_CLASSES,
    milestones: tuple[int, ...] = (1,),
    log_freq: int = 1,
    student_dropout: float = 0.0,
    drop_last: bool = True,
    batch_sampler: bool = False,
    sampler_seed: int | None = None,
    eval_workers: int = 0,
) -> str:
    """A torchdistill recipe in the demo configs' layout. ``method``: 'teacher' (the teacher network trained alone),
    'baseline' (the student alone) or 'projector' (CE + 2 * log_diff(Linear(64, 64 * teacher_width)) + KD).
    ``student_dropout`` > 0 makes the student's forward pass draw random numbers too. The train loader batches with
    ``batch_size`` and ``drop_last`` in its kwargs, or in a ``batch_sampler: BatchSampler``; it samples with a
    ``RandomSampler``, or with ``sampler_seed`` a one-process ``DistributedSampler`` with that seed. The validation
    and test loaders read with ``eval_workers`` worker processes."""
    transform_train = _compose(_FLIP, _TO_TENSOR, _NORMALIZE)
    transform_val = _compose(_TO_TENSOR, "                - *normalize\n")
    text = f"""\
dependencies:
  - name: 'imagenet.registry'

_data_root: &data_root !import_call
  key: 'os.getenv'
  init:
    args: ['TINY_DATA_ROOT', '{data_root}']

datasets:
  &train_id tiny/train: !import_call
    key: 'projector_kd.engine.data.CheckedImageFolder'
    init:
      kwargs:
        root: !pathjoin [*data_root, 'train']
        on_bad_image: '{on_bad_image}'
{transform_train}  &val_id tiny/val: !import_call
    key: 'projector_kd.engine.data.CheckedImageFolder'
    init:
      kwargs:
        root: !pathjoin [*data_root, 'val']
        on_bad_image: '{on_bad_image}'
{transform_val}
models:
"""
    if method == "projector":
        text += "  teacher_model:\n" + _model(teacher_width, num_classes, "    ")
        if teacher_ckpt is not None:
            text += f"    src_ckpt: '{teacher_ckpt}'\n"
    width = teacher_width if method == "teacher" else student_width
    text += "  student_model:\n" + _model(width, num_classes, "    ", student_dropout) + f"    dst_ckpt: '{dst_ckpt}'\n"
    if sampler_seed is None:
        train_sampler = "        key: 'torch.utils.data.RandomSampler'\n      kwargs:\n"
    else:
        train_sampler = (
            "        key: 'torch.utils.data.DistributedSampler'\n      kwargs:\n"
            f"        num_replicas: 1\n        rank: 0\n        seed: {sampler_seed}\n"
        )
    drop = str(drop_last).lower()
    if batch_sampler:
        train_batching = (
            f"    batch_sampler:\n      key: 'BatchSampler'\n      kwargs:\n        batch_size: {batch_size}\n"
            f"        drop_last: {drop}\n    kwargs:\n      num_workers: {num_workers}\n"
        )
    else:
        train_batching = (
            f"    kwargs:\n      batch_size: {batch_size}\n      num_workers: {num_workers}\n      drop_last: {drop}\n"
        )
    text += f"""
train:
  log_freq: {log_freq}
  num_epochs: {epochs}
  train_data_loader:
    dataset_id: *train_id
    sampler:
      class_or_func: !import_get
{train_sampler}{train_batching}  val_data_loader:
    dataset_id: *val_id
    sampler: &val_sampler
      class_or_func: !import_get
        key: 'torch.utils.data.SequentialSampler'
      kwargs:
    kwargs:
      batch_size: 8
      num_workers: {eval_workers}
"""
    if method == "projector":
        text += f"""\
  teacher:
    forward_proc: 'forward_batch_only'
    forward_hook:
      output: ['layer3']
    requires_grad: false
  student:
    forward_proc: 'forward_batch_only'
    auxiliary_model_wrapper:
      key: 'ProjectorKDModelWrapper'
      kwargs:
        input_module:
          path: 'model.layer3'
          io: 'output'
        student_dim: {64 * student_width}
        teacher_dim: {64 * teacher_width}
        distance: 'log_diff'
        exponent: 4.0
        eps: 1.0e-4
        projector: 'linear'
    forward_hook:
      output: ['model.layer3']
    requires_grad: true
"""
    else:
        text += """\
  model:
    forward_proc: 'forward_batch_only'
    requires_grad: true
"""
    text += f"""\
  optimizer:
    key: 'SGD'
    kwargs:
      lr: {lr}
      momentum: 0.9
      weight_decay: 5.0e-4
    grad_accum_step: 1
  scheduler:
    key: 'MultiStepLR'
    kwargs:
      milestones: {list(milestones)}
      gamma: 0.1
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        ce:
          criterion:
            key: 'CrossEntropyLoss'
            kwargs:
              reduction: 'mean'
          criterion_wrapper:
            key: 'SimpleLossWrapper'
            kwargs:
              input:
                is_from_teacher: false
                module_path: '.'
                io: 'output'
              target:
                uses_label: true
          weight: 1.0
"""
    if method == "projector":
        text += """\
        projector_kd:
          criterion:
            key: 'ProjectorKDLoss'
            kwargs:
              teacher_feature:
                path: 'layer3'
                io: 'output'
              feature_weight: 2.0
              kd_weight: 1.0
              temperature: 1.0
          weight: 1.0
"""
    text += f"""
test:
  test_data_loader:
    dataset_id: *val_id
    sampler: *val_sampler
    kwargs:
      batch_size: 8
      num_workers: {eval_workers}

runtime:
  fast: false
"""
    return text


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 3-class, 16 px ImageFolder: 30 train images, 21 val images (shared, read-only)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny-imagefolder"))


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


def build_tiny_model(width: int, num_classes: int = NUM_CLASSES, seed: int = 0) -> torch.nn.Module:
    """The recipes' WRN-10-``width`` (torchdistill's CIFAR wide_resnet), seeded."""
    from torchdistill.models.registry import get_model

    torch.manual_seed(seed)
    return get_model(
        "wide_resnet", depth=10, k=width, dropout_p=0.0, num_classes=num_classes, pretrained=False, progress=False
    )


@pytest.fixture(scope="session")
def tiny_models() -> Callable[..., torch.nn.Module]:
    """:func:`build_tiny_model`."""
    return build_tiny_model


def save_teacher(path: Path) -> Path:
    """A (randomly initialised, seeded) WRN-10-2 teacher saved at ``path`` as ``{'model': state_dict}``."""
    torch.save({"model": build_tiny_model(2).state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """:func:`save_teacher` (shared, read-only)."""
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth")


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


def assert_same_state(expected, actual, where: str = "checkpoint") -> None:
    """Bit-for-bit equality of two checkpoint structures (tensors: same dtype, shape and values)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and expected.dtype == actual.dtype, where
        assert torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(expected, key=str) == sorted(actual, key=str), where
        for key in expected:
            if key == "wall_time_s":  # seconds on the clock, not training state
                continue
            assert_same_state(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), where
        for index, (a, b) in enumerate(zip(expected, actual)):
            assert_same_state(a, b, f"{where}[{index}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


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
def sigterm_before(sigterm_progress) -> Callable[[pytest.MonkeyPatch, int, int], None]:
    """``sigterm_before(monkeypatch, epoch, step)``: an in-process run receives SIGTERM just before training step
    ``step`` (1-based) of ``epoch`` starts, as a scheduler's stop would arrive."""
    from projector_kd.engine import loop

    return lambda monkeypatch, epoch, step: monkeypatch.setattr(loop, "progress", sigterm_progress(loop, epoch, step))


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
    """``same_run(expected, actual)``: the ``checkpoint.pth`` and ``best.pth`` of two run folders are equal bit for
    bit (:func:`assert_same_state`)."""
    from projector_kd.engine.checkpoint import load_checkpoint

    def compare(expected: Path, actual: Path) -> None:
        for name in ("checkpoint.pth", "best.pth"):
            assert_same_state(load_checkpoint(expected / name), load_checkpoint(actual / name), name)

    return compare


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
