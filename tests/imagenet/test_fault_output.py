"""Output locations: an empty --output_dir is refused (never the current folder)."""
from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("value", ["", " "])
def test_empty_output_dir_is_refused_not_the_current_folder(make_recipe, cli, tmp_path, monkeypatch, value):
    recipe = make_recipe("run", method="baseline")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    status, _, err = cli("--config", recipe, "--output_dir", value)
    assert status == 2
    assert err == ("error: --output_dir is empty — name the run folder, e.g. --output_dir output/my_run (an empty "
                   "path is never taken to mean the current folder)\n")
    assert os.listdir(work) == [] and not (tmp_path / "run").exists()
