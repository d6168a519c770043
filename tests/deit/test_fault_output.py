"""Output locations: an empty --output is refused (never the current folder)."""
from __future__ import annotations

import os

import pytest

from deit.main import main
from projector_kd.errors import run_cli


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize('value', ['', ' '])
def test_empty_output_is_refused_not_the_current_folder(capsys, tmp_path, train_argv, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    status, err = _cli(capsys, train_argv(tmp_path / 'unused') + ['--output', value])
    assert status == 2
    assert err == ('error: --output is empty — name the run folder, e.g. --output output/my_run (an empty path is '
                   'never taken to mean the current folder)\n')
    assert os.listdir(tmp_path) == []
