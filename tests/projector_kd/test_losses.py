"""ProjectorDistillLoss and kd_loss against float64 references written from docs/method.md, and torchdistill's
SRDLoss."""

import math

import pytest
import torch
from torch import nn

from projector_kd import DISTANCES, ProjectorDistillLoss, Whitening, kd_loss, pool_features

SHAPES = [((6, 5), (6, 7)), ((6, 9, 5), (6, 4, 7)), ((6, 5, 3, 2), (6, 7, 2, 2))]


def reference_loss(z_s, z_t, weight, bias, distance, alpha, eps):
    """docs/method.md straight from the formulas, in float64 with Python-level sums."""
    z_s, z_t = pool_reference(z_s.double()), pool_reference(z_t.double())
    p = z_s @ weight.double().T + (bias.double() if bias is not None else 0)
    if distance == "mse":
        return ((p - z_t) ** 2).mean()

    def whiten(x):
        mean = x.mean(0)
        var = ((x - mean) ** 2).mean(0)
        out = (x - mean) / torch.sqrt(var + eps)
        return torch.where(var + eps == 0, torch.zeros_like(out), out)

    s, t = whiten(p), whiten(z_t)
    if distance == "bn_mse":
        return ((s - t) ** 2).mean()
    if distance == "log_diff":
        return torch.log(sum(abs(s[b, d] - t[b, d]) ** alpha for b in range(s.shape[0]) for d in range(s.shape[1])))
    corr = [sum(s[b, d] * t[b, d] for b in range(s.shape[0])) / s.shape[0] for d in range(s.shape[1])]
    return torch.log(sum(abs(c - 1) ** alpha for c in corr) + 1e-5)


def pool_reference(x):
    if x.dim() == 4:
        return x.reshape(x.shape[0], x.shape[1], -1).mean(-1)
    if x.dim() == 3:
        return x.mean(1)
    return x


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_distance_matches_float64_reference(distance, shapes, eps):
    torch.manual_seed(0)
    loss = ProjectorDistillLoss(5, 7, distance=distance, eps=eps).double()
    z_s, z_t = torch.randn(*shapes[0], dtype=torch.float64), torch.randn(*shapes[1], dtype=torch.float64) * 3 + 1
    expected = reference_loss(z_s, z_t, loss.embed.weight.detach(), loss.embed.bias.detach(), distance, 4.0, eps)
    assert loss(z_s, z_t).item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.5])
def test_exponent_is_used(alpha):
    torch.manual_seed(1)
    loss = ProjectorDistillLoss(4, 4, distance="log_diff", exponent=alpha).double()
    z_s, z_t = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    expected = reference_loss(z_s, z_t, loss.embed.weight.detach(), loss.embed.bias.detach(), "log_diff", alpha, 1e-4)
    assert loss(z_s, z_t).item() == pytest.approx(expected.item(), rel=1e-10)


def test_float32_loss_close_to_float64():
    torch.manual_seed(2)
    loss = ProjectorDistillLoss(16, 24, distance="log_corr", eps=0.0)
    z_s, z_t = torch.randn(32, 16), torch.randn(32, 24)
    value = loss(z_s, z_t)
    assert value.dtype == torch.float32
    expected = reference_loss(z_s, z_t, loss.embed.weight.detach(), loss.embed.bias.detach(), "log_corr", 4.0, 0.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pool_features_shapes_and_values():
    x4 = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    assert torch.equal(pool_features(x4), x4.mean(dim=(2, 3)))
    x3 = torch.randn(2, 5, 3)
    assert torch.equal(pool_features(x3), x3.mean(1))
    with pytest.raises(ValueError, match="shape"):
        pool_features(torch.randn(2, 3, 4, 5, 6))


@pytest.mark.parametrize("eps", [1e-4, 1e-5])
def test_whitening_equals_batchnorm_in_both_modes(eps):
    torch.manual_seed(3)
    ours, bn = Whitening(6, eps=eps), nn.BatchNorm1d(6, eps=eps, affine=False)
    for _ in range(3):
        x = torch.randn(10, 6) * 2 + 0.5
        torch.testing.assert_close(ours(x), bn(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, bn.running_mean)
    torch.testing.assert_close(ours.running_var, bn.running_var)
    assert ours.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3
    ours.eval(), bn.eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(ours(x), bn(x), rtol=1e-6, atol=1e-6)


def test_eval_mode_uses_running_statistics():
    torch.manual_seed(4)
    loss = ProjectorDistillLoss(5, 7, distance="log_diff").double()
    loss(torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 7, dtype=torch.float64))
    loss.eval()
    z_s, z_t = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)  # batch 1 is fine in eval
    p = loss.embed(z_s)
    s = (p - loss.bn_s.running_mean) / torch.sqrt(loss.bn_s.running_var + 1e-4)
    t = (z_t - loss.bn_t.running_mean) / torch.sqrt(loss.bn_t.running_var + 1e-4)
    assert loss(z_s, z_t).item() == pytest.approx(torch.log(((s - t).abs() ** 4).sum()).item(), rel=1e-12)


