"""GracefulStop turns SIGTERM/SIGINT into a flag; a plain run is world size 1; bad torchrun env vars are named."""

import os
import signal

import pytest
import torch

from projector_kd.engine.distributed import all_reduce_sum, init_distributed, is_main_process
from projector_kd.engine.errors import UserError
from projector_kd.engine.signals import GracefulStop, stop_cause


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_flag_and_handlers_are_restored(signum):
    before = signal.getsignal(signum)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.signal_name == signal.Signals(signum).name
    assert signal.getsignal(signum) == before
    assert stop_cause(stop, distributed=True) == signal.Signals(signum).name


def test_a_stop_without_a_signal_here_names_another_process_or_the_calling_code():
    with GracefulStop() as stop:
        stop.requested = True  # as the ranks' vote or a caller's stop object sets it
        assert stop_cause(stop, distributed=True) == "a signal to another process of the run"
        assert stop_cause(stop, distributed=False) == "request"


def test_plain_run_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.distributed, env.is_main) == (0, 1, False, True)
    assert env.device == torch.device("cpu") and is_main_process()
    assert torch.equal(all_reduce_sum(torch.tensor([2.0])), torch.tensor([2.0]))


def test_bad_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not an integer"):
        init_distributed("cpu")


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda requested but CUDA is not available"):
        init_distributed("cuda")


class _NeverDone:
    """An asynchronous collective whose other processes never arrive."""

    def is_completed(self) -> bool:
        return False

    def wait(self) -> None:
        raise AssertionError("a collective that never completes must not be waited on")


def test_a_collective_that_never_completes_ends_in_one_line_after_the_timeout(monkeypatch):
    from projector_kd.engine import distributed

    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "0.2")
    with pytest.raises(UserError, match=r"^rank 0 waited 0 s for the other processes \(the stop vote\) — one of them"):
        distributed.wait_for(_NeverDone(), "the stop vote")
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "soon")
    with pytest.raises(UserError, match="PROJECTOR_KD_COLLECTIVE_TIMEOUT_S='soon' is not a positive number"):
        distributed.collective_timeout()


def test_a_stop_signal_while_waiting_for_absent_processes_ends_the_wait(monkeypatch):
    import signal

    from projector_kd.engine import distributed
    from projector_kd.engine.signals import GracefulStop

    monkeypatch.setattr(distributed, "STOP_GRACE_S", 0.1)  # the others get 10 s to follow a stop in a real run
    with GracefulStop() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
        with pytest.raises(UserError, match=r"^stopped by SIGTERM while rank 0 waited .* \(a checkpoint barrier\)"):
            distributed.wait_for(_NeverDone(), "a checkpoint barrier")
