"""Fixtures for the whole suite."""
import errno
import io
import os
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: deterministic and fast when other processes share the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _fill_disk_when_writing(monkeypatch, name: str, after_calls: int = 0, budget: int = 100) -> dict:
    """From the ``after_calls + 1``-th file named ``name`` opened through ``os.fdopen`` on, writes past ``budget`` bytes
    fail with ENOSPC. Returns a dict counting the ``calls``."""
    real_fdopen = os.fdopen
    state = {"calls": 0}

    class FullDisk(io.BufferedWriter):
        written = 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def fdopen(fd, mode="r", *args, **kwargs):
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name if isinstance(fd, int) else ""
        if "w" in mode and target.startswith(f".{name}."):
            state["calls"] += 1
            if state["calls"] > after_calls:
                return FullDisk(io.FileIO(fd, "wb"))
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    return state


def _refuse_new_files_in(monkeypatch, folder: Path) -> None:
    """Creating a file in ``folder`` fails with EACCES, as in a read-only folder."""
    real = tempfile.TemporaryFile

    def temporary_file(*args, **kwargs):
        if Path(kwargs.get("dir") or "").resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)


@pytest.fixture
def fill_disk(monkeypatch):
    """``fill_disk(name, after_calls=0, budget=100)``: simulate a disk that fills while ``name`` is written (root
    and a shared machine leave no real small disk to fill)."""
    return lambda name, after_calls=0, budget=100: _fill_disk_when_writing(monkeypatch, name, after_calls, budget)


@pytest.fixture
def refuse_new_files(monkeypatch):
    """``refuse_new_files(folder)``: creating a file in ``folder`` fails with EACCES (root ignores permission bits,
    so a read-only folder is simulated)."""
    return lambda folder: _refuse_new_files_in(monkeypatch, folder)


@pytest.fixture
def hold_output_dir():
    """``hold_output_dir(path)`` -> a child process holding run folder ``path`` as a running run does (killed at
    teardown at the latest)."""
    import subprocess
    import sys

    children = []

    def hold(path: Path) -> subprocess.Popen:
        path.mkdir(parents=True, exist_ok=True)
        code = ("import sys, time; from pathlib import Path; from projector_kd.runs import lock_output_dir; "
                "lock_output_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)")
        child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        children.append(child)
        assert child.stdout.readline() == "held\n"
        return child

    yield hold
    for child in children:
        child.kill()
        child.wait()
