"""A path the user names is used or refused, never silently replaced; evaluating weights writes nothing beside them;
relative paths in the recipe (no ``--output_dir``) and ``--log`` go against the repository root inside imagenet/ (a
relative run folder, for both tracks: tests/projector_kd/both_tracks/test_paths.py)."""

from __future__ import annotations

import os

import pytest
import torch


def _test_only_naming(cli, recipe, output_dir, dst_ckpt):
    """-test_only with the run folder ``output_dir`` and the weights ``dst_ckpt`` named with --opts."""
    opts = ("--opts", "models.student_model.dst_ckpt", dst_ckpt)
    return cli("--config", recipe, "-test_only", "--output_dir", output_dir, *opts)


@pytest.fixture
def weights(tiny_models, tmp_path):
    """WRN-10-1 weights at ``tmp_path/released/x.pt``."""
    path = tmp_path / "released" / "x.pt"
    path.parent.mkdir()
    torch.save({"model": tiny_models(1).state_dict()}, path)
    return path


def test_test_only_evaluates_the_dst_ckpt_named_with_opts_not_one_in_output_dir(make_recipe, cli, tmp_path, weights):
    recipe = make_recipe("run", method="baseline")
    decoy = tmp_path / "A" / "x.pt"  # a different network under the same file name in --output_dir
    decoy.parent.mkdir()
    torch.save({"model": {"not": torch.zeros(1)}}, decoy)
    status, out, err = _test_only_naming(cli, recipe, tmp_path / "A", weights)
    assert status == 0, err
    assert f'"checkpoint": "{weights}"' in (tmp_path / "A" / "test_only" / "metrics.json").read_text()
    assert "top1 " in out


def test_missing_dst_ckpt_named_with_opts_is_refused_naming_it(make_recipe, cli, tmp_path):
    recipe = make_recipe("run", method="baseline")
    named = tmp_path / "B" / "x.pt"
    status, _, err = _test_only_naming(cli, recipe, tmp_path / "A", named)
    assert status == 2
    assert err.startswith(f"error: checkpoint not found: {named} — ") and err.count("\n") == 1


def test_best_checkpoint_missing_from_output_dir_says_where_the_path_came_from(make_recipe, cli, tmp_path):
    recipe = make_recipe("run", method="baseline")
    status, _, err = cli("--config", recipe, "-test_only", "--output_dir", tmp_path / "A")
    assert status == 2
    assert err == (
        f"error: no checkpoint to evaluate at {tmp_path / 'A' / 'best.pth'} (--output_dir {tmp_path / 'A'} "
        f"with the file name of models.student_model.dst_ckpt) — pass the run folder that holds it, or "
        f"name the file with --opts models.student_model.dst_ckpt PATH\n"
    )


def test_test_only_without_output_dir_writes_nothing_beside_the_weights(make_recipe, cli, tmp_path, weights):
    recipe = make_recipe("run", method="baseline", dst_ckpt=weights)
    status, out, err = cli("--config", recipe, "-test_only", "--log", tmp_path / "eval.log")
    assert status == 0, err
    assert sorted(os.listdir(weights.parent)) == ["x.pt"]
    assert out.splitlines()[-1].startswith("top1 ") and "metrics:" not in out.splitlines()[-1]
    assert "[student wide_resnet] top-1" in (tmp_path / "eval.log").read_text()


def test_run_started_inside_imagenet_writes_under_the_repository_root(make_recipe, cli, tmp_path, monkeypatch):
    from projector_kd.engine import runs

    repo = tmp_path / "repo"
    (repo / "imagenet").mkdir(parents=True)
    monkeypatch.setattr(runs, "REPO_ROOT", repo)
    recipe = make_recipe("recipe", method="baseline", dst_ckpt="resource/ckpt/best.pth")
    monkeypatch.chdir(repo / "imagenet")
    status, _, err = cli("--config", recipe, "--log", "log/output.txt")
    assert status == 0, err
    assert (repo / "resource" / "ckpt" / "best.pth").is_file()
    assert (repo / "resource" / "ckpt" / "metrics.json").is_file()
    assert "[student wide_resnet] top-1" in (repo / "log" / "output.txt").read_text()
    assert list((repo / "imagenet").iterdir()) == []
    # evaluating reads the weights where the run wrote them, still writing nothing into the source tree
    status, out, err = cli("--config", recipe, "-test_only")
    assert status == 0, err
    assert list((repo / "imagenet").iterdir()) == []
