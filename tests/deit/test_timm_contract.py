"""The conv-stem students as timm models: pretrained config, heads, features, intermediates, checkpointing, fx/jit."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models._manipulate import group_parameters

from deit.config import load_config
from deit.datasets import build_transform
from deit.models import ConvStemDeiT, create_student


def _demo(**kwargs) -> ConvStemDeiT:
    torch.manual_seed(0)
    return timm.create_model("deit_conv_demo", num_classes=5, **kwargs).eval()


@pytest.mark.parametrize(
    "name, size, crop_pct",
    [("deit_conv_tiny", 224, 0.875), ("deit_conv_small", 224, 0.875), ("deit_conv_demo", 32, 1.0)],
)
def test_pretrained_cfg_resolves_to_the_evaluation_transform(name, size, crop_pct):
    model = timm.create_model(name, device="meta")
    config = resolve_data_config(model=model)
    assert config == {
        "input_size": (3, size, size),
        "interpolation": "bilinear",
        "crop_pct": crop_pct,
        "crop_mode": "center",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    recipe = load_config(name.removeprefix("deit_conv_"))
    assert (recipe["model"]["img_size"], recipe["data"]["crop_pct"]) == (size, crop_pct)
    recipe["data"].update(interpolation="bilinear", eval_interpolation="bilinear")  # the evaluation's resize
    ours = build_transform(False, recipe)
    theirs = create_transform(**config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 270, 3), dtype=np.uint8))
    torch.testing.assert_close(theirs(image), ours(image), rtol=0, atol=0)
    assert model.pretrained_cfg["classifier"] == ("head", "head_conv")
    assert model.pretrained_cfg["first_conv"] == "conv_embed.conv.0" and model.pretrained_cfg["license"] == "mit"


def test_heads_pre_logits_and_reset_classifier():
    model = _demo()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)
        assert tokens.shape == (3, 66, model.num_features) and model.head_hidden_size == model.num_features == 64
        pre_logits = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pre_logits, (tokens[:, 0] + tokens[:, 1]) / 2, rtol=0, atol=0)
        logits = model(images)
        torch.testing.assert_close(logits, (model.head(tokens[:, 0]) + model.head_conv(tokens[:, 1])) / 2)
        assert model.get_classifier() == (model.head, model.head_conv)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(images), pre_logits, rtol=0, atol=0)
        model.reset_classifier(7)
        assert model(images).shape == (3, 7) and model.head.weight.dtype == torch.float32
    headless = timm.create_model("deit_conv_demo", num_classes=0).eval()
    assert headless(images).shape == (3, 64)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        model.reset_classifier(3, "avg")
    model.train()
    cls_logits, dist_logits = model(images)
    assert cls_logits.shape == dist_logits.shape == (3, 7)


def test_forward_intermediates_selects_blocks_and_matches_forward_features():
    model = _demo()
    images = torch.randn(2, 3, 32, 32)
    seen = []
    hooks = [block.register_forward_hook(lambda m, i, out: seen.append(out)) for block in model.blocks]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images, indices=[0, -1])
        for hook in hooks:
            hook.remove()
        torch.testing.assert_close(final, model.forward_features(images), rtol=0, atol=0)
        assert [tuple(x.shape) for x in intermediates] == [(2, 64, 8, 8)] * 2
        torch.testing.assert_close(intermediates[0], seen[0][:, 2:].reshape(2, 8, 8, 64).permute(0, 3, 1, 2))
        torch.testing.assert_close(intermediates[1], seen[3][:, 2:].reshape(2, 8, 8, 64).permute(0, 3, 1, 2))
        last_two = model.forward_intermediates(images, indices=2, output_fmt="NLC", intermediates_only=True, norm=True)
        assert len(last_two) == 2 and last_two[1].shape == (2, 64, 64)
        torch.testing.assert_close(last_two[1], final[:, 2:], rtol=0, atol=0)
        pairs = model.forward_intermediates(images, indices=[1], return_prefix_tokens=True, intermediates_only=True)
        assert pairs[0][0].shape == (2, 64, 8, 8) and pairs[0][1].shape == (2, 2, 64)
        early = model.forward_intermediates(images, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], pairs[0][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="NHWC"):
        model.forward_intermediates(images, output_fmt="NHWC")
    kept = model.prune_intermediate_layers(indices=[1], prune_norm=True)
    assert kept == [1] and len(model.blocks) == 2 and model.num_classes == 0


def test_features_only_returns_the_selected_blocks():
    torch.manual_seed(0)
    features = timm.create_model("deit_conv_demo", features_only=True, out_indices=(1, 3)).eval()
    outputs = features(torch.randn(2, 3, 32, 32))
    assert [tuple(x.shape) for x in outputs] == [(2, 64, 8, 8)] * 2
    assert features.feature_info.channels() == [64, 64] and features.feature_info.reduction() == [4, 4]


def test_grad_checkpointing_keeps_outputs_and_gradients():
    model = _demo().train()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    plain = torch.cat(model(images))
    plain.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    checkpointed = torch.cat(model(images))
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7)


def test_torchscript_and_fx_give_the_same_logits():
    model = _demo()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(torch.jit.script(model)(images), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(images), expected, rtol=1e-5, atol=1e-6)


def test_optimizer_groups_device_and_dtype():
    model = create_student("demo", num_classes=5)
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert groups["cls_token"] == groups["pos_embed"] == groups["conv_embed.proj.weight"] == 0
    assert groups["blocks.0.attn.qkv.weight"] == 1 and groups["blocks.3.mlp.fc2.bias"] == 4
    assert groups["norm.weight"] == 4 and groups["head.weight"] == groups["head_conv.weight"] == 5
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    meta = timm.create_model("deit_conv_small", device="meta", dtype=torch.bfloat16)
    assert {t.device.type for t in meta.parameters()} == {"meta"}
    assert {t.dtype for t in meta.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError):
        timm.create_model("deit_conv_demo", not_a_model_argument=1)
