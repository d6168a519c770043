"""The fast path (--fast) on the CPU: bf16 autocast, channels_last and the fused SGD train a real run; where
torch.compile is unavailable — at wrapping time or at the first call — one clear message is logged and the run goes
on eagerly. Its checkpoints are plain: the reference path evaluates them to the same accuracy."""
from __future__ import annotations

import json

import pytest
import torch

from projector_kd.checkpoint import load_checkpoint


def _compile_fails_when_wrapping(module, *args, **kwargs):
    raise RuntimeError("Compiler: cc not found")


def _compile_fails_at_first_call(module, *args, **kwargs):
    def compiled(*call_args, **call_kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(_compile_fails_at_first_call,
                                                      RuntimeError("Compiler: cc not found"), None)
    return compiled


@pytest.mark.parametrize("broken_compile, error_type", [(_compile_fails_when_wrapping, "RuntimeError"),
                                                       (_compile_fails_at_first_call, "BackendCompilerFailed")],
                         ids=["fails-when-wrapping", "fails-at-first-call"])
def test_fast_path_trains_on_cpu_and_falls_back_once(make_recipe, teacher_ckpt, cli, tmp_path, monkeypatch, caplog,
                                                     broken_compile, error_type):
    monkeypatch.setattr(torch, "compile", broken_compile)
    recipe = make_recipe("fast", teacher_ckpt=teacher_ckpt, epochs=1)
    status, out, err = cli("--config", recipe, "--seed", "0", "--fast")
    assert status == 0, err
    notices = [r for r in caplog.records if "torch.compile is unavailable" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelname == "WARNING"
    message = notices[0].getMessage()
    assert message.startswith(f"fast path: torch.compile is unavailable here ({error_type}: ")
    assert message.endswith("); running the networks eagerly — bf16, channels_last and the fused optimizer stay on")
    assert "fast path: FastSettings(autocast_dtype=torch.bfloat16, channels_last=True" in out
    metrics = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert metrics["fast"] is True
    state = load_checkpoint(tmp_path / "fast" / "checkpoint.pth")
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])
    assert state["global_step"] == 3 and torch.isfinite(state["projector"]["embed.weight"]).all()

    # the checkpoint is the plain student: the reference path evaluates it to the same numbers
    status, _, err = cli("--config", recipe, "-test_only", "-student_only", "--output_dir", tmp_path / "fast")
    assert status == 0, err
    tested = json.loads((tmp_path / "fast" / "test_only" / "metrics.json").read_text())
    assert (tested["top1"], tested["top5"]) == (metrics["top1"], metrics["top5"])
