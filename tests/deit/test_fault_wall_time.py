"""wall_time_s counts the time of every process that trained the run, across stops and resumes."""

from __future__ import annotations

import json
import time

import torch

from deit.main import main
from projector_kd.engine.signals import EXIT_STATUS_STOPPED


class SlowStop:
    """Stand-in for GracefulStop: the ``polls``-th poll (one per step) takes 1.5 s, then asks to stop."""

    signal_name = "test stop"

    def __init__(self, polls: int) -> None:
        self.polls = polls

    @property
    def requested(self) -> bool:
        self.polls -= 1
        if self.polls == 0:
            time.sleep(1.5)
        return self.polls <= 0


def test_wall_time_adds_up_across_a_mid_epoch_resume(tmp_path, train_argv):
    output = tmp_path / "run"
    assert main(train_argv(output, "--epochs", "1"), stop=SlowStop(3)) == EXIT_STATUS_STOPPED
    stopped = torch.load(output / "checkpoint.pth", weights_only=True)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (0, 3) and stopped["wall_time_s"] >= 1.5

    started = time.perf_counter()
    assert main(train_argv(output, "--epochs", "1")) == 0
    second = time.perf_counter() - started
    metrics = json.loads((output / "metrics.json").read_text())
    assert stopped["wall_time_s"] < metrics["wall_time_s"] <= stopped["wall_time_s"] + second
