"""The DeiT track's DALI loader (``--loader dali``) on DALI's CPU pipeline: the recipe's transform translated (bicubic
crop, flip, RandAugment rand-m9-mstd0.5-inc1, normalisation, random erasing on the device), RandAugment's draws as
timm's and its value operations as timm's, and through ``deit/main.py``: one epoch, a stop and an exact resume,
evaluation, bad images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from tracks import assert_same_run

from deit.config import load_config
from deit.datasets import build_transform
from deit.main import main
from projector_kd.engine import dali
from projector_kd.engine.signals import EXIT_STATUS_STOPPED

pytest.importorskip("nvidia.dali", reason="DALI is not installed: pip install -r requirements-dali.txt")


def test_the_deit_recipe_transforms_translate():
    cfg = load_config("tiny")
    train = dali.plan_transform(build_transform(True, cfg), "train")
    assert (train.random_crop_size, train.interpolation, train.flip_probability) == ((224, 224), "bicubic", 0.5)
    assert train.rand_augment == dali.RandAugmentPlan(
        layers=2,
        ops=dali.RAND_AUGMENT_OPS,
        probability=0.5,
        magnitude=9.0,
        magnitude_std=0.5,
        fill=115,  # timm fills with the mean colour (124, 116, 104); DALI with one grey
        translate_pct=0.45,
    )
    assert (
        train.erasing.probability == 0.25
        and train.erasing.mode == "pixel"
        and train.mean == pytest.approx((0.485, 0.456, 0.406))
    )
    val = dali.plan_transform(build_transform(False, cfg), "val")
    assert (val.resize, val.center_crop, val.interpolation, val.rand_augment) == ((256,), (224, 224), "bilinear", None)


def test_rand_augment_draws_follow_timms_distribution():
    plan = dali.plan_transform(build_transform(True, load_config("tiny")), "train").rand_augment
    draws = dali.rand_augment_parameters(plan, dali.batch_generator(5, 0), 20000)
    ops, bins = draws["ra_op"].ravel(), draws["ra_magnitude"].ravel()
    identity = ops == len(plan.ops)
    trials = ops.size
    assert abs(identity.sum() - trials / 2) <= 4 * math.sqrt(trials / 4)  # each layer applied with probability 0.5
    counts = np.bincount(ops[~identity], minlength=len(plan.ops))
    expected = (~identity).sum() / len(plan.ops)
    assert np.all(np.abs(counts - expected) <= 4 * math.sqrt(expected))  # uniform over the 15 operations
    assert abs(bins.mean() - 90) < 0.1 and abs(bins.std() - 5) < 0.2 and bins.max() <= 100  # N(9, 0.5) in 0.1 bins
    again = dali.rand_augment_parameters(plan, dali.batch_generator(5, 0), 20000)
    assert all(np.array_equal(draws[k], again[k]) for k in draws)  # a pure function of (epoch seed, batch)


VALUE_CASES = [  # (timm operation, magnitude, sign drawn, largest difference in levels)
    ("Invert", 9.0, 0, 0),
    ("PosterizeIncreasing", 9.0, 0, 0),
    ("PosterizeIncreasing", 10.0, 0, 0),  # 0 bits: black, as deit.datasets' guarded posterize
    ("SolarizeIncreasing", 9.0, 0, 0),
    ("SolarizeAdd", 9.0, 0, 0),
    ("BrightnessIncreasing", 9.0, 1, 1),
    ("AutoContrast", 9.0, 0, 1),
]


def test_rand_augment_value_operations_give_timms_pixels():
    """The same operation, magnitude and sign on the same image: DALI's CPU pipeline against timm's op."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core import select, signed_bin

    from deit.datasets import safe_posterize

    image = np.random.default_rng(0).uniform(30, 200, (24, 32, 3)).astype(np.uint8)
    names = tuple(dict.fromkeys(name for name, *_ in VALUE_CASES))  # only these: a smaller graph to build
    ops = dali.dali_rand_augment_ops(dali.RandAugmentPlan(1, names, 1.0, 9.0, 0.0, 128, 0.45))
    columns = (
        [image] * len(VALUE_CASES),
        [np.int32(names.index(name)) for name, *_ in VALUE_CASES],
        [np.int32(round(magnitude * 10)) for _, magnitude, *_ in VALUE_CASES],
        [np.int32(sign) for _, _, sign, _ in VALUE_CASES],
    )

    @pipeline_def(enable_conditionals=True, batch_size=len(VALUE_CASES), num_threads=1, device_id=None)
    def pipeline():
        pixels, op, magnitude, sign = fn.external_source(
            source=lambda: columns,
            num_outputs=4,
            batch=True,
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT32],
            layout=["HWC", "", "", ""],
        )
        return select(
            ops,
            op,
            data=pixels,
            magnitude_bin=signed_bin(magnitude, random_sign=sign),
            num_magnitude_bins=dali.RA_BINS,
            fill_value=128,
            shape=(24, 32),
        )

    pipe = pipeline()
    pipe.build()
    outputs = pipe.run()[0]
    for slot, (name, magnitude, _, tolerance) in enumerate(VALUE_CASES):
        op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams={})
        if name.startswith("Posterize"):
            op.aug_fn = safe_posterize
        level = auto_augment.LEVEL_TO_ARG[name]
        args = level(magnitude, {}) if level is not None else ()
        if name == "BrightnessIncreasing":
            args = (1 - 0.9 * magnitude / 10,)  # the negative sign, as drawn
        expected = np.asarray(op.aug_fn(Image.fromarray(image), *args, **op.kwargs)).astype(int)
        assert np.abs(np.array(outputs[slot]).astype(int) - expected).max() <= tolerance, name


