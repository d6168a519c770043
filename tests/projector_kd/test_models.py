"""Parameter counts shared by both tracks."""

from __future__ import annotations

from torch import nn

from projector_kd import ProjectorDistillLoss
from projector_kd.engine.models import count_parameters


def test_counts_split_the_projector_from_the_student():
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))  # 15 + 6 parameters
    projector = ProjectorDistillLoss(3, 5)  # Linear(3, 5): 20 parameters; the whitening has none
    assert count_parameters(nn.ModuleList([student, projector])) == {"student": 21, "projector": 20, "total": 41}


def test_a_network_without_a_projector_counts_zero_projector_parameters():
    assert count_parameters(nn.Conv2d(3, 8, 3, bias=False)) == {"student": 216, "projector": 0, "total": 216}


def test_shared_parameters_count_once():
    linear = nn.Linear(2, 2)
    assert count_parameters(nn.Sequential(linear, linear))["total"] == 6