def test_zero_variance_teacher_channel_with_eps_zero_is_finite_and_matches_reference():
    torch.manual_seed(5)
    loss = ProjectorDistillLoss(5, 7, distance="log_corr", eps=0.0).double()
    z_s = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(8, 7, dtype=torch.float64)
    z_t[:, 2] = 0.7  # a dead teacher channel
    value = loss(z_s, z_t)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(z_s.grad).all() and torch.isfinite(loss.embed.weight.grad).all()
    expected = reference_loss(
        z_s.detach(), z_t, loss.embed.weight.detach(), loss.embed.bias.detach(), "log_corr", 4.0, 0.0
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    # the dead channel whitens to 0, so its correlation term is |0 - 1|^4 = 1
    assert torch.equal(loss.bn_t(z_t)[:, 2], torch.zeros(8, dtype=torch.float64))


def test_gradients_reach_projector_and_student_but_not_teacher():
    torch.manual_seed(6)
    loss = ProjectorDistillLoss(5, 7, distance="log_diff")
    z_s = torch.randn(8, 5, requires_grad=True)
    z_t = torch.randn(8, 7, requires_grad=True)
    loss(z_s, z_t).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    assert loss.embed.weight.grad.abs().sum() > 0 and loss.embed.bias.grad.abs().sum() > 0
    assert z_t.grad is None


@pytest.mark.parametrize("dims", [(6, 10), (10, 6), (8, 8)])
def test_orthogonal_projector_stays_orthogonal_after_steps(dims):
    torch.manual_seed(7)
    loss = ProjectorDistillLoss(*dims, distance="log_diff", projector="orthogonal")
    assert "embed.parametrizations.weight.original" in loss.state_dict()
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.5)
    before = loss.embed.weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        loss(torch.randn(16, dims[0]), torch.randn(16, dims[1])).backward()
        optimizer.step()
    weight = loss.embed.weight.detach()  # (d_t, d_s)
    gram = weight.T @ weight if dims[1] >= dims[0] else weight @ weight.T
    assert not torch.allclose(weight, before)
    assert torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0])) < 1e-4


def test_identity_projector():
    loss = ProjectorDistillLoss(4, 4, distance="bn_mse", projector="identity")
    assert list(loss.parameters()) == []
    z = torch.randn(6, 4)
    assert loss(z, z).item() == pytest.approx(0.0, abs=1e-10)


def test_state_dict_names_are_stable():
    names = {
        "linear": ["embed.weight", "embed.bias"],
        "orthogonal": ["embed.parametrizations.weight.original", "embed.parametrizations.weight.0.base"],
        "identity": [],
    }
    buffers = [
        f"{side}.{b}" for side in ("bn_s", "bn_t") for b in ("running_mean", "running_var", "num_batches_tracked")
    ]
    for projector, expected in names.items():
        assert list(ProjectorDistillLoss(4, 4, projector=projector).state_dict()) == expected + buffers


