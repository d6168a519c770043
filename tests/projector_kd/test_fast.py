"""torch.compile with an eager fallback: one line per run, user errors kept, the eager module's state dict keys."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from projector_kd.engine.errors import UserError
from projector_kd.engine.fast import CompiledOrEager, CompileFallbackNotice, autocast_context


def _compile_failing_when_wrapping(module):
    raise RuntimeError("Compiler: cc not found\nlong details")


def _compile_failing_at_call(error):
    def compile_(module):
        def compiled(*args, **kwargs):
            raise error

        return compiled

    return compile_


def _warnings(caplog):
    return [
        r.getMessage() for r in caplog.records if r.name == "projector_kd.engine.fast" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize("when", ["wrapping", "first-call"])
def test_compile_failure_runs_eagerly_with_one_line_for_all_modules(monkeypatch, caplog, when):
    broken = (
        _compile_failing_when_wrapping
        if when == "wrapping"
        else _compile_failing_at_call(RuntimeError("Compiler: cc not found\nlong details"))
    )
    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    first, second = nn.Linear(3, 2), nn.Linear(2, 4)
    notice = CompileFallbackNotice()
    x = torch.randn(5, 3)
    with caplog.at_level(logging.DEBUG, logger="projector_kd.engine.fast"):
        wrapped = [CompiledOrEager(first, "student", notice), CompiledOrEager(second, "teacher", notice)]
        for _ in range(2):
            out = wrapped[1](wrapped[0](x))
            torch.testing.assert_close(out, second(first(x)), rtol=0, atol=0)
    assert all(module.compiled is None for module in wrapped)
    assert _warnings(caplog) == [
        "fast path: torch.compile is unavailable here (RuntimeError: Compiler: cc not found); running the networks "
        "eagerly — the rest of the fast path stays on"
    ]


def test_a_recompile_failure_after_the_first_call_falls_back(monkeypatch, caplog):
    calls = []

    def compile_(module):
        def compiled(x):
            calls.append(x.shape[0])
            if len(calls) > 1:  # e.g. a smaller last batch: a new shape, a new compilation
                raise torch._dynamo.exc.BackendCompilerFailed(compile_, RuntimeError("no triton"), None)
            return module(x)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_)
    layer = nn.Linear(3, 2)
    wrapped = CompiledOrEager(layer, "student")
    with caplog.at_level(logging.WARNING, logger="projector_kd.engine.fast"):
        for batch in (4, 3, 2):
            x = torch.randn(batch, 3)
            torch.testing.assert_close(wrapped(x), layer(x), rtol=0, atol=0)
    assert calls == [4, 3] and wrapped.compiled is None and len(_warnings(caplog)) == 1


def test_user_errors_and_later_runtime_errors_are_not_swallowed(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", _compile_failing_at_call(UserError("non-finite input batch")))
    wrapped = CompiledOrEager(nn.Linear(3, 2), "student")
    with pytest.raises(UserError, match="non-finite input batch"):
        wrapped(torch.randn(2, 3))
    assert wrapped.compiled is not None and not _warnings(caplog)

    monkeypatch.setattr(torch, "compile", lambda module: module)
    wrapped = CompiledOrEager(nn.Linear(3, 2), "student")
    wrapped(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        wrapped(torch.randn(2, 5))  # a real error after compilation worked: raised, not hidden by a fallback
    assert wrapped.compiled is not None and not _warnings(caplog)


def test_state_dict_keys_are_the_eager_modules_under_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", _compile_failing_when_wrapping)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    holder = nn.Module()
    holder.model = CompiledOrEager(net, "student")
    assert list(holder.state_dict()) == [f"model.eager.{key}" for key in net.state_dict()]


def test_autocast_context_is_autocast_or_nothing():
    with autocast_context("cpu", None):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast_context("cpu", torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
