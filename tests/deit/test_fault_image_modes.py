"""16-bit greyscale images evaluate exactly like their 8-bit originals (they used to load as blank white)."""

from __future__ import annotations

import json

import numpy as np
import timm
import torch
from PIL import Image

from deit.config import load_config
from deit.main import main
from deit.models import build_student


def _greyscale_copies(source, root, sixteen_bit: bool):
    for image_path in sorted(source.glob("val/*/*.png")):
        grey = np.asarray(Image.open(image_path).convert("L"))
        target = root / image_path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey.astype(np.uint16) * 257 if sixteen_bit else grey).save(target)
    return root


def test_16_bit_val_images_evaluate_like_8_bit(tmp_path, image_folder, tiny_config, eval_argv):
    eight = _greyscale_copies(image_folder, tmp_path / "eight", sixteen_bit=False)
    sixteen = _greyscale_copies(image_folder, tmp_path / "sixteen", sixteen_bit=True)
    assert Image.open(next(sixteen.glob("val/*/*.png"))).mode == "I;16"
    torch.manual_seed(0)
    cfg = load_config("demo", str(tiny_config))
    ckpt = tmp_path / "student.pth"
    torch.save(
        {"model": build_student(cfg, timm.create_model("resnet10t", num_classes=3).num_features)[0].state_dict()}, ckpt
    )
    results = []
    for root in (eight, sixteen):
        output = tmp_path / f"eval-{root.name}"
        assert main(eval_argv(ckpt, output, data=root)) == 0
        results.append(json.loads((output / "eval_metrics.json").read_text()))
    assert results[0]["num_images"] == results[1]["num_images"] == 12
    assert (results[1]["top1"], results[1]["top5"], results[1]["loss"]) == (
        results[0]["top1"],
        results[0]["top5"],
        results[0]["loss"],
    )
