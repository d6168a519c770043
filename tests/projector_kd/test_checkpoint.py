"""Atomic writes survive SIGKILL; safe loading refuses unsafe pickles and names broken files; RNG capture is exact."""

import argparse
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from projector_kd.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
)


def test_round_trip_and_no_temporary_left(tmp_path):
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 3}
    atomic_save(state, tmp_path / "ckpt.pth")
    loaded = load_checkpoint(tmp_path / "ckpt.pth")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoint.pth"
    atomic_save({"generation": torch.tensor(0), "blob": torch.zeros(10)}, target)
    writer = textwrap.dedent(f"""
        import torch
        from projector_kd.engine.checkpoint import atomic_save
        big = torch.randn(16_000_000)  # 64 MB: each save takes a while
        print("ready", flush=True)
        generation = 1
        while True:
            atomic_save({{"generation": torch.tensor(generation), "blob": big}}, {str(target)!r})
            generation += 1
    """)
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the kill should have hit a save in progress"
    loaded = load_checkpoint(target)  # the last complete checkpoint, never a partial one
    assert loaded["generation"].item() >= 0
    assert loaded["blob"].numel() in (10, 16_000_000)
    atomic_save({"generation": torch.tensor(-1)}, target)  # the next save clears the killed writer's temporary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_is_refused_by_default_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth needs unsafe unpickling \(it pickles (posix|os)\.system\)"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_trusted_flag_allows_full_unpickling(tmp_path):
    torch.save({"obj": random.Random(3)}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(tmp_path / "obj.pth")
    assert isinstance(load_checkpoint(tmp_path / "obj.pth", trusted=True)["obj"], random.Random)


def test_yacs_config_loads_as_plain_mapping_without_unsafe_unpickling(tmp_path):
    from yacs.config import CfgNode

    config = CfgNode({"MODEL": {"TYPE": "deit", "NAME": "tiny"}, "TRAIN": {"EPOCHS": 300, "BASE_LR": 5e-4}})
    torch.save({"model": {"w": torch.ones(1)}, "config": config, "epoch": 299}, tmp_path / "release.pth")
    loaded = load_checkpoint(tmp_path / "release.pth")
    assert type(loaded["config"]).__module__ == "collections"
    assert loaded["config"]["MODEL"]["NAME"] == "tiny" and loaded["config"]["TRAIN"]["EPOCHS"] == 300


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) // 2], "truncated or corrupt"),
        (lambda data: b"", "empty"),
        (lambda data: b"not a checkpoint at all" * 4, "not a readable PyTorch checkpoint"),
    ],
)
def test_broken_files_give_one_line_naming_the_file(tmp_path, damage, message):
    atomic_save({"model": {"w": torch.randn(1000)}}, tmp_path / "good.pth")
    (tmp_path / "bad.pth").write_bytes(damage((tmp_path / "good.pth").read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path / "bad.pth")
    assert str(tmp_path / "bad.pth") in str(info.value) and "\n" not in str(info.value)


def test_random_bytes_never_escape_as_a_traceback(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.pth"
    for size in [1, 2, 7, 64, 512, 4096] * 20:
        path.write_bytes(rng.bytes(size))
        with pytest.raises(CheckpointError, match="noise.pth"):
            load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_latest_checkpoint_picks_newest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for index, name in enumerate(["checkpoint_0001.pth", "checkpoint_0003.pth", "checkpoint_0002.pth"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**18 + index, 10**18 + index))
    (tmp_path / "best.pth").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "checkpoint_0002.pth"


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


class _Payload:
    """Unpickling this would call ``os.mkdir(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


class _OtherNamespace(argparse.Namespace):
    """Pickles as a class other than ``argparse.Namespace``."""


class _NamespaceWithListState:
    """Pickles as ``argparse.Namespace`` with a state that is not an attribute dict."""

    def __reduce__(self):
        return argparse.Namespace, (), ["not", "a", "dict"]


def test_pickled_argparse_namespace_reads_as_a_plain_dict(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[30, 60, 90], gamma=0.1)
    args = argparse.Namespace(
        config="configs/ilsvrc2012/ours/res3418.yaml",
        device="cuda",
        seed=None,
        test_only=False,
        world_size=4,
        dist_url="env://",
    )
    path = tmp_path / "resnet18_release.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_value": 71.87,
            "lr_scheduler": scheduler.state_dict(),
            "config": {"models": {"student_model": {"name": "resnet18"}}},
            "args": args,
        },
        path,
    )
    loaded = load_checkpoint(path)
    assert loaded["args"] == vars(args) and isinstance(loaded["args"], dict)
    assert loaded["best_value"] == 71.87 and loaded["config"]["models"]["student_model"]["name"] == "resnet18"
    assert dict(loaded["lr_scheduler"]["milestones"]) == {30: 1, 60: 1, 90: 1}
    assert torch.equal(loaded["model"]["weight"], model.weight)


def test_namespace_stand_in_runs_no_code_and_other_globals_stay_refused(tmp_path):
    evidence = tmp_path / "code-ran"
    inside = tmp_path / "inside.pt"
    torch.save({"args": argparse.Namespace(lr=0.1, hook=_Payload(str(evidence)))}, inside)
    with pytest.raises(CheckpointError, match=r"inside.pt needs unsafe unpickling \(it pickles posix.mkdir\)"):
        load_checkpoint(inside)
    subclass = tmp_path / "subclass.pt"
    torch.save({"args": _OtherNamespace(lr=0.1)}, subclass)
    with pytest.raises(
        CheckpointError,
        match=rf"subclass.pt needs unsafe unpickling \(it pickles "
        rf"{_OtherNamespace.__module__}._OtherNamespace\)",
    ):
        load_checkpoint(subclass)
    odd_state = tmp_path / "odd_state.pt"
    torch.save({"args": _NamespaceWithListState()}, odd_state)
    with pytest.raises(CheckpointError, match=r"odd_state.pt is not a readable PyTorch checkpoint"):
        load_checkpoint(odd_state)
    assert not evidence.exists()
