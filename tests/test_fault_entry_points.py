"""Faults both entry points share, each checked through both (in this process, as their scripts run them): every
``--opts`` group counts, config files that are not UTF-8, infinite numbers, hand-edited run configs, paths whose names
are too long or run into a file, and links to folders inside a class folder. Each ends in one ``error:`` line before any
work. The tracks run their digits demo recipes (10 classes) on a tiny ImageFolder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESNET_RECIPE = REPO / "configs" / "demo" / "resnet_baseline.yaml"
LONG_NAME = "n" * 300  # past the 255 bytes a file name may have
TRACKS = ("deit", "resnet")


def track_argv(track: str, data: Path, output: Path, *extra: str | Path) -> tuple[Callable, list]:
    """(the track's ``main``, arguments training its demo recipe on ``data`` into ``output``)."""
    if track == "deit":
        from deit.main import main

        return main, ["--model", "demo", "--train_student", "--data-path", data, "--output", output, *extra]
    from imagenet.image_classification import main

    return main, ["--config", RESNET_RECIPE, "--data-root", data, "--output_dir", output, *extra]


@pytest.fixture
def run_track(run_main, one_error_line) -> Callable[..., str]:
    """``run_track(track, data, output, *extra)``: the track's entry point on the CPU must end in one ``error:`` line;
    returns it."""

    def run(track: str, data: Path, output: Path, *extra: str | Path) -> str:
        main, argv = track_argv(track, data, output, "--device", "cpu", *extra)
        return one_error_line(run_main(main, argv))

    return run


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory) -> Path:
    """An ImageFolder of 10 classes, one 8 px image each in train and val (the demo recipes' number of classes)."""
    root = tmp_path_factory.mktemp("ten-classes")
    for split in ("train", "val"):
        for label in range(10):
            (root / split / str(label)).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 20 * label, dtype=np.uint8)).save(root / split / str(label) / "0.png")
    return root


OVERRIDES = {  # track -> (a key refused with 0, a valid value for it, another key and its value)
    "deit": ("train.epochs", "2", "data.num_workers", "0"),
    "resnet": ("train.num_epochs", "2", "train.log_freq", "5"),
}


@pytest.mark.parametrize("track", TRACKS)
def test_every_opts_group_counts_and_a_repeated_key_takes_its_last_value(track, tmp_path, run_track):
    key, good, other, value = OVERRIDES[track]
    missing = tmp_path / "no-data"  # valid overrides get as far as the data check
    out_of_range = f"{key} = 0 is out of range"
    assert out_of_range in run_track(track, missing, tmp_path / "run", "--opts", key, "0", "--opts", other, value)
    assert out_of_range in run_track(track, missing, tmp_path / "run", "--opts", other, value, "--opts", key, "0")
    line = run_track(track, missing, tmp_path / "run", "--opts", key, "0", other, value, "--opts", key, good)
    assert line.startswith(f"error: dataset folder {missing} does not exist")
    assert run_track(track, missing, tmp_path / "run", "--opts", key, "--opts", good) == (
        f"error: --opts takes KEY VALUE pairs; got an odd number of items: {key}"
    )


@pytest.mark.parametrize("track", TRACKS)
def test_a_config_file_that_is_not_utf8_is_named_with_the_place(track, tmp_path, run_track):
    config = tmp_path / "latin1.yaml"
    base = f"_base_: {RESNET_RECIPE}\n" if track == "resnet" else "seed: 0\n"
    config.write_bytes("# café\n".encode("latin-1") + base.encode())
    line = run_track(track, tmp_path / "no-data", tmp_path / "run", "--config", config)
    assert line == f"error: config file {config} is not UTF-8 text (byte 0xe9 at line 1, column 6) — save it as UTF-8"


LR_KEY = {"deit": "train.base_lr", "resnet": "train.optimizer.kwargs.lr"}


