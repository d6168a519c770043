"""Fixtures for the whole suite."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_TWO_RANKS = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
pytest_plugins = ("tracks",)
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: deterministic and fast when other processes share the two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class HostRead(AssertionError):
    """A tensor's value was read to the host inside a :func:`no_host_reads` region."""


@contextlib.contextmanager
def _no_host_reads(allowed: Callable[[torch.Tensor], bool] = lambda tensor: False) -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guarded(name: str, original: Callable) -> Callable:
        def read(self, *args, **kwargs):
            if allowed(self):
                return original(self, *args, **kwargs)
            raise HostRead(f"Tensor.{name} read a {tuple(self.shape)} {self.dtype} tensor to the host")

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture
def no_host_reads() -> Callable:
    """``with no_host_reads(allowed):`` makes every read of a tensor's value to the host (what costs a GPU
    synchronisation: ``item``, ``tolist``, ``numpy``, ``cpu``, ``bool()``, ``float()``, ``int()``, ``index()``) raise
    :class:`HostRead`, except on tensors ``allowed(tensor)`` accepts — the host buffers a step monitor reads on purpose
    (``allowed = lambda t: any(t is b for b in monitor.host_buffers)``). Reads inside kernels (boolean masks,
    ``nonzero``) are invisible here: the GPU tests run the steps under ``torch.cuda.set_sync_debug_mode("error")``."""
    return _no_host_reads


@pytest.fixture
def gpu_device() -> torch.device:
    """The CUDA device for tests marked ``gpu``; they skip where CUDA is absent. ``PROJECTOR_KD_GPU_TESTS_ON_CPU=1``
    runs their bodies on the CPU instead (a dry run of the mechanics, without the CUDA-only assertions)."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if os.environ.get("PROJECTOR_KD_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU (none is visible here)")


@pytest.fixture
def sync_debug_errors() -> Callable:
    """``with sync_debug_errors(device):`` makes any CUDA call that synchronises the host raise (no-op on the CPU)."""

    @contextlib.contextmanager
    def errors(device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    return errors


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


class ImageBrokenOnRead:
    """The ``nth`` image read through ``projector_kd.engine.data.load_rgb`` turns into ``garbage`` just before it is
    read, as a file damaged in the middle of an epoch; :meth:`repair` puts its bytes and the loader back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, nth: int, garbage: bytes) -> None:
        from projector_kd.engine import data

        self.path: str | None = None
        self._original = b""
        self._monkeypatch, self._module, self._real = monkeypatch, data, data.load_rgb
        reads = 0

        def load_rgb(path):
            nonlocal reads
            reads += 1
            if reads == nth:
                self.path, self._original = path, Path(path).read_bytes()
                Path(path).write_bytes(garbage)
            return self._real(path)

        monkeypatch.setattr(data, "load_rgb", load_rgb)

    def repair(self) -> None:
        self._monkeypatch.setattr(self._module, "load_rgb", self._real)
        Path(self.path).write_bytes(self._original)


@pytest.fixture
def break_image_on_read(monkeypatch) -> Callable[[int, bytes], ImageBrokenOnRead]:
    """``break_image_on_read(nth, garbage)`` -> :class:`ImageBrokenOnRead` (``.path`` names the file once read)."""
    return lambda nth, garbage: ImageBrokenOnRead(monkeypatch, nth, garbage)


