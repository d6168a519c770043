"""run_cli: a user error, or a loader worker's failure reported outside any loop, is one line and exit status 2;
anything else keeps its traceback."""

import pytest

from projector_kd.errors import UserError, run_cli


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


def test_other_errors_keep_their_traceback_and_a_status_is_passed_on(capsys):
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        run_cli(_raise(RuntimeError("CUDA error: out of memory")), [])
    assert _run(lambda argv: 3, capsys)[0] == 3
    assert _run(lambda argv: None, capsys)[0] == 0
