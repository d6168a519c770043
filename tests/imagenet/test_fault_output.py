"""A --log path that is a folder ends in one line before any work (the output faults both tracks share:
tests/projector_kd/both_tracks/test_output.py)."""

from __future__ import annotations


def test_a_log_path_that_is_a_folder_is_refused_before_any_work(make_recipe, cli, tmp_path):
    (tmp_path / "logs").mkdir()
    status, _, err = cli("--config", make_recipe("run", method="baseline"), "--log", tmp_path / "logs")
    assert status == 2
    assert err.count("\n") == 1 and err.rstrip("\n") == (
        f"error: log file {tmp_path / 'logs'} is a folder — name a file, e.g. {tmp_path / 'logs' / 'output.txt'}"
    )
    assert not (tmp_path / "run").exists()
