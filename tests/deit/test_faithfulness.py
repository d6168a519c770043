"""The release's code as the default, the DeiT recipe as a switch (docs/faithfulness.md): eval resize interpolation,
drop path, initialisation, and a checkpoint whose projector does not match (evaluation warns, resuming fails)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import sklearn.datasets
import torch
from PIL import Image
from timm.layers import DropPath
from torch import nn
from torchvision import transforms

from deit.config import load_config
from deit.datasets import build_transform
from deit.main import main
from deit.models import build_student, create_student
from projector_kd import ProjectorDistillLoss
from projector_kd.engine.checkpoint import CheckpointError
from projector_kd.engine.errors import UserError

PHOTO = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"  # a real 640 x 427 JPEG


def _eval_resize(cfg: dict) -> transforms.Resize:
    return next(t for t in build_transform(False, cfg).transforms if isinstance(t, transforms.Resize))


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_eval_resize_is_bilinear_by_default_and_bicubic_as_the_deit_recipe(model):
    cfg = load_config(model)
    assert _eval_resize(cfg).interpolation == transforms.InterpolationMode.BILINEAR
    assert _eval_resize(cfg).size == 256
    assert cfg["data"]["interpolation"] == "bicubic"  # training crops stay bicubic
    switched = load_config(model, opts=["data.eval_interpolation", "bicubic"])
    assert _eval_resize(switched).interpolation == transforms.InterpolationMode.BICUBIC


def test_eval_transform_equals_a_hand_built_pipeline_on_a_real_photo():
    image = Image.open(PHOTO).convert("RGB")
    outputs = {}
    for mode, interpolation in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        cfg = load_config("tiny", opts=["data.eval_interpolation", mode])
        short = 256
        width, height = image.size
        resized = image.resize((int(width * short / height), short), interpolation)  # shorter side (height) to 256
        left, top = int(round((resized.width - 224) / 2.0)), int(round((resized.height - 224) / 2.0))
        cropped = resized.crop((left, top, left + 224, top + 224))
        expected = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(
            transforms.functional.pil_to_tensor(cropped).float() / 255
        )
        outputs[mode] = build_transform(False, cfg)(image)
        assert outputs[mode].shape == (3, 224, 224)
        torch.testing.assert_close(outputs[mode], expected, rtol=0, atol=1e-6)
    assert (outputs["bilinear"] - outputs["bicubic"]).abs().max() > 0.05  # the switch changes real pixels


def _drop_paths(model: nn.Module) -> list[float]:
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


def test_no_drop_path_by_default_and_the_deit_recipe_as_a_switch():
    for model in ("tiny", "small"):
        assert load_config(model)["model"]["drop_path"] == 0.0
    assert _drop_paths(build_student(load_config("tiny"), 3024)[0]) == []
    assert _drop_paths(create_student("tiny")) == []
    assert all(isinstance(block.drop_path1, nn.Identity) for block in create_student("tiny").blocks)
    rates = _drop_paths(build_student(load_config("tiny", opts=["model.drop_path", "0.1"]), 3024)[0])
    expected = torch.linspace(0, 0.1, 12).tolist()[1:]  # block 0 has rate 0 (Identity); two DropPaths per block
    assert rates == pytest.approx([r for r in expected for _ in range(2)])


def _stem_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.conv_embed.modules() if isinstance(m, nn.Conv2d)]


def test_release_init_by_default():
    torch.manual_seed(0)
    model, projector = build_student(load_config("tiny"), 3024)
    convs = _stem_convs(model)
    assert [tuple(c.weight.shape) for c in convs] == [(64, 3, 7, 7), (64, 64, 3, 3), (64, 64, 3, 3), (192, 64, 8, 8)]
    for conv in convs:
        fan_in = conv.weight[0].numel()
        n = conv.weight.numel()
        std = conv.weight.std().item()
        # kaiming_normal_ defaults: fan_in, gain sqrt(2); sample std's relative error ~ 1/sqrt(2n), allow 5 of those
        assert std == pytest.approx(math.sqrt(2 / fan_in), rel=5 / math.sqrt(2 * n))
        assert abs(conv.weight.mean().item()) < 5 * std / math.sqrt(n)
    cls = model.cls_token.flatten()
    assert cls.std().item() == pytest.approx(1e-6, rel=5 / math.sqrt(2 * cls.numel()))
    pos = model.pos_embed.flatten()
    assert pos.std().item() == pytest.approx(0.02, rel=5 / math.sqrt(2 * pos.numel()))
    # timm's trunc_normal_ cuts at +-2 absolute, i.e. at 100 std here: the tails beyond 2 std are those of a normal
    # (4.55 %), not cut away as a cut at +-2 std would do
    beyond = (pos.abs() > 0.04).float().mean().item()
    assert 0.0455 - 0.006 < beyond < 0.0455 + 0.006
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.05) and not module.bias.any()
    bound = 1 / math.sqrt(192)  # the projector keeps PyTorch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert projector.embed.weight.abs().max().item() <= bound and projector.embed.bias.abs().max().item() <= bound
    assert create_student("tiny").cls_token.abs().max().item() < 1e-5  # create_student defaults to the release init


def test_deit_init_is_the_switch_and_differs():
    torch.manual_seed(0)
    model = build_student(load_config("tiny", opts=["model.init", "deit"]), 3024)[0]
    for conv in _stem_convs(model):
        fan_in = conv.weight[0].numel()
        # PyTorch's default conv init: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
        assert conv.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    assert load_config("demo")["model"]["init"] == "deit"  # the demo keeps the init its documented figures used
    with pytest.raises(UserError, match="model.init = 'timm' is out of range"):
        load_config("tiny", opts=["model.init", "timm"])


def test_another_projector_does_not_matter_in_evaluation_and_stops_a_resume(
    tmp_path, train_argv, eval_argv, tiny_config
):
    first = tmp_path / "first"
    assert main(train_argv(first, "--epochs", "1")) == 0
    state = torch.load(first / "checkpoint.pth", weights_only=True)
    assert state["projector"]["embed.weight"].shape == (512, 16)
    assert not [k for k in state["model"] if k.startswith("distillation_loss.")]  # the student alone
    other = tmp_path / "other_projector.pth"
    narrow = build_student(load_config("demo", str(tiny_config)), 256)[1]
    torch.save({**state, "projector": narrow.state_dict()}, other)

    evaluation = tmp_path / "eval"
    assert main(eval_argv(other, evaluation)) == 0
    assert " WARNING " not in (evaluation / "log.txt").read_text()

    resumed = tmp_path / "resumed"
    with pytest.raises(CheckpointError) as error:
        main(train_argv(resumed, "--epochs", "2", "--resume", str(other)))
    assert str(error.value).startswith(
        f"checkpoint {other} does not match this run's projector (teacher width, distillation.projector) "
        "(ProjectorDistillLoss): shape mismatch: embed.weight (256, 16) vs model (512, 16)"
    )
    assert not (resumed / "checkpoint.pth").exists()


def test_feature_loss_is_computed_in_float32_under_half_precision_autocast():
    torch.manual_seed(0)
    distill = ProjectorDistillLoss(16, 32, distance="log_corr", eps=0.0)
    z_s, z_t = torch.randn(8, 10, 16), torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distill(z_s, z_t.bfloat16())
        projected = distill.embed(z_s.mean(dim=1))
    assert projected.dtype == torch.bfloat16 and loss.dtype == torch.float32
    # the same loss from the bf16 projector output and bf16 teacher features, whitened and reduced in float32
    s, t = projected.float(), z_t.bfloat16().float()
    s, t = (s - s.mean(0)) / s.var(0, unbiased=False).sqrt(), (t - t.mean(0)) / t.var(0, unbiased=False).sqrt()
    expected = (((s * t).mean(0) - 1).abs().pow(4).sum() + 1e-5).log()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
