"""The log's words agree with its numbers."""

from __future__ import annotations

from deit.main import main


def test_one_process_is_not_plural(tmp_path, train_argv):
    assert main(train_argv(tmp_path / "run", "--epochs", "1")) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "DeiT track: method projector, 1 process x batch 4 x 1 micro-batch (global batch 4)" in log
