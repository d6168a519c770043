"""The two training tracks as the tests drive them, and their tiny data, configs and teachers.

The ``track`` fixture runs a test once through the DeiT entry point (``deit/main.py``) and once through the ResNet one
(``imagenet/image_classification.py``), both on the shared training loop. Each :class:`Track` knows its command line,
its run folder's files and the size of its epochs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from resnet_recipe import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
DEIT_TEACHER = "resnet10t"


def write_image_folder(
    root: Path,
    train_per_class: int,
    val_per_class: int,
    size: int = 16,
    high: int = 200,
    low: int = 40,
    spread: int = 40,
    digits: int = 1,
) -> Path:
    """``train/`` and ``val/`` of :data:`NUM_CLASSES` classes of ``size`` px PNGs: class c is noise (standard
    deviation ``spread``) around a colour whose channel c is ``high`` and the others ``low``, so a few steps can learn
    them. Files are named by their index with at least ``digits`` digits."""
    rng = np.random.default_rng(0)
    colours = np.full((NUM_CLASSES, 3), low) + np.eye(NUM_CLASSES, 3, dtype=int) * (high - low)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(NUM_CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = np.clip(colours[label] + rng.normal(0, spread, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:0{digits}d}.png")
    return root


def write_deit_images(root: Path) -> Path:
    """The DeiT track's tiny ImageFolder: 36 training and 12 validation images."""
    return write_image_folder(root, 12, 4)


def write_resnet_images(root: Path) -> Path:
    """The ResNet track's tiny ImageFolder: 30 training images (batch 8, drop_last: 3 steps per epoch) and 21
    validation images (odd, so a 2-rank sampler that pads would count one image twice)."""
    return write_image_folder(root, 10, 7, high=150, low=100, spread=80, digits=2)


