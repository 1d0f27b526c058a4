"""The authors' recipes that SFDA methods keep (issue 14): dropout-free neighbour features, per-part
learning rates, and Tent/BN-adapt on BatchNorm2d. Untrained models on random images: seconds."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkt.config import EngineConfig
from dfkt.engine import Engine
from dfkt.errors import DfktError
from dfkt.models import build_model
from dfkt.registry import ADAPT_METHODS
from dfkt.sfda.base import AdaptSetup, dropout_off
from tests.test_sfda import run_steps

SIZES = {"shot_lenet": 32, "shot_dtn": 8}  # shot_lenet: Dropout2d, BatchNorm1d only; shot_dtn: BatchNorm2d too


def make(method: str, model_name: str, preset: str = "cpu", n: int = 96, **params):
    torch.manual_seed(0)
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    size = SIZES[model_name]
    model = engine.prepare(build_model(model_name, 10, 1, size), trainable=True)
    cls = ADAPT_METHODS.get(method)
    epochs = {"epochs": 1} if "epochs" in cls.Config.model_fields else {}
    cfg = cls.Config(**{**cls.presets[preset], **epochs, **params})
    return cls(cfg, AdaptSetup(model, torch.randn(n, 1, size, size), engine))


def params_of(module) -> dict:
    """Parameters by name, without the engine wrapper's prefix."""
    return {k.removeprefix("_forward_module."): p.detach().clone() for k, p in module.named_parameters()}


DROPOUT = nn.modules.dropout._DropoutNd
BATCHNORM = nn.modules.batchnorm._BatchNorm


# 1. Neighbour features without dropout ---------------------------------------------------------


@pytest.mark.parametrize("method", ["nrc", "aad"])
def test_bank_rows_and_queries_are_dropout_free_features_with_batchnorm_on_the_batch(method):
    runner = make(method, "shot_lenet")
    model = runner.model
    assert any(isinstance(m, DROPOUT) and m.p > 0 for m in model.modules())
    checked, modes = [], []
    for m in model.modules():
        if isinstance(m, (DROPOUT, BATCHNORM)):
            m.register_forward_hook(lambda m, i, o: modes.append((isinstance(m, DROPOUT), m.training, len(i[0]))))
    write = runner.update_banks

    def spy(index, features, probs):
        # The same weights and modes (BatchNorm on the batch), dropout off: what the bank must receive.
        reference = copy.deepcopy(model)
        for m in reference.modules():
            if isinstance(m, DROPOUT):
                m.eval()
        with torch.no_grad():
            expected = reference.forward_features(runner.images[index])
            expected_probs = F.softmax(reference.classify(expected), dim=1)
        assert features.requires_grad  # the same pass carries the loss's gradients
        queries = write(index, features, probs)
        torch.testing.assert_close(queries, F.normalize(expected, dim=1))
        torch.testing.assert_close(runner.buffers["feature_bank"][index], F.normalize(expected, dim=1))
        torch.testing.assert_close(runner.buffers["score_bank"][index], expected_probs)
        checked.append(len(index))
        return queries

    runner.update_banks = spy
    head, extractor = params_of(model.head), params_of(model.backbone.extractor)
    run_steps(runner, 2)
    assert checked == [64, 32]
    # The pass filling the banks is in eval mode; in the steps BatchNorm trains and dropout is off ...
    assert modes and all(not training for _, training, n in modes if n == 96)
    step = [(is_dropout, training) for is_dropout, training, n in modes if n < 96]
    assert step and all(training != is_dropout for is_dropout, training in step)
    # ... and comes back on afterwards, and gradients reached the extractor and the head.
    assert all(m.training for m in model.modules() if isinstance(m, DROPOUT))
    assert any(not torch.equal(v, params_of(model.head)[k]) for k, v in head.items())
    assert any(not torch.equal(v, params_of(model.backbone.extractor)[k]) for k, v in extractor.items())


def test_dropout_off_leaves_other_modes_and_gradients_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.9), nn.Linear(4, 2), nn.Dropout(0.5))
    model.train()
    model[4].eval()  # a dropout layer already off stays off
    x = torch.randn(8, 4)
    with dropout_off(model):
        assert [m.training for m in model] == [True, True, False, True, False]
        out = model(x)
    out.sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert [m.training for m in model] == [True, True, True, True, False]
    reference = nn.Sequential(*list(copy.deepcopy(model))[:2], nn.Identity(), copy.deepcopy(model[3]))
    torch.testing.assert_close(out, reference.train()(x))


# 2. Learning rate per part -----------------------------------------------------------------------


