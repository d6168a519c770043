"""Loading a state dict exactly: one line naming the file, missing / unexpected keys and shape mismatches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from projector_kd.engine.checkpoint import CheckpointError, load_state_exactly, state_mismatch


def _net(width: int = 4, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(2, width), nn.BatchNorm1d(width), nn.Linear(width, classes))


def test_matching_state_loads_every_tensor():
    source, target = _net(), _net()
    load_state_exactly(target, source.state_dict(), "net.pth", "the student")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert state_mismatch(source.state_dict(), target.state_dict()) == ""


def test_shape_mismatches_are_named_in_model_order_with_both_shapes():
    with pytest.raises(CheckpointError) as error:
        load_state_exactly(_net(classes=3), _net(classes=5).state_dict(), "net.pth", "the student", hint="fix it")
    assert str(error.value) == (
        "checkpoint net.pth does not match the student (Sequential): shape mismatch: 2.weight (5, 4) vs model (3, 4), "
        "2.bias (5,) vs model (3,) — fix it"
    )


def test_missing_and_unexpected_keys_name_a_few_then_count_the_rest():
    state = _net().state_dict()
    renamed = {f"module.{k}": v for k, v in state.items()}  # 9 entries
    problem = state_mismatch(state, renamed)
    assert problem == (
        "missing: 0.weight, 0.bias, 1.weight (+6 more); unexpected: module.0.weight, module.0.bias, module.1.weight "
        "(+6 more)"
    )
    with pytest.raises(CheckpointError, match=r"^checkpoint x.pth does not match the student \(Sequential\): missing"):
        load_state_exactly(_net(), renamed, "x.pth", "the student")


def test_a_file_without_a_state_dict_is_named():
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"checkpoint x.pth holds no state dict for the student"):
        load_state_exactly(model, [1, 2], "x.pth", "the student")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
