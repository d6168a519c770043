"""The log's words agree with its numbers."""

from __future__ import annotations

from deit.main import main


def test_one_process_is_not_plural(tmp_path, train_argv):
    assert main(train_argv(tmp_path / "run", "--epochs", "1")) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "DeiT track: method projector, 1 process x batch 4 x 1 micro-batch (global batch 4)" in log


def test_the_run_releases_its_log_handlers(tmp_path, cli, train_argv):
    """After ``main`` returns (trained, or stopped by an error line) the root logger holds none of the run's handlers:
    a later run in the same process (a notebook, the other track) neither writes into this run's log.txt nor into a
    stream that has since been closed."""
    import logging

    def run_handlers() -> list[logging.Handler]:
        return [h for h in logging.getLogger().handlers if getattr(h, "_projector_kd", False)]

    assert main(train_argv(tmp_path / "run", "--epochs", "1")) == 0
    assert run_handlers() == []
    status, stderr = cli(train_argv(tmp_path / "run", "--epochs", "1", "--opts", "train.lr", "-1"))
    assert status == 2 and stderr.startswith("error: ")
    assert run_handlers() == []