@pytest.mark.parametrize("method, head_trains", [("shot", False), ("shot_im", False), ("nrc", True), ("aad", True)])
def test_param_groups_have_each_parts_learning_rate(method, head_trains):
    runner = make(method, "shot_lenet", lr=0.02, backbone_lr_mult=0.1, bottleneck_lr_mult=0.5, head_lr_mult=2.0)
    model = runner.model
    groups = runner.optimizers["model"].param_groups
    lrs = {g["name"]: g["lr"] for g in groups}
    expected = {"backbone": 0.002, "bottleneck": 0.01, **({"head": 0.04} if head_trains else {})}
    assert lrs == pytest.approx(expected)
    ids = lambda params: sorted(id(p) for p in params)  # noqa: E731
    by_name = {g["name"]: ids(g["params"]) for g in groups}
    extractor = ids(model.backbone.extractor.parameters())
    assert by_name["backbone"] == extractor
    assert by_name["bottleneck"] == sorted(set(ids(model.backbone.parameters())) - set(extractor))
    if head_trains:
        assert by_name["head"] == ids(model.head.parameters())
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))  # each in exactly one group
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    if not head_trains:  # SHOT's frozen head is in none
        assert not set(in_groups) & set(ids(model.head.parameters()))


@pytest.mark.parametrize("method", ["nrc", "aad"])
def test_paper_presets_use_the_authors_learning_rates_and_cpu_presets_one_rate(method):
    paper = {g["name"]: g["lr"] for g in make(method, "shot_lenet", "paper").optimizers["model"].param_groups}
    assert paper == pytest.approx({"backbone": 1e-4, "bottleneck": 1e-3, "head": 1e-3})
    cpu = make(method, "shot_lenet", "cpu")
    assert {g["lr"] for g in cpu.optimizers["model"].param_groups} == {cpu.cfg.lr}


# 3. Tent and BN-adapt: BatchNorm2d ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["tent", "bn_adapt"])
def test_a_model_without_batchnorm2d_is_refused_unless_batchnorm1d_is_asked_for(method):
    with pytest.raises(DfktError) as refused:
        make(method, "shot_lenet")
    message = str(refused.value)
    assert "\n" not in message and "BatchNorm2d" in message
    assert "params.include_batchnorm1d=true" in message and "shot_dtn" in message

    runner = make(method, "shot_lenet", include_batchnorm1d=True)
    bn = runner.model.backbone.bn
    assert runner.bn == [bn]
    before, mean = params_of(runner.model), bn.running_mean.clone()
    run_steps(runner, 1)
    after = params_of(runner.model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == ({"backbone.bn.weight", "backbone.bn.bias"} if method == "tent" else set())
    assert not torch.equal(mean, bn.running_mean)  # target statistics


@pytest.mark.parametrize("method", ["tent", "bn_adapt"])
def test_only_batchnorm2d_adapts_by_default(method):
    runner = make(method, "shot_dtn")
    model = runner.model
    bn1d = model.backbone.bn
    assert runner.bn and all(type(m) is nn.BatchNorm2d for m in runner.bn)
    bn2d = {
        f"{name.removeprefix('_forward_module.')}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    named = {name.removeprefix("_forward_module."): p for name, p in model.named_parameters()}
    trainable = {name for name, p in named.items() if p.requires_grad}
    assert trainable == (bn2d if method == "tent" else trainable)
    modes = []
    for m in model.modules():
        if isinstance(m, (BATCHNORM, DROPOUT)):
            m.register_forward_hook(lambda m, i, o: modes.append((type(m), m.training)))
    before, stats = params_of(model), (bn1d.running_mean.clone(), bn1d.running_var.clone())
    run_steps(runner, 1)
    assert modes and all(training == (kind is nn.BatchNorm2d) for kind, training in modes)
    after = params_of(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == (bn2d if method == "tent" else set())
    assert torch.equal(stats[0], bn1d.running_mean) and torch.equal(stats[1], bn1d.running_var)
    if method == "tent":
        in_optimizer = {id(p) for g in runner.optimizers["model"].param_groups for p in g["params"]}
        assert in_optimizer == {id(named[name]) for name in bn2d}


def test_cli_names_the_flag_for_a_model_without_batchnorm2d(capsys, tmp_path):
    from dfkt.cli import main
    from dfkt.models.files import ModelInfo, save_model
    from tests.test_cli_errors import write_fake_fmnist

    source = save_model(
        build_model("shot_lenet", 10, 1, 32),
        ModelInfo("shot_lenet", 10, 1, 32, (0.3,), (0.4,), "fmnist"),
        tmp_path / "m.safetensors",
    )
    write_fake_fmnist(tmp_path)
    assert (
        main(
            [
                "adapt",
                "--method",
                "tent",
                "--source",
                str(source),
                "--target",
                "fmnist-c:contrast:3",
                "--data-root",
                str(tmp_path),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("dfkt: error: ") and "\n" not in err
    assert "include_batchnorm1d" in err and "shot_dtn" in err
