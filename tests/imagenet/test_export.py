"""ResNet students exported as timm / Hugging Face folders (timm's resnet18 + a torchvision state dict), the release's
ResNet18 file read without unsafe unpickling, and -test_only on exported folders and .safetensors files."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import safetensors.torch
import timm
import torch
import torchvision
import yaml

from imagenet.export import TORCHVISION_FILE, eval_transform, export_student, torchvision_to_timm
from projector_kd.engine.checkpoint import CheckpointError, load_checkpoint

RELEASE_CONFIG = {  # the release's recipe as torchdistill 0.x loaded it from YAML (abridged)
    "datasets": {
        "ilsvrc2012": {
            "name": "ilsvrc2012",
            "type": "ImageFolder",
            "splits": {
                "train": {
                    "dataset_id": "ilsvrc2012/train",
                    "params": {
                        "transform_params": [
                            {"type": "RandomResizedCrop", "params": {"size": [224, 224]}},
                            {
                                "type": "Normalize",
                                "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                            },
                        ]
                    },
                },
                "val": {
                    "dataset_id": "ilsvrc2012/val",
                    "params": {
                        "transform_params": [
                            {"type": "Resize", "params": {"size": 256}},
                            {"type": "CenterCrop", "params": {"size": [224, 224]}},
                            {
                                "type": "Normalize",
                                "params": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                            },
                        ]
                    },
                },
            },
        }
    },
    "models": {
        "teacher_model": {"name": "resnet34", "params": {"num_classes": 1000, "pretrained": True}},
        "student_model": {"name": "resnet18", "params": {"num_classes": 1000, "pretrained": False}},
    },
    "train": {
        "num_epochs": 100,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        "scheduler": {"type": "MultiStepLR", "params": {"milestones": [30, 60, 90], "gamma": 0.1}},
    },
}


def _student(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    return model.eval()


def release_file(model: torch.nn.Module, path) -> None:
    """A checkpoint as the release's torchdistill 0.x saved it, ``args`` an argparse.Namespace."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[30, 60, 90])
    args = argparse.Namespace(
        config="config/ilsvrc2012/ours/res3418.yaml",
        device="cuda",
        log="log/output.txt",
        start_epoch=0,
        seed=None,
        test_only=False,
        student_only=False,
        world_size=8,
        dist_url="env://",
        adjust_lr=False,
    )
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_value": 71.87,
            "lr_scheduler": scheduler.state_dict(),
            "config": RELEASE_CONFIG,
            "args": args,
        },
        path,
    )


def _timm_logits(folder, images):
    with torch.no_grad():
        by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images)
        by_file = timm.create_model(
            "resnet18",
            pretrained=True,
            num_classes=10,
            pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=10),
        ).eval()(images)
    return by_folder, by_file


def test_distilled_checkpoint_round_trip_through_timm_and_torchvision(tmp_path):
    student = _student()
    run = tmp_path / "run"
    run.mkdir()
    projector = {"embed.weight": torch.randn(512, 512), "embed.bias": torch.zeros(512)}
    torch.save(
        {
            "model": student.state_dict(),
            "projector": projector,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 3,
            "best_value": 41.5,
        },
        run / "best.pth",
    )
    (run / "metrics.json").write_text(
        json.dumps({"top1": 41.5, "top5": 90.0, "teacher_top1": 60.25, "checkpoint": str(run / "best.pth")})
    )
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "recipe": {
                    "models": {"teacher_model": {"key": "resnet34"}, "student_model": {"key": "resnet18"}},
                    "train": {"num_epochs": 3, "optimizer": {"key": "SGD", "kwargs": {"lr": 0.1}}},
                }
            }
        )
    )
    folder = export_student(run / "best.pth", tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", TORCHVISION_FILE, "config.json", "model.safetensors"]
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = student(images)
    for logits in _timm_logits(folder, images):
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=0)
    again = torchvision.models.resnet18(num_classes=10).eval()
    again.load_state_dict(safetensors.torch.load_file(str(folder / TORCHVISION_FILE)))
    with torch.no_grad():
        torch.testing.assert_close(again(images), expected, rtol=0, atol=0)
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert weights.keys() == student.state_dict().keys()  # no projector, no optimizer state
    card = (folder / "README.md").read_text()
    assert "| val top-1 (%) | 41.50 |" in card and "| teacher val top-1 (%) | 60.25 |" in card
    assert "- **Teacher:** torchvision `resnet34`" in card and "- **optimizer:** SGD {'lr': 0.1}" in card


