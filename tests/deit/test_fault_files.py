"""Files a run writes (checkpoints, config, metrics) get the permissions the umask gives, as any new file does."""

from __future__ import annotations

import os
import stat

import pytest

from deit.main import main


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_run_files_follow_the_umask(tmp_path, train_argv, umask_027):
    assert main(train_argv(tmp_path / "run", "--epochs", "1")) == 0
    modes = {
        name: stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        for name in ("checkpoint.pth", "ckpt_epoch_0.pth", "config.yaml", "metrics.json", "log.txt")
    }
    assert modes == dict.fromkeys(modes, 0o640)