@pytest.mark.parametrize("track", TRACKS)
def test_an_infinite_learning_rate_is_refused_at_load(track, tmp_path, run_track):
    line = run_track(track, tmp_path / "no-data", tmp_path / "run", "--opts", LR_KEY[track], "1e400")
    source = "config" if track == "deit" else str(RESNET_RECIPE)
    assert line == (
        f"error: {source}: {LR_KEY[track]} = inf is not a finite number (a value beyond ±1.8e308 reads as infinity) "
        "— give a finite value"
    )
    if track == "deit":  # a --config file is checked in its own terms
        overlay = tmp_path / "nan.yaml"
        overlay.write_text("aug:\n  scale: [.nan, 1.0]\n")
        line = run_track(track, tmp_path / "no-data", tmp_path / "run", "--config", overlay)
        assert line == f"error: {overlay}: aug.scale[0] = nan is not a number — give a finite value"


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("damage", ["not YAML", "not UTF-8"])
def test_a_hand_edited_run_config_that_no_longer_reads_is_named(track, damage, ten_classes, tmp_path, run_track):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"")  # the run has started: its config.yaml is compared with this one's
    recorded = run / "config.yaml"
    recorded.write_bytes(b"seed: [0\n" if damage == "not YAML" else b"seed: 0 # \xff\n")
    line = run_track(track, ten_classes, run)
    what = f"error: the run's config file {recorded} is not "
    if damage == "not YAML":
        assert line.startswith(what + "valid YAML at line 2: ")
    else:
        assert line.startswith(what + "UTF-8 text (byte 0xff at line 1, column 11) — save it as UTF-8")
    assert line.endswith(
        "; fix or restore it, or pass --resume to continue that run with this command's settings (config.yaml "
        "is then written anew)"
    )
    assert recorded.read_bytes().startswith(b"seed: ")  # left as it was


TOO_LONG = "File name too long — a name on that path is longer than the file system allows (usually 255 bytes)"


@pytest.mark.parametrize("track", TRACKS)
def test_output_paths_too_long_or_through_a_file_end_in_one_line(track, ten_classes, tmp_path, run_track):
    long_run = tmp_path / LONG_NAME
    assert (
        run_track(track, ten_classes, long_run) == f"error: cannot write {long_run}: {TOO_LONG}: choose a shorter one"
    )
    (tmp_path / "a-file").write_text("")
    inside_file = tmp_path / "a-file" / "run"
    assert run_track(track, ten_classes, inside_file).startswith(f"error: cannot write {inside_file}: Not a directory")
    long_config = tmp_path / f"{LONG_NAME}.yaml"
    assert run_track(track, ten_classes, tmp_path / "run", "--config", long_config) == (
        f"error: {long_config}: {TOO_LONG}: choose a shorter one"
    )
    if track == "resnet":  # the release's --log
        long_log = tmp_path / LONG_NAME
        line = run_track(track, ten_classes, tmp_path / "run", "--log", long_log)
        assert line == f"error: cannot write {long_log}: {TOO_LONG}: choose a shorter one"
        assert run_track(track, ten_classes, tmp_path / "run", "--log", tmp_path / "a-file" / "log.txt").startswith(
            f"error: cannot write {tmp_path / 'a-file' / 'log.txt'}: "
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written anywhere


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("target", ["..", "../../val", "."])
def test_a_link_to_a_folder_inside_a_class_folder_is_refused(track, target, ten_classes, tmp_path, run_track):
    """ImageFolder follows links: one to the split (a loop) would add every class's images to class 3 again and
    again, one to another split or back to the class folder would add images twice."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        for label in range(10):
            (data / split / str(label)).mkdir(parents=True)
            os.symlink(ten_classes / split / str(label) / "0.png", data / split / str(label) / "0.png")  # files: fine
    link = data / "train" / "3" / "more"
    os.symlink(target, link)
    line = run_track(
        track, data, tmp_path / "run", "--opts", "train.epochs" if track == "deit" else "train.num_epochs", "1"
    )
    assert line == (
        f"error: class folder {data / 'train' / '3'} holds {link}, a link to the folder {target}: links to folders "
        "below a class folder are refused (one that loops back or leads to another class would add images again and "
        "again, or under the wrong label) — remove it, or link the image files or the whole class folder instead"
    )
    assert not (tmp_path / "run").exists()
