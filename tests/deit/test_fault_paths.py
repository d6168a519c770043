"""Relative output paths: against the working directory, except inside the repository's source folders (deit/, ...),
where they go against the repository root, so a run started from deit/ never writes into the source tree."""

from __future__ import annotations

import pytest

from deit.main import main
from projector_kd.engine import runs


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "deit").mkdir(parents=True)
    monkeypatch.setattr(runs, "REPO_ROOT", repo)
    return repo


def _argv(train_argv, output):
    argv = train_argv("PLACEHOLDER", "--epochs", "1")
    argv[argv.index("PLACEHOLDER")] = output
    return argv


def test_run_started_inside_deit_writes_under_the_repository_root(fake_repo, train_argv, monkeypatch):
    monkeypatch.chdir(fake_repo / "deit")
    assert main(_argv(train_argv, "runs/a")) == 0
    assert (fake_repo / "runs" / "a" / "checkpoint.pth").is_file()
    assert sorted(p.name for p in (fake_repo / "deit").iterdir()) == []


def test_run_started_elsewhere_writes_under_the_working_directory(fake_repo, tmp_path, train_argv, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(_argv(train_argv, "runs/a")) == 0
    assert (tmp_path / "work" / "runs" / "a" / "checkpoint.pth").is_file()
    assert not (fake_repo / "runs").exists()
