"""Dataset layout checks, unreadable images named or skipped, loader workers' failures in one line, and the bundled
digits ImageFolder."""

import io
import os
import signal
import time

import numpy as np
import pytest
import sklearn.datasets
import torch
from PIL import Image, UnidentifiedImageError
from tracks import write_class_tree

from projector_kd.engine.data import (
    CheckedImageFolder,
    DataError,
    LoaderWorkerError,
    check_image_folder,
    checkpoint_on_data_error,
    raise_worker_errors_plainly,
    worker_failure,
    worker_failures_plainly,
    write_digits_imagefolder,
)
from projector_kd.engine.errors import UserError


def test_good_tree_passes(tmp_path):
    check_image_folder(write_class_tree(tmp_path / "data"))


def test_missing_root_names_expected_folders(tmp_path):
    with pytest.raises(
        DataError,
        match=r"dataset folder .*imagenet does not exist — expected .*imagenet/train/<class>"
        r".*; pass --data-path DIR$",
    ):
        check_image_folder(tmp_path / "imagenet", how_to_set="pass --data-path DIR")


def test_missing_split(tmp_path):
    root = write_class_tree(tmp_path / "data", splits=("train",))
    with pytest.raises(DataError, match=r"split folder .*data/val is missing"):
        check_image_folder(root)


def test_empty_class_folder(tmp_path):
    root = write_class_tree(tmp_path / "data")
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/c holds no images"):
        check_image_folder(root)


def test_val_classes_differ_from_train(tmp_path):
    root = write_class_tree(tmp_path / "data")
    (root / "val" / "b").rename(root / "val" / "z")
    with pytest.raises(DataError, match=r"classes of .*val differ from .*train: missing \['b'\], extra \['z'\]"):
        check_image_folder(root)


def test_corrupt_image_fails_naming_the_file(tmp_path):
    root = write_class_tree(tmp_path / "data")
    (root / "train" / "a" / "0.png").write_bytes(b"not a png")
    dataset = CheckedImageFolder(root / "train")
    with pytest.raises(DataError, match=r"unreadable image .*train/a/0.png"):
        dataset[0]


def test_corrupt_image_skipped_with_count(tmp_path):
    root = write_class_tree(tmp_path / "data")
    (root / "train" / "a" / "0.png").write_bytes(b"not a png")
    dataset = CheckedImageFolder(root / "train", on_bad_image="skip")
    image, label = dataset[0]
    assert label == 0 and np.asarray(image)[0, 0, 0] == 40  # the next readable sample, a/1.png
    assert dataset.skipped == {0}
    assert [dataset[i][1] for i in range(1, 4)] == [0, 1, 1]


def test_bad_policy_is_refused(tmp_path):
    with pytest.raises(Exception, match="on_bad_image='ignore'"):
        CheckedImageFolder(write_class_tree(tmp_path / "data") / "train", on_bad_image="ignore")


