"""scripts/export.py faults: the exported folder follows the umask, a staging folder left by a killed export is removed
by the next, a run folder exports the checkpoint its metrics describe, and output paths too long or running into a file
end in one line."""

from __future__ import annotations

import json
import os
import stat

import pytest
import safetensors.torch
import torch
import torchvision

from deit.models import create_student


@pytest.fixture(scope="module")
def deit_checkpoint(tmp_path_factory):
    """A DeiT-track demo student saved as ``{'model': state_dict}``."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deit") / "student.pth"
    torch.save({"model": create_student("demo", num_classes=10).state_dict()}, path)
    return path


@pytest.fixture
def umask_002():
    previous = os.umask(0o002)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_exported_folder_follows_the_umask(deit_checkpoint, tmp_path, export_cli, umask_002):
    assert export_cli(deit_checkpoint, tmp_path / "out").returncode == 0
    assert _mode(tmp_path / "out") == 0o775
    files = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in files] == ["README.md", "config.json", "model.safetensors"]
    assert [_mode(p) for p in files] == [0o664] * 3


def test_a_staging_folder_left_by_a_killed_export_is_removed_by_the_next(deit_checkpoint, tmp_path, export_cli):
    left = tmp_path / ".out.k1ll3d.tmp"  # as a SIGKILL during the export leaves it: a partial file inside
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\x00" * 100)
    other = tmp_path / ".other.k1ll3d.tmp"  # another target's: not this export's to remove
    other.mkdir()
    assert export_cli(deit_checkpoint, tmp_path / "out").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.k1ll3d.tmp", "out"]


def test_a_run_folder_exports_the_checkpoint_its_metrics_describe(deit_checkpoint, tmp_path, export_cli):
    deit_run = tmp_path / "deit_run"  # DeiT track: checkpoint.pth (the last epoch, which metrics.json describes)
    deit_run.mkdir()
    (deit_run / "checkpoint.pth").write_bytes(deit_checkpoint.read_bytes())
    result = export_cli(deit_run, tmp_path / "deit_out")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        == f"exported the deit student of {deit_run / 'checkpoint.pth'} to {tmp_path / 'deit_out'}"
    )

    resnet_run = tmp_path / "resnet_run"  # ResNet track: the best checkpoint metrics.json names, not checkpoint.pth
    resnet_run.mkdir()
    torch.manual_seed(0)
    last, best = torchvision.models.resnet18(num_classes=10), torchvision.models.resnet18(num_classes=10)
    torch.save({"model": last.state_dict()}, resnet_run / "checkpoint.pth")
    torch.save({"model": best.state_dict()}, resnet_run / "best.pth")
    recorded = "/where/it/was/trained/best.pth"  # the folder has moved since
    (resnet_run / "metrics.json").write_text(json.dumps({"checkpoint": recorded, "top1": 50.0}))
    (resnet_run / "config.yaml").write_bytes(b"recipe: # \xff edited by hand\n")  # neither UTF-8 nor used
    result = export_cli(resnet_run, tmp_path / "resnet_out")
    assert result.returncode == 0, result.stderr
    assert f"student of {resnet_run / 'best.pth'} to" in result.stdout
    exported = safetensors.torch.load_file(tmp_path / "resnet_out" / "torchvision_state_dict.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in best.state_dict().items())


def test_folders_that_are_no_run_and_bad_output_paths_end_in_one_line(
    deit_checkpoint, tmp_path, export_cli, one_error_line
):
    (tmp_path / "empty").mkdir()
    assert one_error_line(export_cli(tmp_path / "empty", tmp_path / "out")) == (
        f"error: {tmp_path / 'empty'} is a folder without checkpoint.pth or a best checkpoint named in metrics.json — "
        "pass a run folder, or the checkpoint file itself"
    )
    long_name = tmp_path / ("n" * 300)
    assert one_error_line(export_cli(deit_checkpoint, long_name)) == (
        f"error: cannot write {long_name}: File name too long — a name on that path is longer than the file system "
        "allows (usually 255 bytes): choose a shorter one; nothing was written"
    )
    (tmp_path / "a-file").write_text("")
    assert one_error_line(export_cli(deit_checkpoint, tmp_path / "a-file" / "out")).startswith(
        f"error: cannot write {tmp_path / 'a-file' / 'out'}: "
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty"]
