"""run_cli: a user error, or a loader worker's failure reported outside any loop, is one line and exit status 2;
anything else keeps its traceback. out_of_memory: PyTorch's GPU out-of-memory error as one line."""

import pytest
import torch

from projector_kd.engine.cli import run_cli
from projector_kd.engine.errors import UserError, out_of_memory


def _run(main, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        run_cli(main, [])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def _raise(error: BaseException):
    def main(argv):
        raise error

    return main


def test_a_user_error_is_one_line_and_status_2(capsys):
    assert _run(_raise(UserError("dataset folder /data does not exist")), capsys) == (
        2,
        "",
        "error: dataset folder /data does not exist\n",
    )


def test_a_worker_failure_reported_outside_the_loops_is_one_line(capsys):
    """PyTorch's SIGCHLD handler can raise it anywhere, e.g. while a checkpoint is written between epochs."""
    status, _, err = _run(_raise(RuntimeError("DataLoader worker (pid 5) is killed by signal: Killed. ")), capsys)
    assert status == 2
    assert err == (
        "error: a data-loader worker (pid 5) was killed by signal: Killed while running — most often the system ran "
        "out of memory and killed it: lower the number of loader workers (num_workers) or the batch size, or free "
        "memory, then run the same command again\n"
    )


def test_out_of_gpu_memory_that_no_entry_point_named_is_one_line(capsys):
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has 1 GiB free.")
    assert _run(_raise(error), capsys)[::2] == (
        2,
        "error: out of GPU memory (an allocation of 8.00 GiB failed) — lower the batch size\n",
    )


def test_other_errors_keep_their_traceback_and_a_status_is_passed_on(capsys):
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        run_cli(_raise(RuntimeError("CUDA error: out of memory")), [])
    assert _run(lambda argv: 3, capsys)[0] == 3
    assert _run(lambda argv: None, capsys)[0] == 0


def test_out_of_memory_names_the_failed_allocation_and_the_hint():
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has 3 MiB free.")
    assert str(out_of_memory(error, "lower the batch size")) == (
        "out of GPU memory (an allocation of 20.00 MiB failed) — lower the batch size"
    )
    assert str(out_of_memory(torch.cuda.OutOfMemoryError("out of memory"), "x")) == "out of GPU memory — x"
    assert out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"), "x") is None  # not the OOM type


def test_a_failed_collective_that_no_peer_explains_is_one_line(capsys):
    import torch.distributed

    def lose_the_peers(argv):
        raise torch.distributed.DistBackendError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore details")

    with pytest.raises(SystemExit) as stopped:
        run_cli(lose_the_peers, [])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "error: this process lost the other processes of the run ([gloo] Connection closed by peer [127.0.0.1]:1234) "
        "— one of them stopped or hangs: check every process's output, then rerun the same command to continue from "
        "the last checkpoint\n"
    )
