"""Step checks without host reads: the guard itself, fused optimizers skipping on found_inf, the step monitor."""

from __future__ import annotations

import pytest
import torch

from projector_kd.engine.steps import StepMonitor, non_finite_flag, skips_on_device, step_unless


def test_guard_catches_every_kind_of_host_read(no_host_reads):
    loss = torch.tensor(1.5)
    reads = [
        lambda: loss.item(),
        lambda: loss.tolist(),
        lambda: loss.numpy(),
        lambda: loss.cpu(),
        lambda: bool(torch.isfinite(loss)),
        lambda: float(loss),
        lambda: int(loss),
        lambda: f"{loss:.3f}",
        lambda: [0, 1][torch.tensor(1)],
    ]
    with no_host_reads():
        for read in reads:
            with pytest.raises(AssertionError, match="read a"):
                read()
        kept = loss * 2  # device work is fine
    assert kept.item() == 3.0  # and the guard is gone afterwards


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    ],
    ids=["adamw", "sgd"],
)
def test_fused_optimizer_skips_the_whole_update_when_found_inf(make):
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = make([weight])
    assert skips_on_device(optimizer)
    weight.grad = torch.tensor([0.5, 0.25])
    step_unless(optimizer, non_finite_flag(torch.tensor([1.0, 2.0])))  # finite: applied
    after_good = weight.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[weight].items()}
    assert not torch.equal(after_good, torch.tensor([1.0, -2.0]))
    weight.grad = torch.tensor([float("nan"), 1.0])
    step_unless(optimizer, non_finite_flag(torch.tensor([1.0, float("inf")])))  # bad: nothing moves
    assert torch.equal(weight.detach(), after_good)
    for key, value in optimizer.state[weight].items():  # moments, momentum buffer and the step counter
        assert torch.equal(value, state[key]), key
    assert not hasattr(optimizer, "found_inf")
    assert not skips_on_device(torch.optim.AdamW([weight]))


def test_monitor_hands_back_each_step_in_order_with_its_flag():
    monitor = StepMonitor(torch.device("cpu"))
    assert monitor.pop() is None
    monitor.push(7, ["ce", "kd"], torch.tensor([1.0, 2.0]), non_finite_flag(torch.tensor(1.0)), False)
    first = monitor.pop()
    assert (first.step, first.terms, first.bad, first.stop) == (7, {"ce": 1.0, "kd": 2.0}, False, False)
    monitor.push(8, ["ce", "kd"], torch.tensor([1.0, float("nan")]), non_finite_flag(torch.tensor(float("nan"))), True)
    monitor.push(9, ["ce", "kd"], torch.tensor([3.0, 4.0]), torch.zeros(1), False)
    with pytest.raises(RuntimeError, match="pop"):
        monitor.push(10, ["ce", "kd"], torch.tensor([3.0, 4.0]), torch.zeros(1), False)
    records = monitor.drain()
    assert [(r.step, r.bad, r.stop) for r in records] == [(8, True, True), (9, False, False)]
    assert records[1].terms == {"ce": 3.0, "kd": 4.0}


def test_distributed_stop_vote_is_summed_over_ranks(one_rank_group):
    with one_rank_group(torch.device("cpu")):
        monitor = StepMonitor(torch.device("cpu"), distributed=True)
        monitor.push(0, ["ce"], torch.tensor([1.0]), torch.zeros(1), False)
        monitor.push(1, ["ce"], torch.tensor([1.0]), torch.zeros(1), True)
        assert not monitor.stop_agreed(True)  # the vote travels with the records: nothing read yet
        assert [r.stop for r in monitor.drain()] == [False, True]
        assert monitor.stop_agreed(False)  # a rank's vote, read with step 1's record, stops every rank


def test_alone_the_stop_is_this_steps_request():
    monitor = StepMonitor(torch.device("cpu"))
    monitor.push(0, ["ce"], torch.tensor([1.0]), torch.zeros(1), True)
    assert monitor.stop_agreed(True) and not monitor.stop_agreed(False)
