"""Run folders through both entry points: one run per folder (a second run on a folder in use is refused naming the
holder; a lock left by a killed run does not block the rerun), the files a run writes get the permissions the umask
gives, and ``wall_time_s`` counts the time of every process that trained the run, across stops and resumes."""

from __future__ import annotations

import json
import os
import socket
import stat
import time

import pytest

from projector_kd.engine import loop
from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.signals import EXIT_STATUS_STOPPED


def test_folder_in_use_is_refused_and_free_again_once_the_holder_is_killed(
    track, tmp_path, hold_output_dir, one_error_line
):
    output = tmp_path / "run"
    holder = hold_output_dir(output)
    line = one_error_line(track.run(track.argv(output)))
    assert line.startswith(
        f"error: output folder {output} is in use by another run (pid {holder.pid} on {socket.gethostname()}, since "
    )
    assert line.endswith(") — wait for it to end, or choose another output folder")
    assert not (output / "config.yaml").exists()

    holder.kill()
    holder.wait()
    track.train(output)
    assert load_checkpoint(output / "checkpoint.pth")["epoch"] == 1
    track.train(output)  # the finished run released the folder


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_run_files_follow_the_umask(track, tmp_path, umask_027):
    track.train(tmp_path / "run")
    modes = {
        name: stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        for name in (*track.run_files, "config.yaml", "metrics.json", "log.txt")
    }
    assert modes == dict.fromkeys(modes, 0o640)


def test_wall_time_adds_up_across_a_mid_epoch_resume(track, tmp_path, monkeypatch, sigterm_progress):
    output = tmp_path / "run"
    stopping = sigterm_progress(loop, 0, 3)

    def slow_then_stopped(iterable, **kwargs):  # 1.5 s of work in epoch 0, then the scheduler's SIGTERM before step 3
        for index, batch in enumerate(stopping(iterable, **kwargs), start=1):
            if kwargs.get("desc") == "epoch 0" and index == 2:
                time.sleep(1.5)
            yield batch

    with monkeypatch.context() as patch:
        patch.setattr(loop, "progress", slow_then_stopped)
        result = track.run(track.argv(output, epochs=2))
    assert result.returncode == EXIT_STATUS_STOPPED, result.stderr[-3000:]
    stopped = load_checkpoint(output / "checkpoint.pth")
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (0, 3) and stopped["wall_time_s"] >= 1.5

    started = time.perf_counter()
    track.train(output, epochs=2)
    second = time.perf_counter() - started
    metrics = json.loads((output / "metrics.json").read_text())
    assert stopped["wall_time_s"] < metrics["wall_time_s"] <= stopped["wall_time_s"] + second
    assert load_checkpoint(output / "checkpoint.pth")["wall_time_s"] > stopped["wall_time_s"]
