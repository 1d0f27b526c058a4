"""Issue 13: BatchNorm teachers and students. One test per cause checked.

The prior's hooks come off, refuse a teacher in train mode and skip layers without running statistics.
"""

import copy
import hashlib
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dfkt import api
from dfkt.models import build_model
from dfkt.models.files import load_model
from dfkt.models.foreign import ForeignClassifier
from dfkt.synthesis import BNStatsPrior, forward_with_prior
from tests.conftest import FAST_ENGINE


def _with_random_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net.eval()


def _as_foreign(native) -> ForeignClassifier:
    """The same network as a user writes it outside dfkt: a flat nn.Sequential, loaded from a state dict."""
    layers = [*native.backbone, native.head]
    state = OrderedDict((f"{i}.{k}", v) for i, m in enumerate(layers) for k, v in m.state_dict().items())
    net = nn.Sequential(*[copy.deepcopy(m) for m in layers])
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    net.load_state_dict(state)
    return ForeignClassifier(net.eval(), "callable")


@pytest.mark.parametrize("arch", ["digits_cnn", "wrn16_2"])
def test_bn_prior_on_a_foreign_teacher_equals_the_native_one(arch):
    torch.manual_seed(0)
    native = _with_random_statistics(build_model(arch, 10, 1, 8)).requires_grad_(False)
    foreign = _as_foreign(native).requires_grad_(False)
    p_native, p_foreign = BNStatsPrior(native, "t"), BNStatsPrior(foreign, "t")
    assert len(p_native.layers) == len(p_foreign.layers) > 0
    x = torch.randn(16, 1, 8, 8, requires_grad=True)
    for path in ("forward", "forward_features"):
        l_native = forward_with_prior(p_native, getattr(native, path), x)[1]
        l_foreign = forward_with_prior(p_foreign, getattr(foreign, path), x)[1]
        assert l_foreign.item() == pytest.approx(l_native.item(), rel=1e-6)
        (g_native,) = torch.autograd.grad(l_native, x)
        (g_foreign,) = torch.autograd.grad(l_foreign, x)
        assert torch.allclose(g_native, g_foreign, atol=1e-6)
    assert not any(m.training for m in foreign.modules() if isinstance(m, nn.BatchNorm2d))


def test_bn_prior_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    net = _with_random_statistics(build_model("wrn16_2", 10, 1, 8)).requires_grad_(False)
    prior = BNStatsPrior(net, "t")
    x = torch.randn(32, 1, 8, 8, requires_grad=True)
    l32 = forward_with_prior(prior, net, x)[1]
    (g32,) = torch.autograd.grad(l32, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l16 = forward_with_prior(prior, net, x)[1]
    (g16,) = torch.autograd.grad(l16, x)
    assert l16.item() == pytest.approx(l32.item(), rel=0.02)
    assert torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.95


def test_bn_prior_hooks_fire_for_their_prior_only_and_come_off():
    net = _with_random_statistics(build_model("digits_cnn", 10, 1, 8))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(8, 1, 8, 8)
    alone = BNStatsPrior(net, "t")
    expected = forward_with_prior(alone, net, x)[1].item()
    alone.remove()
    assert all(len(bn._forward_hooks) == 0 for bn in bns)
    first, second = BNStatsPrior(net, "a"), BNStatsPrior(net, "b")
    assert forward_with_prior(first, net, x)[1].item() == pytest.approx(expected)  # not doubled by `second`
    assert second.terms == {}
    first.remove()
    second.remove()
    assert all(len(bn._forward_hooks) == 0 for bn in bns)


def test_bn_prior_refuses_a_teacher_in_train_mode():
    net = _with_random_statistics(build_model("digits_cnn", 10, 1, 8)).train()
    prior = BNStatsPrior(net, "t")
    with pytest.raises(RuntimeError, match="eval mode"):
        forward_with_prior(prior, net, torch.randn(8, 1, 8, 8))


def test_bn_prior_skips_layers_without_running_statistics():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).eval()
    prior = BNStatsPrior(net, "t")
    assert prior.layers == [net[1]]
    assert torch.isfinite(forward_with_prior(prior, net, torch.randn(4, 1, 8, 8))[1])


TINY = {
    "deepinversion": {
        "synthesis_batch": 32,
        "synthesis_iterations": 5,
        "student_steps_per_synthesis": 10,
        "pool_size": 500,
        "w_adi": 1.0,
    },
    "fast": {"synthesis_batch": 32, "synthesis_iterations": 2, "student_steps_per_synthesis": 10, "pool_size": 500},
    "rdskd": {
        "gen_batch": 32,
        "gen_epochs": 1,
        "gen_steps_per_epoch": 5,
        "student_data": "pool",
        "pool_size": 256,
        "pool_refresh": 4,
        "pool_mining": 4,
    },
}


@pytest.mark.parametrize("method", sorted(TINY))
def test_student_batchnorm_statistics_move_only_on_its_kd_steps(method, digits_teacher, tmp_path):
    """The adversarial judge (ADI, Fast), pool mining (RDSKD), label-free selection and test evaluation all
    forward the student; only the KD steps may update its running statistics."""
    steps = 30
    params = {**TINY[method], "student_batch": 32, "student_epochs": 1, "student_steps_per_epoch": steps}
    api.distill(
        method,
        digits_teacher,
        student="digits_cnn_half",
        out=tmp_path / "run",
        overrides=FAST_ENGINE + ["eval_every=10"] + [f"params.{k}={v}" for k, v in params.items()],
    )
    state = load_file(str(tmp_path / "run" / "student.safetensors"))
    tracked = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {steps}


