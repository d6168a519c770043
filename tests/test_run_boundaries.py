"""Where a run may start, through both entry points (in this process): a refused ``--resume`` leaves the run folder
exactly as it was, an epoch without a single training step is refused before any work, and a checkpoint that has
trained more epochs than asked is named instead of reported as done. The tracks run their digits demo recipes
(10 classes) on a tiny ImageFolder, the DeiT student without distillation (no teacher weights needed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRACKS = ("deit", "resnet")
# per track: settings of a short run, a second model width, and the number of epochs
FLAGS = {
    "deit": lambda epochs, batch, width: [
        "--epochs", str(epochs), "--batch-size", str(batch),
        "--opts", "distillation.method", "none", "model.embed_dim", str(width), "data.eval_batch_size", "4",
    ],
    "resnet": lambda epochs, batch, width: [
        "--opts", "train.num_epochs", str(epochs), "train.train_data_loader.kwargs.batch_size", str(batch),
        "models.student_model.kwargs.num_classes", "10", "train.log_freq", "1",
        *(["models.student_model.key", "resnet32"] if width != 64 else []),
    ],
}  # fmt: skip


def track_run(track: str, data: Path, output: Path, *extra: str) -> tuple[Callable, list]:
    if track == "deit":
        from deit.main import main

        return main, ["--model", "demo", "--train_student", "--data-path", data, "--output", output, *extra]
    from imagenet.image_classification import main

    recipe = REPO / "configs" / "demo" / "resnet_baseline.yaml"
    return main, ["--config", recipe, "--data-root", data, "--output_dir", output, "--seed", "0", *extra]


@pytest.fixture
def run_track(run_main) -> Callable:
    """``run_track(track, data, output, epochs, batch, width, *extra)`` -> CompletedProcess of the entry point."""

    def run(track: str, data: Path, output: Path, epochs: int, batch: int, width: int = 64, *extra: str):
        main, argv = track_run(track, data, output, "--device", "cpu", *FLAGS[track](epochs, batch, width), *extra)
        return run_main(main, argv)

    return run


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """10 classes, four 32 px images each in train, one in val."""
    root = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        for label in range(10):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(20 * label + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but its lock (which names the process holding it) and their bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize("track", TRACKS)
def test_a_refused_resume_leaves_the_run_folder_as_it_was(track, digits, tmp_path, run_track, one_error_line):
    run = tmp_path / "run"
    assert run_track(track, digits, run, 1, 8).returncode == 0
    before = _files(run)
    line = one_error_line(run_track(track, digits, run, 2, 8, 32, "--resume"))  # another student width
    assert "does not match" in line and str(run / "checkpoint.pth") in line
    assert _files(run) == before  # config.yaml, log.txt, TensorBoard events, checkpoints: all as they were
    again = run_track(track, digits, run, 1, 8)  # the original command is still the folder's run
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "holds a different run" not in again.stderr


@pytest.mark.parametrize("track", TRACKS)
def test_an_epoch_without_a_training_step_is_refused_before_any_work(track, digits, tmp_path, run_track):
    result = run_track(track, digits, tmp_path / "run", 1, 64)  # 40 images, batches of 64 with drop_last
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert "40" in line and "64" in line and "batch" in line
    assert not (tmp_path / "run" / "checkpoint.pth").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("track", TRACKS)
def test_a_run_past_the_epochs_asked_is_named_and_its_files_stay_consistent(track, digits, tmp_path, run_track):
    run = tmp_path / "run"
    assert run_track(track, digits, run, 2, 8).returncode == 0
    metrics = (run / "metrics.json").read_text()
    result = run_track(track, digits, run, 1, 8, 64, "--resume")
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {run / 'checkpoint.pth'} has trained 2 epochs, more than this run's 1 — raise the number of epochs "
        "to continue it, or evaluate its weights"
    )
    assert (run / "metrics.json").read_text() == metrics
    done = run_track(track, digits, run, 2, 8)  # the same command as the finished run: nothing left to train
    assert done.returncode == 0 and "all 2 epochs were trained before this run" in done.stdout
    assert (
        json.loads((run / "metrics.json").read_text())["val_top1_per_epoch"]
        == json.loads(metrics)["val_top1_per_epoch"]
    )


RANK_FOLDER_LAUNCHER = """
import os, runpy, sys
os.chdir(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]))  # each rank reads its own ./data
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("track", TRACKS)
def test_ranks_that_see_different_data_stop_at_once_naming_the_rank(track, digits, tmp_path, run_torchrun):
    """Under torchrun (2 gloo ranks) rank 1's copy of the dataset lacks one image: both ranks stop before any training
    with one line naming rank 1 and what it sees, instead of hanging in a collective."""
    import shutil
    import time

    for rank in (0, 1):
        shutil.copytree(digits, tmp_path / f"rank{rank}" / "data")
    next((tmp_path / "rank1" / "data" / "train" / "3").iterdir()).unlink()
    launcher = tmp_path / "launcher.py"
    launcher.write_text(RANK_FOLDER_LAUNCHER)
    main_script = REPO / ("deit/main.py" if track == "deit" else "imagenet/image_classification.py")
    _, argv = track_run(track, Path("data"), tmp_path / "run", "--device", "cpu", *FLAGS[track](1, 4, 64))
    started = time.monotonic()
    result = run_torchrun(launcher, tmp_path, main_script, *argv, timeout=120)
    assert time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: rank 1 sees another dataset than rank 0: ")
    assert "39 images in 10 classes" in lines[0] and "40 images in 10 classes" in lines[0]
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