@pytest.fixture
def dali_argv(train_argv, image_folder):
    """``dali_argv(output, *opts, data=image_folder)``: one epoch of the tiny recipe with ``--loader dali``."""
    return lambda output, *opts, data=image_folder: train_argv(
        output, "--loader", "dali", "--opts", "train.epochs", "1", *opts, data=data
    )


def test_one_epoch_stopped_and_resumed_is_bit_identical_and_evaluates(
    tmp_path, dali_argv, eval_argv, run_main, monkeypatch, sigterm_before
):
    straight = tmp_path / "straight"
    assert main(dali_argv(straight, "aug.reprob", "1.0")) == 0
    log = (straight / "log.txt").read_text()
    assert "train: DALI loader, CPU decoding, 1 threads, 9 batches of 4" in log and "val: DALI loader" in log
    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        sigterm_before(patch, 0, 4)
        assert main(dali_argv(interrupted, "aug.reprob", "1.0")) == EXIT_STATUS_STOPPED
    assert torch.load(interrupted / "checkpoint.pth", weights_only=True)["step_in_epoch"] == 4
    assert main(dali_argv(interrupted, "aug.reprob", "1.0")) == 0
    assert_same_run(straight, interrupted)
    metrics = json.loads((straight / "metrics.json").read_text())
    results = {}
    for loader in ("torchvision", "dali"):
        out = tmp_path / f"eval-{loader}"
        result = run_main(main, [*eval_argv(straight / "ckpt_epoch_0.pth", out), "--loader", loader])
        assert result.returncode == 0, result.stderr
        results[loader] = json.loads((out / "eval_metrics.json").read_text())["top1"]
    assert results["dali"] == metrics["top1"] and abs(results["dali"] - results["torchvision"]) <= 100 / 12 + 1e-6


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_an_unreadable_image_fails_naming_it_or_is_skipped(tmp_path, dali_argv, data_copy, run_main, policy):
    bad = data_copy / "train" / "class1" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    # without RandAugment: its conditional graph is what takes DALI long to build, and bad images are read before it
    opts = ("data.on_bad_image", policy, "aug.rand_augment", "null", "aug.color_jitter", "null")
    result = run_main(main, dali_argv(tmp_path / "run", *opts, data=data_copy))
    if policy == "fail":
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: unreadable image {bad} (")
    else:
        assert result.returncode == 0, result.stderr
        assert f"skipping unreadable image {bad}" in (tmp_path / "run" / "log.txt").read_text()


@pytest.mark.gpu
def test_mixed_pipeline_on_the_gpu_repeats_its_batches_and_keeps_the_cpu_pipelines_labels(
    tiny_config, image_folder, gpu_device
):
    """On CUDA: nvJPEG decoding, RandAugment and erasing on the GPU give float32 NCHW batches on the device with the
    CPU pipeline's labels (same order), and an epoch read twice with the same seed repeats them exactly."""
    from deit.datasets import build_loaders

    cfg = load_config("demo", str(tiny_config), {"data.path": str(image_folder), "data.loader": "dali"})
    epochs = []
    for device in (torch.device("cpu"), gpu_device, gpu_device):
        train, _ = build_loaders(cfg, 0, 1, pin_memory=False, device=device)
        train.sampler.set_epoch(0)
        epochs.append(list(train))
    on_cpu, on_gpu, again = epochs
    assert len(on_gpu) == len(on_cpu) == 9
    for (images, labels), (_, cpu_labels), (repeat, _) in zip(on_gpu, on_cpu, again):
        assert images.device == gpu_device and images.dtype == torch.float32 and images.shape == (4, 3, 16, 16)
        assert torch.equal(labels.cpu(), cpu_labels) and torch.equal(images, repeat)
