"""Relative run folders through both entry points: against the working directory, except inside the repository's
source folders (deit/, imagenet/, ...), where they go against the repository root, so a run started from a source
folder never writes into the source tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from projector_kd.engine import runs


@pytest.fixture
def fake_repo(tmp_path, monkeypatch) -> Path:
    """A repository root holding the tracks' source folders, empty."""
    repo = tmp_path / "repo"
    for folder in ("deit", "imagenet"):
        (repo / folder).mkdir(parents=True)
    monkeypatch.setattr(runs, "REPO_ROOT", repo)
    return repo


def test_run_started_inside_its_source_folder_writes_under_the_repository_root(track, fake_repo, monkeypatch):
    source = fake_repo / track.script.parent.name
    monkeypatch.chdir(source)
    track.train(Path("runs/a"))
    assert (fake_repo / "runs" / "a" / "checkpoint.pth").is_file()
    assert sorted(p.name for p in source.iterdir()) == []


def test_run_started_elsewhere_writes_under_the_working_directory(track, fake_repo, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    track.train(Path("runs/a"))
    assert (tmp_path / "work" / "runs" / "a" / "checkpoint.pth").is_file()
    assert not (fake_repo / "runs").exists()
