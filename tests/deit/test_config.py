"""The recipe as data: the values of docs/method.md, overrides, and bad values rejected before any work, naming the
key."""

from __future__ import annotations

import os

import pytest
import yaml

from deit.config import load_config
from deit.main import main
from projector_kd.engine.errors import UserError


def test_tiny_recipe_matches_the_release_item_by_item():
    cfg = load_config("tiny")
    assert cfg["model"] == {
        "name": "tiny",
        "num_classes": 1000,
        "img_size": 224,
        "embed_dim": None,
        "depth": None,
        "num_heads": None,
        "drop_path": 0.0,
        "stem_channels": 64,
        "stem_stride": 2,
        "patch_size": 8,
        "init": "release",
    }
    assert cfg["teacher"] == {
        "name": "regnety_160",
        "ckpt": "ckpts/regnety_160-a5fe301d.pth",
        "hub_tag": "regnety_160.deit_in1k",
        "trusted": False,
    }
    assert cfg["distillation"] == {
        "method": "projector",
        "distance": "log_corr",
        "projector": "linear",
        "eps": 0.0,
        "exponent": 4.0,
        "feature_weight": 1.0,
        "kd_weight": 1.0,
        "kd_temperature": 1.0,
    }
    assert cfg["aug"] == {
        "scale": [0.08, 1.0],
        "hflip": 0.5,
        "rand_augment": "rand-m9-mstd0.5-inc1",
        "color_jitter": 0.4,
        "reprob": 0.25,
        "remode": "pixel",
        "recount": 1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "cutmix_minmax": None,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "smoothing": 0.1,
    }
    train = cfg["train"]
    assert (train["epochs"], train["base_lr"], train["warmup_lr"], train["min_lr"], train["lr_scale_batch"]) == (
        300,
        5e-4,
        5e-7,
        5e-6,
        512,
    )
    assert (
        train["warmup_epochs"],
        train["weight_decay"],
        train["betas"],
        train["opt_eps"],
        train["clip_grad"],
        train["amp"],
    ) == (20, 0.05, [0.9, 0.999], 1e-8, 15.0, True)
    assert cfg["data"]["batch_size"] == 256 and cfg["data"]["interpolation"] == "bicubic"
    assert cfg["data"]["eval_interpolation"] == "bilinear"
    assert cfg["data"]["crop_pct"] == 0.875 and cfg["seed"] == 0 and cfg["fast"] is False
    small = load_config("small")
    assert small["model"]["name"] == "small" and {k: v for k, v in small.items() if k not in ("model", "output")} == {
        k: v for k, v in cfg.items() if k not in ("model", "output")
    }


def test_flags_and_opts_override_in_order(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"epochs": 7}, "data": {"batch_size": 32}}))
    cfg = load_config(
        "tiny", str(overlay), {"data.batch_size": 64, "fast": True}, ["data.batch_size", "128", "train.base_lr", "1e-3"]
    )
    assert (cfg["train"]["epochs"], cfg["data"]["batch_size"], cfg["train"]["base_lr"], cfg["fast"]) == (
        7,
        128,
        1e-3,
        True,
    )


@pytest.mark.parametrize(
    "opts, message",
    [
        (["train.base_lr", "-0.1"], "train.base_lr = -0.1 is out of range (must be > 0)"),
        (["data.batch_size", "0"], "data.batch_size = 0 is out of range (must be > 0)"),
        (["train.epochs", "ten"], "train.epochs must be int, got 'ten'"),
        (["distillation.method", "feature"], "distillation.method = 'feature' is out of range (must be one of none"),
        (["aug.reprob", "1.5"], "aug.reprob = 1.5 is out of range"),
        (["train.lr", "0.1"], "--opts key 'train.lr' is not in the config"),
        (["data.batch_size", "5"], "data.batch_size = 5 must be even with mixup/cutmix on"),
    ],
)
def test_bad_values_name_the_key(opts, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", opts=opts)


def test_unknown_key_in_a_config_file_is_named(tmp_path):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"epoch": 7}}))
    with pytest.raises(UserError, match=r"typo.yaml: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        load_config("tiny", str(overlay))
    with pytest.raises(UserError, match="unknown model 'huge'"):
        load_config("huge")


def test_bad_config_fails_before_any_work(tmp_path, train_argv, run_python):
    output = tmp_path / "never"
    result = run_python("deit/main.py", *train_argv(output, "--opts", "train.base_lr", "-1"), timeout=120)
    assert result.returncode == 2
    assert result.stderr == "error: config: train.base_lr = -1 is out of range (must be > 0)\n"
    assert not output.exists()


def test_output_folder_of_another_run_is_refused_unless_resuming(tmp_path, train_argv):
    output = tmp_path / "run"
    assert main(train_argv(output, "--epochs", "1")) == 0
    with pytest.raises(UserError, match=r"holds a different run \(config differs in: train.base_lr\)"):
        main(train_argv(output, "--epochs", "1", "--opts", "train.base_lr", "2e-3"))
    assert main(train_argv(output, "--epochs", "2", "--resume")) == 0
    assert "resuming from" in (output / "log.txt").read_text()


def test_imagenet_path_comes_from_the_environment_like_the_resnet_track(monkeypatch):
    monkeypatch.setenv("IMAGENET_ROOT", "/data/ilsvrc")
    assert load_config("tiny")["data"]["path"] == "/data/ilsvrc"
    assert load_config("small", flags={"data.path": "/elsewhere"})["data"]["path"] == "/elsewhere"
    monkeypatch.delenv("IMAGENET_ROOT")
    assert load_config("tiny")["data"]["path"] == os.path.expanduser("~/datasets/ilsvrc2012")
    assert load_config("demo")["data"]["path"] == "data/digits"  # a recipe's own path is kept


def test_typo_in_a_preset_is_named_not_suggested_for_a_correct_opts_key(tmp_path, monkeypatch):
    import deit.config as config_module

    presets = tmp_path / "presets"
    presets.mkdir()
    text = (config_module.CONFIG_DIR / "demo.yaml").read_text()
    assert "  epochs: " in text
    (presets / "demo.yaml").write_text(text.replace("  epochs: ", "  epoch: ", 1))
    monkeypatch.setattr(config_module, "CONFIG_DIR", presets)
    with pytest.raises(UserError) as error:
        load_config("demo", opts=["train.epochs", "2"])
    assert str(error.value) == "config: unknown key 'train.epoch' (did you mean 'train.epochs'?)"


def test_old_key_proj_weight_is_read_as_feature_weight_with_one_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("distillation:\n  proj_weight: 0.25\n")
    with caplog.at_level("WARNING", logger="deit.config"):
        cfg = load_config("demo", str(old))
    assert cfg["distillation"]["feature_weight"] == 0.25 and "proj_weight" not in cfg["distillation"]
    assert caplog.messages == [
        f"{old}: distillation.proj_weight is now called distillation.feature_weight; rename it (the old name still "
        "works)"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="deit.config"):
        cfg = load_config("demo", opts=["distillation.proj_weight", "0.5"])
    assert cfg["distillation"]["feature_weight"] == 0.5
    assert caplog.messages == [
        "--opts: distillation.proj_weight is now called distillation.feature_weight; rename it (the old name still "
        "works)"
    ]
    both = tmp_path / "both.yaml"
    both.write_text("distillation:\n  proj_weight: 0.25\n  feature_weight: 0.5\n")
    with pytest.raises(UserError, match="proj_weight and distillation.feature_weight are the same setting"):
        load_config("demo", str(both))
