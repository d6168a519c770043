"""The fast path (--fast) on the CPU: bf16 autocast, channels_last and the fused SGD train a real run; where
torch.compile is unavailable — at wrapping time or at the first call — one clear message is logged and the run goes
on eagerly. Its checkpoints are plain: the reference path evaluates them to the same accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from projector_kd.engine.checkpoint import load_checkpoint
from projector_kd.engine.errors import NonFiniteLossError


def _compile_fails_when_wrapping(module, *args, **kwargs):
    raise RuntimeError("Compiler: cc not found")


def _compile_fails_at_first_call(module, *args, **kwargs):
    def compiled(*call_args, **call_kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(
            _compile_fails_at_first_call, RuntimeError("Compiler: cc not found"), None
        )

    return compiled


@pytest.mark.parametrize(
    "broken_compile, error_type",
    [(_compile_fails_when_wrapping, "RuntimeError"), (_compile_fails_at_first_call, "BackendCompilerFailed")],
    ids=["fails-when-wrapping", "fails-at-first-call"],
)
def test_fast_path_trains_on_cpu_and_falls_back_once(
    make_recipe, teacher_ckpt, cli, tmp_path, monkeypatch, caplog, broken_compile, error_type
):
    monkeypatch.setattr(torch, "compile", broken_compile)
    recipe = make_recipe("fast", teacher_ckpt=teacher_ckpt, epochs=1)
    status, out, err = cli("--config", recipe, "--seed", "0", "--fast")
    assert status == 0, err
    notices = [r for r in caplog.records if "torch.compile is unavailable" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelname == "WARNING"
    message = notices[0].getMessage()
    assert message.startswith(f"fast path: torch.compile is unavailable here ({error_type}: ")
    assert message.endswith("); running the networks eagerly — the rest of the fast path stays on")
    assert "fast path: FastSettings(autocast_dtype=torch.bfloat16, channels_last=True" in out
    assert f"ResNet track: recipe {recipe}, 1 process, fast path on, device cpu" in out
    metrics = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert metrics["fast"] is True
    state = load_checkpoint(tmp_path / "fast" / "checkpoint.pth")
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])
    assert state["global_step"] == 3 and torch.isfinite(state["projector"]["embed.weight"]).all()

    # the checkpoint is the plain student: the reference path evaluates it to the same numbers
    status, _, err = cli("--config", recipe, "-test_only", "-student_only", "--output", tmp_path / "fast")
    assert status == 0, err
    tested = json.loads((tmp_path / "fast" / "test_only" / "metrics.json").read_text())
    assert (tested["top1"], tested["top5"]) == (metrics["top1"], metrics["top5"])


def _fast_box_step(tmp_path, engine_loop):
    """The engine's real step on a fast-path ProjectorKD box (ResNet18 <- ResNet34, 32 px, compile off), on the CPU."""
    from torchdistill.core.distillation import get_distillation_box

    from imagenet.benchmark import _networks, projector_box_config
    from imagenet.fast import apply_fast_path

    device = torch.device("cpu")
    teacher, student, t_dim, s_dim = _networks("resnet34", "resnet18", 10, device, seed=0)
    box = get_distillation_box(teacher, student, {}, projector_box_config(t_dim, s_dim), device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    settings = apply_fast_path(box, teacher, device, compile_models=False)
    loop = engine_loop(box, teacher, device, tmp_path, settings.autocast_dtype)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    return lambda: loop.train_step((images, labels, None)), loop, box


def test_fast_step_reads_no_device_value(tmp_path, engine_loop, no_host_reads):
    step, loop, box = _fast_box_step(tmp_path, engine_loop)
    assert box.optimizer.param_groups[0]["fused"] and loop.track.skips_on_device
    with no_host_reads(lambda t: any(t is b for b in loop.monitor.host_buffers)):
        for _ in range(3):
            step()
    assert loop.position.global_step == 3 and len(loop.monitor.pending) == 1  # step 3 still in flight
    assert loop.last_record.terms["loss"] > 0 and not loop._stop_asked


def test_fast_step_skips_a_non_finite_update_on_the_device_and_stops_at_the_next_step(
    tmp_path, monkeypatch, engine_loop
):
    from imagenet import registry
    from imagenet.box import student_of, unwrap

    step, loop, box = _fast_box_step(tmp_path, engine_loop)
    step()
    real_kd_loss, calls = registry.kd_loss, []

    def kd_loss(*args, **kwargs):
        calls.append(1)
        value = real_kd_loss(*args, **kwargs)
        return value * float("nan") if len(calls) == 1 else value

    monkeypatch.setattr(registry, "kd_loss", kd_loss)
    student = unwrap(student_of(box))
    weights = {k: v.detach().clone() for k, v in student.state_dict().items() if v.is_floating_point()}
    momentum = [box.optimizer.state[p]["momentum_buffer"].clone() for p in student.parameters()]
    step()  # global step 2 is bad: skipped on the device, reported at the next step
    assert all(torch.equal(weights[k], v) for k, v in student.named_parameters())
    message = (
        r"^non-finite loss at epoch 0 step 2/10 \(global step 2\): term\(s\) projector_kd, projector_kd.kd went "
        r"non-finite \[ce = [0-9.]+; projector_kd = nan "
    )
    with pytest.raises(NonFiniteLossError, match=message):
        step()
    assert all(torch.equal(weights[k], v) for k, v in student.named_parameters())  # nor the next one applied
    buffers = [box.optimizer.state[p]["momentum_buffer"] for p in student.parameters()]
    assert all(torch.equal(before, after) for before, after in zip(momentum, buffers))


def test_fast_path_under_torchrun_lays_out_ddp_buckets_for_channels_last(
    make_recipe, teacher_ckpt, child_env, run_entry_on_two_ranks
):
    """Two gloo ranks on the fast path (compile off): the networks are channels_last before DDP wraps them, so DDP's
    gradient buckets take those strides (PyTorch warns "Grad strides do not match bucket view strides" otherwise: every
    gradient would be copied into its bucket through a strided view), and both ranks train to the end."""
    recipe = make_recipe("ddp_fast", method="projector", teacher_ckpt=teacher_ckpt, epochs=1, batch_size=4)
    result = run_entry_on_two_ranks(
        "--config", recipe, "--seed", "0", "--fast", env={**child_env, "TORCHDYNAMO_DISABLE": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast path: FastSettings(" in result.stdout + result.stderr
    assert "bucket view strides" not in result.stderr
    state = load_checkpoint(recipe.parent / "ddp_fast" / "checkpoint.pth")
    assert state["global_step"] == 3 and len(state["rng"]) == 2  # 30 images / (2 ranks x 4), drop_last


def test_fast_loader_keeps_the_loader_and_adds_pinning_and_persistent_workers():
    from torch.utils.data import DataLoader, TensorDataset

    from imagenet.fast import _fast_loader
    from projector_kd.engine.sampling import resumable_loader, training_sampler

    data = TensorDataset(torch.arange(10))
    recipe_loader = DataLoader(
        data, batch_size=4, shuffle=True, num_workers=2, timeout=5.0, multiprocessing_context="spawn"
    )
    loader = resumable_loader(recipe_loader, seed=1)
    fast = _fast_loader(loader, pin_memory=True)
    assert fast.batch_sampler is loader.batch_sampler and training_sampler(fast) is training_sampler(loader)
    assert (fast.pin_memory, fast.persistent_workers, fast.num_workers, fast.timeout) == (True, True, 2, 5.0)
    assert (fast.multiprocessing_context, fast.generator) == (loader.multiprocessing_context, loader.generator)
    in_process = _fast_loader(resumable_loader(DataLoader(data, batch_size=4), seed=1), pin_memory=False)
    assert (in_process.persistent_workers, in_process.prefetch_factor) == (False, None)
    assert [batch[0].tolist() for batch in in_process] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _fast_loader(None, pin_memory=True) is None
