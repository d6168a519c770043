"""DeiT students exported as timm / Hugging Face folders: equal logits through timm's own loaders, the same layout as
timm's save_for_hf, and deit/main.py evaluating a folder or .safetensors file like the checkpoint it came from."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf
from tracks import DEIT_RECIPE

from deit.checkpoint import load_student_checkpoint
from deit.config import load_config
from deit.export import export_student, read_student, timm_args
from deit.main import main
from deit.models import build_student, create_student
from projector_kd.engine.checkpoint import CheckpointError

from .test_checkpoint import _randomise_buffers, release_checkpoint


def _assert_same_logits(expected: torch.Tensor, folder, name: str, images: torch.Tensor) -> None:
    """Both of timm's ways to load an exported folder give ``expected`` (1e-5 relative)."""
    with torch.no_grad():
        by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images)
        by_file = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"))
        ).eval()(images)
    torch.testing.assert_close(by_folder, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(by_file, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_release_layout_round_trip_gives_the_same_logits(tmp_path, preset):
    torch.manual_seed(0)
    source = create_student(preset)
    _randomise_buffers(source)
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save(release_checkpoint(source, teacher_dim=3024), path)
    folder = export_student(path, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert not [k for k in weights if k.startswith("distillation_loss.")]
    assert sorted(weights) == sorted(source.state_dict())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = source.eval()(images)
    _assert_same_logits(expected, folder, f"deit_conv_{preset}", images)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == f"deit_conv_{preset}" and config["num_classes"] == 1000
    assert {k: config["pretrained_cfg"][k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")} == {
        "input_size": [3, 224, 224],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    card = (folder / "README.md").read_text()
    assert "| best val top-1 (%) recorded in the checkpoint | 77.20 |" in card and "license: mit" in card


def test_layout_equals_timms_save_for_hf(tmp_path):
    torch.manual_seed(0)
    source = create_student("demo", num_classes=10)
    path = tmp_path / "ckpt_epoch_9.pth"
    torch.save(release_checkpoint(source, teacher_dim=64), path)
    ours = export_student(path, tmp_path / "ours")
    reference = timm.create_model("deit_conv_demo", num_classes=10)
    reference.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("distillation_")})
    save_for_hf(reference, str(tmp_path / "timm"), safe_serialization=True)
    theirs = sorted(p.name for p in (tmp_path / "timm").iterdir())
    assert theirs == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in ours.iterdir()) == sorted(theirs + ["README.md"])
    assert json.loads((ours / "config.json").read_text()) == json.loads((tmp_path / "timm" / "config.json").read_text())
    mine = safetensors.torch.load_file(str(ours / "model.safetensors"))
    timms = safetensors.torch.load_file(str(tmp_path / "timm" / "model.safetensors"))
    assert mine.keys() == timms.keys() and all(torch.equal(mine[k], timms[k]) for k in mine)


def test_training_checkpoint_exports_with_its_run_config_and_evaluates_as_folder(
    train_argv, image_folder, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(train_argv(run, "--epochs", "1")) == 0
    source = read_student(run / "checkpoint.pth")
    assert source.arch == {key: value for key, value in DEIT_RECIPE["model"].items() if key != "drop_path"}
    assert (source.transform.img_size, source.transform.crop_pct) == (16, 1.0)
    folder = export_student(run / "checkpoint.pth", tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "deit_conv_demo"
    assert config["model_args"] == {
        "embed_dim": 16,
        "depth": 2,
        "stem_channels": 8,
        "img_size": [16, 16],
        "num_classes": 3,
        "in_chans": 3,
    }
    trained = create_student(
        "demo", num_classes=3, img_size=16, embed_dim=16, depth=2, num_heads=2, stem_channels=8, patch_size=2
    )
    load_student_checkpoint(trained, run / "checkpoint.pth")
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = trained.eval()(images)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=0)
    metrics = json.loads((run / "metrics.json").read_text())
    card = (folder / "README.md").read_text()
    assert f"| val top-1 (%) | {metrics['top1']:.2f} |" in card and "- **method:** projector" in card
    assert "- **Teacher:** timm `resnet10t`" in card
    top1 = {}
    for name, ckpt in (
        ("pth", run / "checkpoint.pth"),
        ("folder", folder),
        ("safetensors", folder / "model.safetensors"),
    ):
        out = tmp_path / f"eval_{name}"
        argv = train_argv(out)
        argv.remove("--train_student")
        assert main([*argv, "--ckpt", str(ckpt)]) == 0
        top1[name] = json.loads((out / "eval_metrics.json").read_text())["top1"]
    assert top1["folder"] == top1["safetensors"] == top1["pth"] == metrics["top1"]


def test_exported_weights_are_loaded_exactly(tmp_path):
    torch.manual_seed(0)
    source = create_student("demo", num_classes=10)
    torch.save({"model": source.state_dict()}, tmp_path / "demo.pth")
    folder = export_student(tmp_path / "demo.pth", tmp_path / "export")
    other = create_student("demo", num_classes=10, embed_dim=32)
    with pytest.raises(
        CheckpointError, match=r"export does not match the model \(ConvStemDeiT\): shape mismatch: cls_token"
    ):
        load_student_checkpoint(other, folder)
    (tmp_path / "broken.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"broken.safetensors is truncated or corrupt"):
        load_student_checkpoint(source, tmp_path / "broken.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"exported folder .*empty holds no model.safetensors"):
        load_student_checkpoint(source, tmp_path / "empty")


def test_run_config_with_the_presets_widths_and_bilinear_default(tmp_path, release_state):
    cfg = load_config("tiny")  # embed_dim / depth / num_heads null: the preset's
    cfg["data"].pop("eval_interpolation", None)  # a run recorded before the evaluation resize had its own key
    torch.save(
        {
            "format": "projector_kd.deit/1",
            "model": release_state(*build_student(cfg, 3024)),
            "config": cfg,
            "epoch": 300,
        },
        tmp_path / "checkpoint.pth",
    )
    source = read_student(tmp_path / "checkpoint.pth")
    assert (source.preset, source.arch) == (
        "tiny",
        {
            "embed_dim": 192,
            "depth": 12,
            "num_heads": 3,
            "stem_channels": 64,
            "stem_stride": 2,
            "patch_size": 8,
            "img_size": 224,
            "num_classes": 1000,
        },
    )
    assert timm_args(source) == {"img_size": 224, "num_classes": 1000}
    assert source.transform.pretrained_cfg()["interpolation"] == "bilinear"
    assert not [k for k in source.state if k.startswith("distillation_loss.")]