def test_torchvision_names_map_onto_timm_and_mismatches_are_named(tmp_path):
    state = _student().state_dict()
    model = timm.create_model("resnet18", num_classes=10)
    mapped = torchvision_to_timm(state, model, tmp_path / "x.pth")
    assert list(mapped) == list(model.state_dict()) and all(mapped[k] is state[k] for k in mapped)
    state["fc.weight"] = state["fc.weight"][:5]
    del state["layer4.1.bn2.running_var"]
    with pytest.raises(
        CheckpointError,
        match=r"x.pth does not match timm's resnet18: shape mismatch: fc.weight \(5, 512\) vs model \(10, 512\); "
        r"missing: layer4.1.bn2.running_var — ",
    ):
        torchvision_to_timm(state, model, tmp_path / "x.pth")


def test_release_resnet18_file_exports_without_trust(tmp_path):
    student = _student(num_classes=1000)
    path = tmp_path / "ilsvrc2012-resnet18_from_resnet34.pt"
    release_file(student, path)
    folder = export_student(path, tmp_path / "export")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = student(images)
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(images)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18"
    assert {k: config["pretrained_cfg"][k] for k in ("input_size", "interpolation", "crop_pct")} == {
        "input_size": [3, 224, 224],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }
    card = (folder / "README.md").read_text()
    assert "| best val top-1 (%) recorded in the checkpoint | 71.87 |" in card
    assert "- **Teacher:** torchvision `resnet34`" in card and "- **scheduler:** MultiStepLR" in card


def test_eval_transform_read_from_a_recipe():
    assert eval_transform(RELEASE_CONFIG).pretrained_cfg() == {
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    demo = {
        "datasets": {
            "val": {
                "!import_call": {
                    "key": "x",
                    "init": {
                        "kwargs": {
                            "transform": {
                                "!import_call": {
                                    "key": "torchvision.transforms.Compose",
                                    "init": {
                                        "kwargs": {
                                            "transforms": [
                                                {
                                                    "!import_call": {
                                                        "key": "torchvision.transforms.Resize",
                                                        "init": {"kwargs": {"size": 36}},
                                                    }
                                                },
                                                {
                                                    "!import_call": {
                                                        "key": "torchvision.transforms.CenterCrop",
                                                        "init": {"kwargs": {"size": 32}},
                                                    }
                                                },
                                                {
                                                    "!import_call": {
                                                        "key": "torchvision.transforms.Normalize",
                                                        "init": {
                                                            "kwargs": {
                                                                "mean": [0.5, 0.5, 0.5],
                                                                "std": [0.25, 0.25, 0.25],
                                                            }
                                                        },
                                                    }
                                                },
                                            ]
                                        }
                                    },
                                }
                            }
                        }
                    },
                }
            }
        }
    }
    assert eval_transform(demo).pretrained_cfg() == {
        "input_size": (3, 32, 32),
        "crop_pct": 32 / 36,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
    }


def test_test_only_reads_the_release_layout_and_exported_weights(make_recipe, tiny_models, cli, tmp_path, cli_error):
    (tmp_path / "baseline").mkdir()
    recipe = make_recipe("baseline", method="baseline")
    best = tmp_path / "baseline" / "best.pth"
    release_file(tiny_models(1), best)
    assert load_checkpoint(best)["args"]["world_size"] == 8
    status, out, err = cli("--config", recipe, "-test_only", "--output_dir", tmp_path / "baseline")
    assert status == 0, err
    reference = json.loads((tmp_path / "baseline" / "test_only" / "metrics.json").read_text())
    weights = tmp_path / "exported"
    weights.mkdir()
    safetensors.torch.save_file(tiny_models(1).state_dict(), str(weights / TORCHVISION_FILE))
    for path in (weights, weights / TORCHVISION_FILE):
        status, out, err = cli(
            "--config",
            recipe,
            "-test_only",
            "--output_dir",
            tmp_path / "eval",
            "--opts",
            "models.student_model.dst_ckpt",
            path,
        )
        assert status == 0, err
        tested = json.loads((tmp_path / "eval" / "test_only" / "metrics.json").read_text())
        assert tested["checkpoint"] == str(path)
        assert (tested["top1"], tested["top5"]) == (reference["top1"], reference["top5"])
        shutil.rmtree(tmp_path / "eval")
    safetensors.torch.save_file(tiny_models(2).state_dict(), str(weights / TORCHVISION_FILE))
    line = cli_error("--config", recipe, "-test_only", "--opts", "models.student_model.dst_ckpt", weights)
    assert line.startswith(f"error: checkpoint {weights} does not match models.student_model (wide_resnet)")
    assert "shape mismatch: layer1.0.conv1.weight (32, 16, 3, 3) vs model (16, 16, 3, 3)" in line