@pytest.mark.parametrize(
    "kwargs, features, message",
    [
        ({}, (torch.randn(4, 5), torch.randn(3, 7)), "batch sizes differ"),
        ({}, (torch.randn(4, 6), torch.randn(4, 7)), "student features have width 6"),
        ({}, (torch.randn(4, 5), torch.randn(4, 8)), "teacher features have width 8"),
        ({}, (torch.randn(1, 5), torch.randn(1, 7)), "batch size 1"),
        ({}, (torch.tensor([[math.nan] * 5] * 2), torch.randn(2, 7)), "non-finite"),
        ({}, (torch.randn(2, 5), torch.tensor([[math.inf] * 7] * 2)), "non-finite"),
    ],
)
def test_bad_input_raises_value_error(kwargs, features, message):
    loss = ProjectorDistillLoss(5, 7, **kwargs)
    with pytest.raises(ValueError, match=message):
        loss(*features)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(distance="cosine"), "unknown distance 'cosine'"),
        (dict(projector="mlp"), "unknown projector 'mlp'"),
        (dict(projector="identity"), "identity.*5 != 7"),
        (dict(eps=-1.0), "eps must be >= 0"),
        (dict(exponent=0.0), "exponent must be > 0"),
    ],
)
def test_bad_construction_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProjectorDistillLoss(5, 7, **kwargs)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_reference(temperature):
    torch.manual_seed(8)
    y_s, y_t = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    p_t = torch.softmax(y_t / temperature, 1)
    p_s = torch.softmax(y_s / temperature, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() / 5 * temperature**2
    assert kd_loss(y_s, y_t, temperature).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(y_s, y_t[:, :5])


def test_resnet_combination_equals_torchdistill_srd_loss():
    """2 * log_diff(eps 1e-4) + KD(T=1) equals torchdistill's SRDLoss fed by SRDModelWrapper's projector + BN."""
    from torchdistill.losses.mid_level import SRDLoss
    from torchdistill.models.wrapper import SRDModelWrapper

    torch.manual_seed(9)
    student_net, teacher_net = nn.Linear(3, 3), nn.Linear(3, 3)  # stand-ins; only the auxiliary modules are used
    norm = {"num_features": 12, "eps": 1e-4, "affine": False}
    common = dict(
        input_module={"path": "layer4", "io": "output"},
        norm_kwargs=norm,
        device="cpu",
        device_ids=None,
        distributed=False,
    )
    student_box = SRDModelWrapper(
        linear_kwargs={"in_features": 8, "out_features": 12}, student_model=student_net, **common
    )
    teacher_box = SRDModelWrapper(teacher_model=teacher_net, **common)
    captured = {}
    student_box.norm_layer.register_forward_hook(lambda m, i, o: captured.__setitem__("s", o))
    teacher_box.norm_layer.register_forward_hook(lambda m, i, o: captured.__setitem__("t", o))

    feat_s, feat_t = torch.randn(16, 8, 4, 4), torch.randn(16, 12, 4, 4)
    logits_s, logits_t = torch.randn(16, 10), torch.randn(16, 10)
    student_box.secondary_forward({"layer4": {"output": feat_s}})
    teacher_box.secondary_forward({"layer4": {"output": feat_t}})
    srd = SRDLoss(
        "norm_layer",
        "output",
        "norm_layer",
        "output",
        ".",
        "output",
        ".",
        "output",
        exponent=4.0,
        temperature=1.0,
        reduction="batchmean",
    )
    theirs = srd(
        {"norm_layer": {"output": captured["s"]}, ".": {"output": logits_s}},
        {"norm_layer": {"output": captured["t"]}, ".": {"output": logits_t}},
    )

    ours_loss = ProjectorDistillLoss(8, 12, distance="log_diff", eps=1e-4)
    ours_loss.embed.load_state_dict(student_box.linear.state_dict())
    ours = 2 * ours_loss(feat_s, feat_t) + kd_loss(logits_s, logits_t, 1.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
