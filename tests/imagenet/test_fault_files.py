"""Files a run writes (checkpoints, config, metrics) get the permissions the umask gives, as any new file does."""

from __future__ import annotations

import os
import stat

import pytest


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_run_files_follow_the_umask(make_recipe, cli, tmp_path, umask_022):
    status, _, err = cli("--config", make_recipe("run", method="baseline"))
    assert status == 0, err
    modes = {
        name: stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        for name in ("checkpoint.pth", "best.pth", "config.yaml", "metrics.json", "log.txt")
    }
    assert modes == dict.fromkeys(modes, 0o644)
