"""scripts/export.py as users run it: either track's checkpoint to a folder timm loads in a fresh process, and one
``error:`` line for each bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from yacs.config import CfgNode

from deit.models import create_student

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "export.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120
    )


@pytest.fixture(scope="module")
def release_demo(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A release-layout DeiT file (pickled yacs config) of the demo student, with inputs and expected logits."""
    torch.manual_seed(0)
    model = create_student("demo", num_classes=10).eval()
    path = tmp_path_factory.mktemp("release") / "ckpt_epoch_299.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {},
            "lr_scheduler": {},
            "max_accuracy": 50.0,
            "epoch": 299,
            "config": CfgNode({"MODEL": CfgNode({"TYPE": "deit"})}),
        },
        path,
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return path, images, model(images)


def test_release_deit_file_exports_and_loads_in_a_fresh_process(release_demo, tmp_path):
    path, images, expected = release_demo
    result = _run(path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"exported the deit student of {path} to {tmp_path / 'out'}"
    torch.save(images, tmp_path / "images.pt")
    loader = textwrap.dedent(f"""
        import timm, torch
        import deit
        images = torch.load({str(tmp_path / "images.pt")!r})
        with torch.no_grad():
            logits = timm.create_model({"local-dir:" + str(tmp_path / "out")!r}, pretrained=True).eval()(images)
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", loader], check=True, env=ENV, timeout=120, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=0)


def test_resnet_checkpoint_exports(tmp_path, export_cli, one_error_line):
    torch.manual_seed(0)
    torch.save({"model": torchvision.models.resnet18(num_classes=10).state_dict()}, tmp_path / "best.pth")
    result = export_cli(tmp_path / "best.pth", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "torchvision_state_dict.safetensors",
    ]
    assert "--model" in one_error_line(export_cli(tmp_path / "best.pth", tmp_path / "out2", "--model", "tiny"))


def test_bad_inputs_end_in_one_error_line(release_demo, tmp_path, export_cli, one_error_line):
    path, _, _ = release_demo
    missing = tmp_path / "missing.pth"
    assert one_error_line(_run(missing, tmp_path / "out")) == (  # as a script: exit status 2, one line
        f"error: checkpoint not found: {missing} — check the path (or download the weights, see README)"
    )
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2048))
    assert str(corrupt) in one_error_line(export_cli(corrupt, tmp_path / "out"))
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}}, tmp_path / "unknown.pth")
    assert one_error_line(export_cli(tmp_path / "unknown.pth", tmp_path / "out")) == (
        f"error: {tmp_path / 'unknown.pth'} holds neither a conv-stem DeiT nor a ResNet student (unknown layout; "
        "first keys: encoder.weight)"
    )
    torch.save({"epoch": 3}, tmp_path / "no_model.pth")
    assert "holds no model state dict" in one_error_line(export_cli(tmp_path / "no_model.pth", tmp_path / "out"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert one_error_line(export_cli(path, tmp_path / "full")) == (
        f"error: output folder {tmp_path / 'full'} is not empty; choose a new folder or pass --force to replace its "
        "contents"
    )
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert export_cli(path, tmp_path / "full", "--force").returncode == 0
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "model.safetensors").is_file()
    assert "unknown student model 'huge'" in one_error_line(export_cli(path, tmp_path / "out3", "--model", "huge"))
    assert one_error_line(export_cli(tmp_path / "full", tmp_path / "out3")) == (
        f"error: {tmp_path / 'full'} is already exported weights (a folder or .safetensors file); export the training "
        "checkpoint it came from, or copy the folder"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out3").exists()
