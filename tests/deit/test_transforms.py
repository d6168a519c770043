"""The training transform runs whole epochs despite the Pillow >= 13 posterize hazard (docs/faithfulness.md)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment, posterize

from deit.config import load_config
from deit.datasets import build_transform, guard_posterize, safe_posterize


def test_timm_posterize_increasing_asks_pillow_for_zero_bits():
    """The hazard itself: magnitude 9 + std 0.5 clipped at 10 gives 0 bits, which Pillow 13 rejects."""
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={})
    assert op.level_fn(10.0, op.hparams) == (0,)
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    with pytest.raises(ValueError, match="bits must be between or equal to 1 and 8"):
        posterize(image, 0)
    with pytest.raises(ValueError):
        op(image)


def test_safe_posterize_matches_pillow_and_keeps_zero_bits_black():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(safe_posterize(image, bits)), np.asarray(posterize(image, bits)))
    assert not np.asarray(safe_posterize(image, 0)).any()
    assert safe_posterize(image, 0).mode == "RGB"


def _run_images(transform, count: int) -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(count):
        size = rng.integers(24, 48, size=2)
        image = Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))
        out = transform(image)
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


def _posterize_op(transform) -> AugmentOp:
    [op] = [
        op
        for step in transform.transforms
        if isinstance(step, RandAugment)
        for op in step.ops
        if op.name.startswith("Posterize")
    ]
    return op


def test_recipe_transform_runs_thousands_of_random_images():
    cfg = load_config("tiny", opts=["model.img_size", "32"])
    transform = build_transform(True, cfg)
    op = _posterize_op(transform)
    assert op.aug_fn is safe_posterize
    zero_bit_calls = []

    def counting(img, bits, **kwargs):
        zero_bit_calls.append(bits == 0)
        return safe_posterize(img, bits, **kwargs)

    op.aug_fn = counting
    _run_images(transform, 3000)
    assert sum(zero_bit_calls) >= 2  # the hazardous 0-bit request really happened, and was survived

    unguarded = build_transform(True, cfg)
    _posterize_op(unguarded).aug_fn = posterize
    with pytest.raises(ValueError, match="bits must be between"):
        _run_images(unguarded, 3000)
    assert guard_posterize(unguarded) == 1


def test_eval_transform_resizes_then_center_crops():
    cfg = load_config("tiny")
    steps = build_transform(False, cfg).transforms
    assert steps[0].size == 256 and steps[1].size == (224, 224)
