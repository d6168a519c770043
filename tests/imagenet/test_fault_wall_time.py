"""wall_time_s counts the time of every process that trained the run, across stops and resumes."""

from __future__ import annotations

import json
import signal
import time

from imagenet import registry
from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.signals import EXIT_STATUS_STOPPED


def test_wall_time_adds_up_across_a_resume(make_recipe, teacher_ckpt, cli, tmp_path, monkeypatch):
    recipe = make_recipe("run", teacher_ckpt=teacher_ckpt, epochs=2)
    real_kd_loss = registry.kd_loss
    calls = []

    def slow_then_stopped(student_logits, teacher_logits, temperature=1.0):
        calls.append(1)
        if len(calls) == 2:  # epoch 0, step 2: 1.5 s of work, then the scheduler's SIGTERM
            time.sleep(1.5)
            signal.raise_signal(signal.SIGTERM)
        return real_kd_loss(student_logits, teacher_logits, temperature)

    monkeypatch.setattr(registry, "kd_loss", slow_then_stopped)
    status, _, err = cli("--config", recipe, "--seed", "0")
    assert status == EXIT_STATUS_STOPPED, err
    stopped = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert stopped["global_step"] == 2 and stopped["wall_time_s"] >= 1.5

    monkeypatch.setattr(registry, "kd_loss", real_kd_loss)
    started = time.perf_counter()
    status, _, err = cli("--config", recipe, "--seed", "0")
    second = time.perf_counter() - started
    assert status == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stopped["wall_time_s"] < metrics["wall_time_s"] <= stopped["wall_time_s"] + second
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pth")["wall_time_s"] > stopped["wall_time_s"]