DEIT_RECIPE = {
    "model": {
        "num_classes": NUM_CLASSES,
        "img_size": 16,
        "embed_dim": 16,
        "depth": 2,
        "num_heads": 2,
        "stem_channels": 8,
        "stem_stride": 2,
        "patch_size": 2,
        "drop_path": 0.1,
    },
    "teacher": {"name": DEIT_TEACHER},
    "data": {"batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
    "aug": {
        "mixup": 0.8,
        "cutmix": 1.0,
        "rand_augment": "rand-m9-mstd0.5-inc1",
        "color_jitter": 0.4,
        "reprob": 0.25,
        "hflip": 0.5,
    },
    "train": {"epochs": 2, "warmup_epochs": 1, "base_lr": 1.0e-3, "lr_scale_batch": 4, "save_freq": 1, "log_freq": 1},
}


def write_deit_config(path: Path) -> Path:
    """:data:`DEIT_RECIPE` (a recipe overlay over configs/deit/demo.yaml: 16 px, dim 16, depth 2, batch 4, 2 epochs,
    full augmentation) written at ``path``."""
    path.write_text(yaml.safe_dump(DEIT_RECIPE))
    return path


def save_deit_teacher(path: Path) -> Path:
    """A randomly initialised (seeded) ``resnet10t`` teacher for :data:`DEIT_RECIPE`, saved at ``path``."""
    torch.manual_seed(0)
    teacher = timm.create_model(DEIT_TEACHER, num_classes=NUM_CLASSES)
    torch.save({"model": teacher.state_dict(), "epoch": 3}, path)
    return path


def deit_train_argv(config: Path, data: Path, teacher: Path, output: Path, *extra: str) -> list[str]:
    """``deit/main.py`` arguments training the tiny recipe ``config`` on ``data`` with ``teacher`` into ``output``."""
    return [
        *("--model", "demo", "--train_student", "--config", str(config), "--data-path", str(data)),
        *("--output", str(output), "--teacher-ckpt", str(teacher), "--device", "cpu", *extra),
    ]


def build_resnet(width: int, num_classes: int = NUM_CLASSES, seed: int = 0) -> torch.nn.Module:
    """The ResNet recipes' WRN-10-``width`` (torchdistill's CIFAR wide_resnet), seeded."""
    from torchdistill.models.registry import get_model

    torch.manual_seed(seed)
    return get_model(
        "wide_resnet", depth=10, k=width, dropout_p=0.0, num_classes=num_classes, pretrained=False, progress=False
    )


def save_resnet_teacher(path: Path) -> Path:
    """A (randomly initialised, seeded) WRN-10-2 teacher saved at ``path`` as ``{'model': state_dict}``."""
    torch.save({"model": build_resnet(2).state_dict()}, path)
    return path


def _built_once(build: Callable[[Path], Path], folder: str, name: str = "") -> Callable:
    """A session fixture: ``build`` of a fresh folder ``folder`` (or of the file ``name`` in it), shared, read-only."""

    def fixture(tmp_path_factory) -> Path:
        made = tmp_path_factory.mktemp(folder)
        return build(made / name if name else made)

    fixture.__doc__ = f":func:`{build.__name__}` (shared, read-only)."
    return pytest.fixture(scope="session", name=folder.replace("-", "_"))(fixture)


deit_images = _built_once(write_deit_images, "deit-images")
deit_config = _built_once(write_deit_config, "deit-config", "tiny.yaml")
deit_teacher = _built_once(save_deit_teacher, "deit-teacher", "teacher.pth")
resnet_images = _built_once(write_resnet_images, "resnet-images")
resnet_teacher = _built_once(save_resnet_teacher, "resnet-teacher", "teacher.pth")


def write_class_tree(root: Path, classes=("a", "b"), splits=("train", "val"), per_class: int = 2) -> Path:
    """``per_class`` 4 px PNGs in each of ``classes`` in each of ``splits`` under ``root``."""
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                Image.new("RGB", (4, 4), (index * 40, 0, 0)).save(folder / f"{index}.png")
    return root


def stopped_on_two_ranks(result: subprocess.CompletedProcess, checkpoint: Path) -> dict:
    """Asserts a 2-rank torchrun run that one rank's SIGTERM stopped ended as a stop on both ranks, with one message
    printed by rank 0 (which did not receive the signal itself), both ranks' random streams in ``checkpoint``; returns
    that checkpoint."""
    from projector_kd.engine.checkpoint import load_checkpoint
    from projector_kd.engine.signals import EXIT_STATUS_STOPPED

    assert result.returncode == 1, result.stderr[-3000:]  # torchrun's status when a worker exits non-zero
    # each worker exits 3 (stopped), unless torchrun's SIGTERM after the first one's exit reaches it first
    codes = re.findall(r"exitcode  : (-?\d+)", result.stderr)
    assert str(EXIT_STATUS_STOPPED) in codes and set(codes) <= {str(EXIT_STATUS_STOPPED), "-15"}, result.stderr[-3000:]
    state = load_checkpoint(checkpoint)
    assert [line for line in result.stderr.splitlines() if line.startswith("stopped: ")] == [
        f"stopped: stopped by a signal to another process of the run at epoch {state['epoch']} step "
        f"{state['step_in_epoch']}; resumable checkpoint {checkpoint} — rerun the same command to continue"
    ]
    assert len(state["rng"]) == 2
    return state


class Track:
    """One entry point as a shared test drives it: :meth:`argv` trains the track's tiny config into a run folder,
    :meth:`run` runs the entry point in this process exactly as its script does."""

    name: str
    script: Path
    module: str  # the entry point's module, whose ``main`` the script runs
    output_flag: str  # the flag naming the run folder
    teacher_flag: str  # the flag naming the teacher checkpoint
    teacher: Path  # the track's tiny teacher (shared, read-only)
    images: Path  # the track's tiny ImageFolder (shared, read-only)
    batch_size: int  # images per training step (one process)
    val_images: int  # how many validation images it holds
    out_of_memory_advice: str  # what its out-of-GPU-memory line tells the user to lower
    steps_per_epoch: int
    two_rank_steps_per_epoch: int
    optimizer_counts_steps: bool  # whether the optimizer's state holds a step counter per parameter
    run_files: tuple[str, ...]  # what a finished 1-epoch run writes besides config.yaml, metrics.json and log.txt

    def __init__(self, run_main: Callable[..., subprocess.CompletedProcess], sigterm_before: Callable) -> None:
        self._run_main, self._sigterm_before = run_main, sigterm_before

    def argv(
        self,
        output: Path,
        *,
        epochs: int = 1,
        workers: int = 0,
        fast: bool = False,
        slow: bool = False,
        ranks: int = 1,
        data: Path | None = None,
        skip_bad_images: bool = False,
    ) -> list[str]:
        """Arguments training the tiny config for ``epochs`` with ``workers`` loader processes into ``output`` (seed 0).
        ``fast``: the fast path, with the release's order of updates; ``slow``: steps long enough for a signal sent from
        outside to arrive in the middle of an epoch; ``ranks``: the number of torchrun processes the run will have
        (:attr:`two_rank_steps_per_epoch` steps per epoch with 2); ``data``: an ImageFolder in place of
        :attr:`images`; ``skip_bad_images``: ``on_bad_image: skip`` (unreadable images logged and skipped)."""
        raise NotImplementedError

    def main(self) -> Callable:
        raise NotImplementedError

    def rank_batch_size(self, ranks: int) -> int:
        """Images per training step and rank on ``ranks`` processes."""
        raise NotImplementedError

    def recorded_teacher(self, config: dict) -> str:
        """The teacher checkpoint a run folder's ``config.yaml`` (loaded) records."""
        raise NotImplementedError

    def engine(self) -> type:
        """The track's adapter to the shared training loop."""
        raise NotImplementedError

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return self._run_main(self.main(), argv)

    def first_image_of_batch(self, data: Path, batch: int, rank: int = 0, ranks: int = 1) -> Path:
        """The first file of training batch ``batch`` (0-based) of epoch 0 that rank ``rank`` of a run on ``data`` with
        ``ranks`` processes trains on (the order of :class:`projector_kd.engine.sampling.ResumableSampler` over
        ImageFolder's sorted files)."""
        from torchvision.datasets import ImageFolder

        from projector_kd.engine.sampling import ResumableSampler

        files = ImageFolder(str(data / "train")).samples
        batch_size = self.rank_batch_size(ranks)
        order = ResumableSampler(len(files), batch_size, 0, rank=rank, world_size=ranks).epoch_indices(0)
        return Path(files[order[batch * batch_size]][0])

    def train(self, output: Path, **settings) -> subprocess.CompletedProcess:
        """:meth:`run` of :meth:`argv`; asserts it finished."""
        result = self.run(self.argv(output, **settings))
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def stopped(
        self, monkeypatch: pytest.MonkeyPatch, epoch: int, step: int, output: Path, **settings
    ) -> subprocess.CompletedProcess:
        """:meth:`run` of :meth:`argv` with SIGTERM arriving just before training step ``step`` (1-based) of
        ``epoch``, as a scheduler's stop would; asserts it stopped resumably."""
        from projector_kd.engine.signals import EXIT_STATUS_STOPPED

        with monkeypatch.context() as patch:
            self._sigterm_before(patch, epoch, step)
            result = self.run(self.argv(output, **settings))
        assert result.returncode == EXIT_STATUS_STOPPED, result.stderr[-3000:]
        return result


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


def assert_same_run(expected: Path, actual: Path) -> None:
    """Two run folders hold the same checkpoints (the same names, equal bit for bit: :func:`assert_same_state`, but for
    the run folder a recorded config names) and the same validation accuracy for every epoch."""
    import json

    from projector_kd.engine.checkpoint import load_checkpoint

    names = sorted(path.name for path in expected.glob("*.pth"))
    assert names == sorted(path.name for path in actual.glob("*.pth")) and "checkpoint.pth" in names
    for name in names:
        states = [load_checkpoint(run / name) for run in (expected, actual)]
        for state, run in zip(states, (expected, actual)):
            if isinstance(state.get("config"), dict):  # a DeiT checkpoint records its run's config, the folder included
                assert state["config"].pop("output") == str(run), name
        assert_same_state(*states, name)
    accuracy = [json.loads((run / "metrics.json").read_text())["val_top1_per_epoch"] for run in (expected, actual)]
    assert accuracy[0] == accuracy[1] and len(accuracy[0]) == load_checkpoint(expected / "checkpoint.pth")["epoch"]


class DeiTTrack(Track):
    name = "deit"
    script = REPO / "deit" / "main.py"
    module = "deit.main"
    output_flag = "--output"
    teacher_flag = "--teacher-ckpt"
    batch_size = 4
    val_images = 12
    out_of_memory_advice = (
        "lower --batch-size and raise --accum-iter by the same factor (the global batch and the learning rate stay)"
    )
    steps_per_epoch = 9  # 36 images, batch 4
    two_rank_steps_per_epoch = 4
    optimizer_counts_steps = True  # AdamW
    run_files = ("checkpoint.pth", "ckpt_epoch_0.pth")

    def __init__(self, run_main, sigterm_before, config: Path, data: Path, teacher: Path) -> None:
        super().__init__(run_main, sigterm_before)
        self._config, self.images, self.teacher = config, data, teacher

    def argv(self, output, *, epochs=1, workers=0, fast=False, slow=False, ranks=1, data=None, skip_bad_images=False):
        extra = ["--epochs", str(epochs), "--opts", "data.num_workers", str(workers)]  # batch 4 a rank
        if skip_bad_images:
            extra += ["data.on_bad_image", "skip"]
        if fast:  # fused AdamW, lr updated after each step
            extra = ["--fast", *extra, "train.lr_after_step", "true"]
        if slow:
            extra += ["model.img_size", "48", "model.embed_dim", "32"]
        return deit_train_argv(self._config, data or self.images, self.teacher, output, *extra)

    def main(self):
        from deit.main import main

        return main

    def rank_batch_size(self, ranks):
        return self.batch_size  # the config's batch is per rank

    def recorded_teacher(self, config):
        return config["teacher"]["ckpt"]

    def engine(self):
        from deit.engine import DeiTTrack

        return DeiTTrack


class ResNetTrack(Track):
    name = "resnet"
    script = REPO / "imagenet" / "image_classification.py"
    module = "imagenet.image_classification"
    output_flag = "--output_dir"
    teacher_flag = "--teacher_ckpt"
    batch_size = 8
    val_images = 21
    out_of_memory_advice = (
        "lower train.train_data_loader.kwargs.batch_size with --opts and raise train.optimizer.grad_accum_step by the "
        "same factor (the global batch stays)"
    )
    steps_per_epoch = 3  # 30 images, batch 8, drop_last
    two_rank_steps_per_epoch = 3
    optimizer_counts_steps = False  # SGD
    run_files = ("checkpoint.pth", "best.pth")

    def __init__(self, run_main, sigterm_before, tmp_path: Path, data: Path, teacher: Path) -> None:
        super().__init__(run_main, sigterm_before)
        self._tmp_path, self.images, self.teacher = tmp_path, data, teacher

    def argv(self, output, *, epochs=1, workers=0, fast=False, slow=False, ranks=1, data=None, skip_bad_images=False):
        on_bad_image = "skip" if skip_bad_images else "fail"  # slow: its 3 steps are slow enough already
        recipe = self._tmp_path / f"recipe-{epochs}-epochs-{workers}-workers-{ranks}-ranks-{on_bad_image}.yaml"
        # dropout: the student's forward draws random numbers, so a resume must restore the generators, not replay them
        recipe.write_text(
            tiny_recipe(
                Path(output) / "best.pth",
                teacher_ckpt=self.teacher,
                data_root=data or self.images,
                epochs=epochs,
                num_workers=workers,
                student_dropout=0.2,
                batch_size=self.rank_batch_size(ranks),
                on_bad_image=on_bad_image,
            )
        )
        fast_path = ["--fast"] if fast else []  # fused SGD
        return ["--device", "cpu", "--config", str(recipe), "--seed", "0", "--output_dir", str(output), *fast_path]

    def main(self):
        from imagenet.image_classification import main

        return main

    def rank_batch_size(self, ranks):
        return self.batch_size // ranks  # a global batch of 8 on any number of ranks

    def recorded_teacher(self, config):
        return config["recipe"]["models"]["teacher_model"]["src_ckpt"]

    def engine(self):
        from imagenet.engine import BoxTrack

        return BoxTrack


@pytest.fixture(params=["deit", "resnet"])
def track(request, run_main, sigterm_before, tmp_path) -> Track:
    """Each training track in turn, on its tiny data, config and teacher."""
    if request.param == "deit":
        fixtures = ("deit_config", "deit_images", "deit_teacher")
        return DeiTTrack(run_main, sigterm_before, *map(request.getfixturevalue, fixtures))
    fixtures = ("resnet_images", "resnet_teacher")
    return ResNetTrack(run_main, sigterm_before, tmp_path, *map(request.getfixturevalue, fixtures))