@pytest.mark.parametrize(
    ("method", "extra"), [("deepinversion", {}), ("rdskd", {"w_bn": 0.1, "bn_distance": "standardised"})]
)
def test_a_foreign_batchnorm_teacher_distils_exactly_like_the_native_one(
    method, extra, digits_teacher, tmp_path, monkeypatch
):
    (tmp_path / "bn_nets.py").write_text(
        "from dfkt.models import build_model\n\ndef digits():\n    return build_model('digits_cnn', 10, 1, 8)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _ = load_model(digits_teacher)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    params = {**TINY[method], **extra, "student_batch": 32, "student_epochs": 1, "student_steps_per_epoch": 20}
    overrides = FAST_ENGINE + ["eval_every=10"] + [f"params.{k}={v}" for k, v in params.items()]
    digests = []
    for name, teacher, weights in (
        ("native", digits_teacher, None),
        ("foreign", "bn_nets:digits", str(tmp_path / "weights.safetensors")),
    ):
        api.distill(
            method,
            teacher,
            student="digits_cnn_half",
            data="digits",
            overrides=overrides,
            out=tmp_path / name,
            teacher_weights=weights,
        )
        state = load_file(str(tmp_path / name / "student.safetensors"))
        digests.append(hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest())
    assert digests[0] == digests[1]


def _bn_loss(net: nn.Module, x: torch.Tensor, distance: str) -> torch.Tensor:
    prior = BNStatsPrior(net, "test", distance=distance)
    try:
        with prior.record(), torch.no_grad():
            net(x)
        return prior.loss()
    finally:
        prior.remove()


def test_standardised_bn_distance_is_the_formula_and_ignores_activation_scale():
    """Cause found on the WRN-16-2 teacher: raw norms weigh a layer by its activation scale (its last
    BatchNorm held half the loss). Standardised, a layer scaled by k (weights, running mean ×k, running
    variance ×k²) reads the same; raw, it reads k times more."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    net[1].running_mean.copy_(torch.randn(4))
    net[1].running_var.copy_(torch.rand(4) + 0.5)
    x = torch.randn(8, 1, 6, 6)
    h = net[0](x).detach()
    mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
    scale = net[1].running_var + net[1].eps
    by_hand = ((mean - net[1].running_mean) / scale.sqrt()).norm() + ((var - net[1].running_var) / scale).norm()
    assert torch.allclose(_bn_loss(net, x, "standardised"), by_hand, rtol=1e-5)
    k = 10.0
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled[0].weight.mul_(k), scaled[0].bias.mul_(k)
        scaled[1].running_mean.mul_(k), scaled[1].running_var.mul_(k * k)
    scaled[1].eps = net[1].eps * k * k  # so the scaled layer is exactly the same function
    assert torch.allclose(_bn_loss(scaled, x, "standardised"), _bn_loss(net, x, "standardised"), rtol=1e-4)
    raw, raw_scaled = _bn_loss(net, x, "raw"), _bn_loss(scaled, x, "raw")
    assert raw_scaled > 5 * raw  # mean term ×k, variance term ×k²


def test_samples_unlike_the_teachers_data_are_warned_about_and_its_own_data_is_not():
    """The cause behind the WRN pair's 18-29% students without a collapse warning: samples far from what
    the teacher's BatchNorm layers saw. Data like the teacher's reads under the limit; other data above."""
    from dfkt.dfkd.deepinversion import DeepInversionConfig
    from dfkt.dfkd.rdskd import RDSKDConfig
    from dfkt.diagnostics import MAX_BN_STATISTICS_GAP, bn_statistics_gap, bn_statistics_warning

    torch.manual_seed(0)
    net = build_model("digits_cnn", 10, 1, 8)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: the statistics of all it saw
    training_like = torch.rand(512, 1, 8, 8) * torch.linspace(0, 2, 8)  # a brightness ramp
    net.train()
    with torch.no_grad():
        net(training_like)
    net.eval()
    assert bn_statistics_gap(net, training_like[:256]) < MAX_BN_STATISTICS_GAP / 2
    unlike = torch.randn(256, 1, 8, 8) * 3
    gap = bn_statistics_gap(net, unlike)
    assert gap > MAX_BN_STATISTICS_GAP
    (rdskd,) = bn_statistics_warning(gap, "rdskd", RDSKDConfig())
    assert "unlike the teacher's training data" in rdskd
    assert "--set params.w_bn=0.3" in rdskd and "deepinversion" in rdskd  # its prior is off: turn it on
    (rdskd_prior,) = bn_statistics_warning(gap, "rdskd", RDSKDConfig(w_bn=0.1))
    assert "params.w_bn, now 0.1" in rdskd_prior
    (prior,) = bn_statistics_warning(gap, "deepinversion", DeepInversionConfig())
    assert "params.w_bn" in prior
    # A method without a prior is sent to the two whose cpu presets worked on a BatchNorm pair, not to CMI or Fast.
    from dfkt.dfkd.dafl import DAFLConfig

    (no_prior,) = bn_statistics_warning(gap, "dafl", DAFLConfig())
    assert "use deepinversion" in no_prior and "rdskd" in no_prior and "cmi" not in no_prior
    assert not bn_statistics_warning(bn_statistics_gap(net, training_like[256:]), "rdskd", RDSKDConfig())
    assert bn_statistics_gap(build_model("lenet5", 10, 1, 32).eval(), torch.rand(4, 1, 32, 32)) is None
