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
