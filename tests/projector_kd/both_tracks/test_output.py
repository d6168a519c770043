"""Output locations that cannot be used end in one line and lose nothing, through both entry points: an empty run
folder flag (never the current folder), a file where the run folder or one of its parents should be, a read-only
folder, a disk that fills while a checkpoint is saved."""

from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("value", ["", " "])
def test_empty_output_is_refused_not_the_current_folder(track, tmp_path, monkeypatch, one_error_line, value):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    flag = track.output_flag
    assert one_error_line(track.run([*track.argv(tmp_path / "run"), flag, value])) == (
        f"error: {flag} is empty — name the run folder, e.g. {flag} output/my_run (an empty path is never taken to "
        f"mean the current folder)"
    )
    assert os.listdir(work) == [] and not (tmp_path / "run").exists()


def test_a_file_where_the_run_folder_should_be_is_refused(track, tmp_path, one_error_line):
    (tmp_path / "run").write_text("notes")
    assert one_error_line(track.run(track.argv(tmp_path / "run"))) == (
        f"error: output folder {tmp_path / 'run'} is a file — remove it or choose another output folder"
    )
    assert (tmp_path / "run").read_text() == "notes"


def test_a_file_in_the_way_of_a_parent_folder_is_refused(track, tmp_path, one_error_line):
    (tmp_path / "runs").write_text("notes")
    assert one_error_line(track.run(track.argv(tmp_path / "runs" / "a"))) == (
        f"error: cannot write {tmp_path / 'runs' / 'a'}: Not a directory — a file is in the way of a folder on that "
        f"path: remove it or choose another folder"
    )
    assert (tmp_path / "runs").read_text() == "notes"


def test_a_read_only_run_folder_is_refused_before_any_work(track, tmp_path, refuse_new_files, one_error_line):
    (tmp_path / "run").mkdir()
    refuse_new_files(tmp_path / "run")
    assert one_error_line(track.run(track.argv(tmp_path / "run"))) == (
        f"error: cannot write {tmp_path / 'run'}: Permission denied — choose a folder you can write to"
    )
    assert os.listdir(tmp_path / "run") == []


def test_a_disk_that_fills_while_saving_loses_nothing(track, tmp_path, fill_disk, one_error_line):
    run = tmp_path / "run"
    track.train(run, epochs=1)
    before = (run / "checkpoint.pth").read_bytes()
    fill_disk("checkpoint.pth", budget=1000)
    assert one_error_line(track.run([*track.argv(run, epochs=2), "--resume"])) == (
        f"error: cannot write {run / 'checkpoint.pth'}: No space left on device — free disk space or choose an output "
        f"folder on another disk; the previous checkpoint.pth is intact"
    )
    assert (run / "checkpoint.pth").read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