def test_digits_imagefolder(tmp_path):
    root = write_digits_imagefolder(tmp_path / "digits", image_size=16, val_fraction=0.2, seed=0)
    check_image_folder(root)
    train, val = CheckedImageFolder(root / "train"), CheckedImageFolder(root / "val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert train.classes == [str(d) for d in range(10)]
    image, _ = train[0]
    assert image.size == (16, 16) and image.mode == "RGB"
    before = (root / "train" / "0").stat().st_mtime_ns
    write_digits_imagefolder(tmp_path / "digits", image_size=16)  # reused, not rewritten
    assert (root / "train" / "0").stat().st_mtime_ns == before


def test_digits_training_subset_keeps_the_same_val_split(tmp_path):
    full = write_digits_imagefolder(tmp_path / "full", image_size=8)
    small = write_digits_imagefolder(tmp_path / "small", image_size=8, train_per_class=5)
    train = CheckedImageFolder(small / "train")
    assert len(train) == 50 and sorted(set(train.targets)) == list(range(10))
    val_names = [sorted(p.name for p in (root / "val").rglob("*.png")) for root in (small, full)]
    assert val_names[0] == val_names[1]
    full_train = {p.name for p in (full / "train").rglob("*.png")}
    assert {p.name for p in (small / "train").rglob("*.png")} <= full_train


def test_digits_holdout_images_are_in_no_training_split(tmp_path):
    full = write_digits_imagefolder(tmp_path / "full", image_size=8, holdout_per_class=3)
    student = write_digits_imagefolder(tmp_path / "student", image_size=8, train_per_class=5, holdout_per_class=3)
    holdout = write_digits_imagefolder(
        tmp_path / "holdout", image_size=8, train_per_class=5, holdout_per_class=3, holdout=True
    )
    names = {
        (root.name, split): {p.name for p in (root / split).rglob("*.png")}
        for root in (full, student, holdout)
        for split in ("train", "val")
    }
    assert len(names["full", "train"]) + len(names["full", "val"]) == 1797 - 30 and len(names["full", "val"]) == 359
    assert names["student", "val"] == names["full", "val"] and names["student", "train"] <= names["full", "train"]
    assert names["holdout", "train"] == names["student", "train"] and len(names["holdout", "val"]) == 30
    assert not names["holdout", "val"] & (names["full", "train"] | names["full", "val"])
    assert sorted(set(CheckedImageFolder(holdout / "val").targets)) == list(range(10))
    with pytest.raises(ValueError, match="holdout=True needs holdout_per_class > 0"):
        write_digits_imagefolder(tmp_path / "bad", image_size=8, holdout=True)


def _reraised_from_worker(error: Exception) -> Exception:
    """``error`` as PyTorch re-raises an exception from loader worker 3 in the main process."""
    from torch._utils import ExceptionWrapper

    try:
        raise error
    except Exception:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 3")
    try:
        wrapper.reraise()
    except Exception as reraised:
        return reraised
    raise AssertionError("ExceptionWrapper.reraise did not raise")


def _failing(error: Exception):
    yield 1
    raise error


@pytest.mark.parametrize(
    "error, line",
    [
        (
            RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "),
            "a data-loader worker (pid 4242) was killed by signal: Killed while training — most often the system ran "
            "out of memory and killed it: lower the number of loader workers (num_workers) or the batch size, or "
            "free memory, then run the same command again",
        ),
        (
            RuntimeError("DataLoader worker (pid(s) 11, 12) exited unexpectedly"),
            "a data-loader worker (pid 11, 12) exited unexpectedly while training — most often",
        ),
        (
            RuntimeError(
                "DataLoader worker (pid 7) exited unexpectedly with exit code 1. Details are lost due to "
                "multiprocessing. Rerunning with num_workers=0 may give better error trace."
            ),
            "a data-loader worker (pid 7) exited unexpectedly with exit code 1 while training — most often",
        ),
        (
            RuntimeError(
                "DataLoader worker (pid 9) is killed by signal: Bus error. It is possible that dataloader's workers "
                "are out of shared memory. Please try to raise your shared memory limit."
            ),
            "a data-loader worker (pid 9) was killed by signal: Bus error while training — the workers ran out of "
            "shared memory: raise its limit (e.g. docker run --shm-size) or lower the number of loader workers",
        ),
        (
            RuntimeError("DataLoader timed out after 5 seconds"),
            "DataLoader timed out after 5 seconds while training: no worker delivered a batch in time — raise or "
            "remove the loader's timeout, or check the storage the images are read from, then run the same command "
            "again",
        ),
        (
            _reraised_from_worker(UnidentifiedImageError("cannot identify image file 'x.png'\nmore")),
            "a data-loader worker raised UnidentifiedImageError: cannot identify image file 'x.png' while training — "
            "fix what it names (its traceback is in the log), or set num_workers to 0 to debug it in the main process",
        ),
        (_reraised_from_worker(DataError("image x.png is unreadable")), "image x.png is unreadable"),
    ],
    ids=["killed", "exited", "exit-code", "shared-memory", "timed-out", "raised", "user-error-in-worker"],
)
def test_loader_worker_failures_end_in_one_line(error, line):
    batches = raise_worker_errors_plainly(_failing(error), "training")
    assert next(batches) == 1
    with pytest.raises(UserError) as raised:
        next(batches)
    assert str(raised.value).startswith(line) and "\n" not in str(raised.value)


def test_a_worker_failure_while_training_writes_the_resumable_checkpoint_first():
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    saves = []

    def save():
        saves.append(1)
        return "run/checkpoint.pth (epoch 1, step 2)"

    batches = checkpoint_on_data_error(_failing(killed), save)
    assert next(batches) == 1 and not saves
    with pytest.raises(LoaderWorkerError) as raised:
        next(batches)
    assert saves == [1] and str(raised.value).endswith(
        "free memory, then run the same command again. A resumable checkpoint was written first: run/checkpoint.pth "
        "(epoch 1, step 2)"
    )
    batches = checkpoint_on_data_error(_failing(killed), lambda: None)  # nothing to save: the line alone
    next(batches)
    with pytest.raises(LoaderWorkerError) as raised:
        next(batches)
    assert str(raised.value).endswith("then run the same command again")


class _Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        time.sleep(0.05)
        return index


def test_a_worker_killed_while_the_main_process_computes_ends_in_one_line():
    """PyTorch's SIGCHLD handler raises the worker's death wherever the main process is, here in plain Python code
    between two fetches (as inside a training step): the block turns it into the one line."""
    batches = iter(torch.utils.data.DataLoader(_Slow(), batch_size=2, num_workers=1))
    next(batches)
    worker = batches._workers[0].pid
    with pytest.raises(LoaderWorkerError) as raised:
        with worker_failures_plainly("training"):
            os.kill(worker, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # busy Python code: the handler runs between its bytecodes
                sum(range(1000))
    assert str(raised.value).startswith(
        f"a data-loader worker (pid {worker}) was killed by signal: Killed while training — most often the system "
    )
    del batches


def test_the_block_passes_other_errors_and_user_errors_through():
    for error in (RuntimeError("CUDA error: out of memory"), UserError("named file")):
        with pytest.raises(type(error)) as raised:
            with worker_failures_plainly("training"):
                raise error
        assert raised.value is error


def test_other_errors_pass_through_unchanged():
    error = RuntimeError("CUDA error: out of memory")
    assert worker_failure(error, "training") is None
    with pytest.raises(RuntimeError) as raised:
        list(raise_worker_errors_plainly(_failing(error), "training"))
    assert raised.value is error


@pytest.mark.parametrize("save", [dict(quality=90), dict(quality=75, progressive=True), dict(subsampling=0)])
def test_the_jpeg_header_walk_finds_the_frame_size_and_ends_at_the_scan(save):
    from projector_kd.engine.dali import jpeg_size
    from projector_kd.engine.data import JPEG_START_OF_SCAN, is_jpeg_frame, jpeg_segments

    pixels = sklearn.datasets.load_sample_image("flower.jpg")
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, "JPEG", **save)
    data = data.getvalue()
    segments = list(jpeg_segments(data))
    assert segments[-1][0] == JPEG_START_OF_SCAN and sum(is_jpeg_frame(marker) for marker, _, _ in segments) == 1
    assert all(data[position] == 0xFF and data[position + 1] == marker for marker, position, _ in segments)
    assert jpeg_size(data) == pixels.shape[:2] == (427, 640)
    frame = next(position for marker, position, _ in segments if is_jpeg_frame(marker))
    assert jpeg_size(data[: frame + 6]) is None  # the frame header cut short
    broken = bytearray(data)
    broken[frame + 2 : frame + 4] = b"\x00\x01"  # a length field under 2: not well formed, the walk stops there
    before = [segment for segment in segments if segment[1] < frame]
    assert list(jpeg_segments(bytes(broken))) == before and jpeg_size(bytes(broken)) is None
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    assert list(jpeg_segments(png.getvalue())) == [] and jpeg_size(png.getvalue()) is None
