"""Conv-stem DeiT students: registry, token layout, heads, parameter counts; teacher building."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from tracks import REPO

from deit.config import load_config
from deit.models import ConvStemDeiT, build_student, create_student, create_teacher
from projector_kd import ProjectorDistillLoss
from projector_kd.engine.errors import UserError
from projector_kd.engine.models import count_parameters
from projector_kd.engine.portable import PORTABLE_CONDITION, portable_environment, supports_portable_kernels


def test_tiny_token_layout_and_heads():
    torch.manual_seed(0)
    model = create_student("tiny", num_classes=7).eval()
    images = torch.randn(2, 3, 224, 224)
    tokens = model.forward_features(images)
    assert tokens.shape == (2, 198, 192)
    assert model.pos_embed.shape == (1, 198, 192)
    with torch.no_grad():
        patches = model.conv_embed(images)
        assert patches.shape == (2, 196, 192)
        cls_logits, dist_logits = model.forward_heads(tokens)
        torch.testing.assert_close(model(images), (cls_logits + dist_logits) / 2, rtol=0, atol=0)
        torch.testing.assert_close(cls_logits, model.head(tokens[:, 0]), rtol=0, atol=0)
        torch.testing.assert_close(dist_logits, model.head_conv(tokens[:, 1]), rtol=0, atol=0)
    model.train()
    cls_train, dist_train = model(images)
    assert cls_train.shape == dist_train.shape == (2, 7)


def test_conv_token_is_the_mean_of_patch_embeddings():
    torch.manual_seed(0)
    model = create_student("demo", num_classes=3, depth=1).eval()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
        patches = model.conv_embed(images)
    x = seen["x"] - model.pos_embed
    torch.testing.assert_close(x[:, 1], patches.mean(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x[:, 2:], patches, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x[:, 0], model.cls_token[0].expand(2, -1), rtol=0, atol=1e-6)


def test_parameter_counts_match_the_release():
    tiny = count_parameters(torch.nn.ModuleList(build_student(load_config("tiny"), 3024)))
    assert round(tiny["student"] / 1e6, 2) == 6.63
    assert tiny["projector"] == 192 * 3024 + 3024  # 0.58M: Linear(192, 3024)
    small = count_parameters(torch.nn.ModuleList(build_student(load_config("small"), 3024)))
    assert small["projector"] == 384 * 3024 + 3024
    assert 23.7e6 < small["student"] < 23.9e6
    assert count_parameters(create_student("tiny"))["projector"] == 0  # the timm model holds no projector


BUILD_DEMO_STUDENT = """
import torch
from deit.config import load_config
from deit.models import build_student

torch.manual_seed(0)
student, projector = build_student(load_config("demo"), 512)
print(repr(projector.embed.weight.detach().double().sum().item()))
print(repr(student.head.weight.detach().double().sum().item()))
print(repr(torch.rand(1).item()))
"""


@pytest.mark.skipif(not supports_portable_kernels(), reason=f"the portable kernels need {PORTABLE_CONDITION}")
def test_student_and_projector_draw_the_weights_of_the_builder_with_the_projector_inside():
    """Seed 0, the demo recipe, a 512-wide projector, built with the portable kernels: the float64 sums of the
    projector's and the cls head's weights that the earlier builder drew, which held the projector inside the student
    (built after the student's layers, before their initialisation) — so runs started with a seed before and after
    the change begin equal — and the generator's next draw (how many numbers were used). The head's truncated normal
    goes through MKL's vector ``erfinv``, whose last bits follow the CPU unless ``MKL_CBWR=COMPATIBLE``."""
    result = subprocess.run(
        [sys.executable, "-c", BUILD_DEMO_STUDENT],
        env=portable_environment(os.environ),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["-28.340418502688408", "-0.48727029772271635", "0.026265859603881836"]


def test_registered_with_timm_and_configurable():
    model = timm.create_model("deit_conv_tiny", num_classes=10, img_size=64, embed_dim=48, depth=2, num_heads=2)
    assert isinstance(model, ConvStemDeiT)
    assert model.num_patches == 16 and model.pos_embed.shape == (1, 18, 48)
    demo, projector = build_student(load_config("demo"), 512)
    assert isinstance(projector, ProjectorDistillLoss) and not isinstance(demo, ProjectorDistillLoss)
    assert not any(isinstance(m, ProjectorDistillLoss) for m in demo.modules())
    assert projector.embed.weight.shape == (512, 64)
    assert projector.bn_s.eps == 0.0
    assert demo.num_patches == 64


def test_bad_model_arguments_name_the_value():
    with pytest.raises(UserError, match="unknown student model 'huge'"):
        create_student("huge")
    with pytest.raises(UserError, match="img_size=100 is not divisible"):
        create_student("tiny", img_size=100)
    with pytest.raises(UserError, match="no downloadable weights"):
        timm.create_model("deit_conv_tiny", pretrained=True)


def test_teacher_loads_model_key_or_raw_state_dict(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=4)
    torch.save({"model": source.state_dict()}, tmp_path / "wrapped.pth")
    torch.save(source.state_dict(), tmp_path / "raw.pth")
    for name in ("wrapped.pth", "raw.pth"):
        teacher, origin = create_teacher("resnet10t", 4, tmp_path / name)
        assert origin == f"file {tmp_path / name}"
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        for key, value in source.state_dict().items():
            assert torch.equal(teacher.state_dict()[key], value)


def test_timm_resnet18_matches_torchvision_key_names():
    ours = timm.create_model("resnet18", num_classes=10).state_dict()
    theirs = torchvision.models.resnet18(num_classes=10).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_teacher_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=f"teacher weights not found at {missing}"):
        create_teacher("resnet10t", 4, missing)
    torch.save({"model": timm.create_model("resnet10t", num_classes=5).state_dict()}, tmp_path / "five.pth")
    with pytest.raises(
        UserError,
        match=r"five.pth does not match teacher resnet10t \(ResNet\): shape mismatch: fc.weight \(5, 512\) vs model "
        r"\(4, 512\)",
    ):
        create_teacher("resnet10t", 4, tmp_path / "five.pth")
    with pytest.raises(UserError, match="unknown teacher model 'resnet_nope'"):
        create_teacher("resnet_nope", 4, missing)