@pytest.fixture
def hold_output_dir():
    """``hold_output_dir(path)`` -> a child process holding run folder ``path`` as a running run does (killed at
    teardown at the latest)."""
    children = []

    def hold(path: Path) -> subprocess.Popen:
        path.mkdir(parents=True, exist_ok=True)
        code = (
            "import sys, time; from pathlib import Path; from projector_kd.engine.runs import lock_output_dir; "
            "lock_output_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(300)"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        children.append(child)
        assert child.stdout.readline() == "held\n"
        return child

    yield hold
    for child in children:
        child.kill()
        child.wait()


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or a process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_rank_group(free_port: int) -> Callable:
    """``with one_rank_group(device):`` this process alone forms a process group (NCCL on a CUDA ``device``, gloo
    otherwise), destroyed on exit."""

    @contextlib.contextmanager
    def group(device: torch.device) -> Iterator[None]:
        cuda = device.type == "cuda"
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{free_port}",
            rank=0,
            world_size=1,
            device_id=device if cuda else None,
        )
        try:
            yield
        finally:
            dist.destroy_process_group()

    return group


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """Environment for child processes: one thread each (2 shared cores), unbuffered output, no rank variables or
    tiny-data root inherited from the caller."""
    inherited = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TINY_DATA_ROOT")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def run_python(child_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """``run_python(*args, cwd=REPO, env=child_env, timeout=240)``: this interpreter with ``args`` in a child process;
    returns the completed process, output as text."""

    def run(
        *args: str | Path, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *map(str, args)],
            cwd=cwd,
            env=child_env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def run_torchrun(run_python: Callable[..., subprocess.CompletedProcess]) -> Callable[..., subprocess.CompletedProcess]:
    """``run_torchrun(script, *args, **options)``: :func:`run_python` of ``script`` under torchrun, two ranks on this
    machine (``--standalone``)."""
    return lambda *args, **options: run_python(*TORCHRUN_TWO_RANKS, *args, **options)


def sigterm_before_step(engine: Any, epoch: int, step: int, only_rank: int | None = None) -> Callable:
    """A stand-in for ``engine.progress`` (the training loop's progress bar) that sends SIGTERM to this process just
    before training step ``step`` (1-based) of ``epoch`` starts — on the torchrun rank ``only_rank`` alone when given —
    as a scheduler's stop would arrive."""
    real = engine.progress

    def progress(iterable, **kwargs):
        if kwargs.get("desc") != f"epoch {epoch}" or only_rank not in (None, int(os.environ.get("RANK", 0))):
            return real(iterable, **kwargs)

        def batches():
            for index, batch in enumerate(iterable, start=1):
                if index == step:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        return batches()

    return progress


@pytest.fixture(scope="session")
def sigterm_progress() -> Callable[..., Callable]:
    """:func:`sigterm_before_step`."""
    return sigterm_before_step


@pytest.fixture
def sigterm_before(sigterm_progress) -> Callable[[pytest.MonkeyPatch, int, int], None]:
    """``sigterm_before(monkeypatch, epoch, step)``: an in-process run receives SIGTERM just before training step
    ``step`` (1-based) of ``epoch`` starts, as a scheduler's stop would arrive."""
    from projector_kd.engine import loop

    return lambda monkeypatch, epoch, step: monkeypatch.setattr(loop, "progress", sigterm_progress(loop, epoch, step))


_SIGTERM_ON_ONE_RANK = """
import importlib, importlib.util, sys
from projector_kd.engine.cli import run_cli

spec = importlib.util.spec_from_file_location("suite_helpers", {helpers!r})
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
engine = importlib.import_module({engine!r})
rank, epoch, step = (int(value) for value in sys.argv[1:4])
engine.progress = helpers.sigterm_before_step(engine, epoch, step, only_rank=rank)
run_cli(importlib.import_module({entry!r}).main, sys.argv[4:])
"""


@pytest.fixture
def sigterm_on_one_rank(tmp_path: Path) -> Callable[[str, str], Path]:
    """``sigterm_on_one_rank(engine, entry)`` -> a script to run under torchrun in place of the entry point:
    ``script RANK EPOCH STEP ARGS...`` runs module ``entry``'s ``main(ARGS)`` with :func:`sigterm_before_step` on
    module ``engine`` for rank RANK alone, as a scheduler's stop that reaches one process first would."""

    def write(engine: str, entry: str) -> Path:
        script = tmp_path / "sigterm_on_one_rank.py"
        script.write_text(_SIGTERM_ON_ONE_RANK.format(helpers=__file__, engine=engine, entry=entry))
        return script

    return write


@pytest.fixture
def start_python(child_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen]]:
    """``start_python(*args, cwd=REPO, stdout=PIPE, stderr=PIPE)``: this interpreter with ``args`` started in a child
    process (environment ``child_env``, text output); killed at teardown if it still runs."""
    children = []

    def start(
        *args: str | Path, cwd: Path = REPO, stdout: int = subprocess.PIPE, stderr: int = subprocess.PIPE
    ) -> subprocess.Popen:
        child = subprocess.Popen(
            [sys.executable, *map(str, args)], cwd=cwd, env=child_env, stdout=stdout, stderr=stderr, text=True
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.communicate()


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``condition`` until it holds; fails if ``process`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"child exited early with {process.returncode}: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for the child"
        time.sleep(0.01)


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., None]:
    """:func:`wait_until`."""
    return wait_until


@pytest.fixture
def run_main(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """``run_main(main, argv)``: an entry point's ``main`` in this process through ``run_cli``, exactly as its script
    runs it -> ``CompletedProcess(argv, exit status, stdout, stderr)``."""
    from projector_kd.engine.cli import run_cli

    def run(main: Callable, argv) -> subprocess.CompletedProcess:
        argv = [str(arg) for arg in argv]
        capsys.readouterr()
        try:
            run_cli(main, argv)
        except SystemExit as exit_:
            status = int(exit_.code or 0)
        else:
            status = 0
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, status, out, err)

    return run


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user-facing failure prints (``error: ...``, exit status 2); asserts it is the only one."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="session")
def one_error_line() -> Callable[[subprocess.CompletedProcess], str]:
    """:func:`error_line`."""
    return error_line


def release_model_state(student: torch.nn.Module, projector: torch.nn.Module | None = None) -> dict:
    """A DeiT student's ``model`` state as the release saved it: the student's keys, then the projector's (a
    ProjectorDistillLoss) under ``distillation_loss.``."""
    state = dict(student.state_dict())
    if projector is not None:
        state.update({f"distillation_loss.{k}": v for k, v in projector.state_dict().items()})
    return state


@pytest.fixture(scope="session")
def release_state() -> Callable[..., dict]:
    """:func:`release_model_state`."""
    return release_model_state
