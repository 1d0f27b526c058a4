"""Tests for params.student_init=teacher (a narrower student started from its teacher's weights) and
params.feature_weight (its layers kept at the teacher's leading channels)."""

from __future__ import annotations

import pytest
import torch

from dfkt import api, losses
from dfkt.api.distill import Distillation, resolve_distill_config, student_start
from dfkt.config import EngineConfig
from dfkt.dfkd.base import DistillSetup
from dfkt.dfkd.rdskd import RDSKD, RDSKDConfig
from dfkt.engine import Engine
from dfkt.errors import ConfigError
from dfkt.losses import l2_sp, leading_channel_loss
from dfkt.models import build_model
from dfkt.models.files import ModelInfo, load_model, read_info
from dfkt.models.foreign import ForeignClassifier
from dfkt.models.slicing import (
    LayerOutputs,
    init_from_teacher,
    leading_slice_state,
    narrower_layers,
    ranked_teacher,
)
from tests.conftest import tiny_rdskd


def doubled_teacher(name: str, half: torch.nn.Module, in_channels: int, image_size: int) -> torch.nn.Module:
    """A teacher whose every doubled dimension repeats the half network's weights: each channel beyond
    the first half copies one of it, and each input it reads beyond the first half reads the copy. It
    then computes what the half network computes with its fan-in doubled."""
    teacher = build_model(name, 10, in_channels, image_size)
    state = teacher.state_dict()
    for key, small in half.state_dict().items():
        big = state[key]
        value = small.clone()
        for dim, (s, b) in enumerate(zip(small.shape, big.shape, strict=True)):
            if b != s:
                assert b == 2 * s, (key, small.shape, big.shape)
                value = torch.cat([value, value], dim=dim)
        if small.dim() >= 2 and big.shape[1] == 2 * small.shape[1]:
            value = value / 2  # each input is read twice, so each read counts half
        state[key] = value
    teacher.load_state_dict(state)
    return teacher


@pytest.mark.parametrize(
    ("teacher_name", "student_name", "in_channels", "image_size"),
    [("lenet5", "lenet5_half", 1, 32), ("digits_cnn", "digits_cnn_half", 1, 8)],
)
def test_a_student_sliced_from_a_teacher_with_repeated_channels_computes_the_teacher(
    teacher_name, student_name, in_channels, image_size
):
    torch.manual_seed(0)
    half = build_model(student_name, 10, in_channels, image_size)
    for module in half.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    teacher = doubled_teacher(teacher_name, half, in_channels, image_size).eval()
    student = build_model(student_name, 10, in_channels, image_size)
    init_from_teacher(student, teacher)
    x = torch.randn(8, in_channels, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(x), teacher(x), rtol=1e-4, atol=1e-5)


def test_each_tensor_is_the_teachers_leading_slice_with_the_fan_in_rescaled():
    torch.manual_seed(0)
    teacher = build_model("lenet5", 10, 1, 32)  # random weights: the two halves of every tensor differ
    state = leading_slice_state(build_model("lenet5_half", 10, 1, 32), teacher)
    source = teacher.state_dict()
    torch.testing.assert_close(state["backbone.0.weight"], source["backbone.0.weight"][:3])  # 1 input: kept
    torch.testing.assert_close(state["backbone.3.weight"], source["backbone.3.weight"][:8, :3] * 2)
    torch.testing.assert_close(state["backbone.6.weight"], source["backbone.6.weight"][:60, :8] * 2)
    torch.testing.assert_close(state["head.2.weight"], source["head.2.weight"][:, :42] * 2)
    torch.testing.assert_close(state["head.2.bias"], source["head.2.bias"])


@pytest.mark.parametrize(
    ("teacher_name", "student_name", "message"),
    [
        ("digits_cnn_half", "digits_cnn", "fewer channels"),  # wider than the teacher
        ("digits_cnn", "wrn16_1", "half-width partner"),  # another architecture
        ("wrn16_2", "wrn16_1", "half-width partner"),  # a projection shortcut only the teacher has
        ("resnet34", "resnet18", "half-width partner"),  # shallower, not narrower
    ],
)
def test_a_student_that_is_not_the_teacher_narrowed_is_refused(teacher_name, student_name, message):
    with pytest.raises(ConfigError, match=message):
        leading_slice_state(build_model(student_name, 10, 1, 8), build_model(teacher_name, 10, 1, 8))


def test_a_teacher_from_outside_dfkt_starts_the_student_where_its_network_is_the_students_wider_self():
    info = ModelInfo("lenet5", 10, 1, 32, (0.5,), (0.5,), None)
    wrapped = ForeignClassifier(build_model("lenet5", 10, 1, 32), "callable")  # dfkt's lenet5 via module:function
    assert student_start("auto", "lenet5_half", info, wrapped) == "teacher"
    other = ForeignClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10)), "callable")
    assert student_start("auto", "lenet5_half", info, other) == "random"
    with pytest.raises(ConfigError, match="half-width partner"):
        student_start("teacher", "lenet5_half", info, other)


def test_distill_starts_the_student_from_the_teacher(digits_teacher, tmp_path):
    # A student as wide as the teacher starts as its copy: the first evaluation is the teacher's accuracy.
    summary = api.distill(
        "rdskd",
        digits_teacher,
        "digits_cnn",
        overrides=tiny_rdskd(student_init="teacher"),
        out=tmp_path / "run",
    )
    assert summary["student_init"] == "teacher" and summary["curve"][0]["step"] == 0
    assert summary["curve"][0]["test_acc"] == pytest.approx(summary["teacher_acc"])


def test_distill_refuses_a_student_the_teacher_cannot_start_before_the_run_begins(digits_teacher):
    # Checked when the job is made, before any folder is written, not in start().
    cfg, method_cfg = resolve_distill_config(
        "rdskd", digits_teacher, "wrn16_1", overrides=tiny_rdskd(student_init="teacher")
    )
    with pytest.raises(ConfigError, match="half-width partner"):
        Distillation(cfg, method_cfg, resume=False)


def test_auto_starts_from_the_teacher_only_where_it_can(digits_teacher):
    info = read_info(digits_teacher)
    teacher, _ = load_model(digits_teacher)
    assert student_start("auto", "digits_cnn_half", info, teacher) == "teacher"
    assert student_start("auto", "wrn16_1", info, teacher) == "random"
    assert student_start("random", "digits_cnn_half", info, teacher) == "random"


def test_the_hint_loss_compares_each_layer_with_the_teachers_leading_channels_only():
    torch.manual_seed(0)
    student = [torch.randn(4, 3, 5, 5), torch.randn(4, 6)]
    teacher = [torch.randn(4, 6, 5, 5), torch.randn(4, 12)]
    expected = sum(
        ((s - t[:, : s.shape[1]]) ** 2).sum() / (t[:, : s.shape[1]] ** 2).sum() for s, t in zip(student, teacher)
    )
    torch.testing.assert_close(leading_channel_loss(student, teacher), expected / 2)
    changed = [t.clone() for t in teacher]
    changed[0][:, 3:] += 100.0  # the channels beyond the student's count
    changed[1][:, 6:] -= 100.0
    torch.testing.assert_close(leading_channel_loss(student, changed), expected / 2)
    exact = [t[:, : s.shape[1]].clone() for s, t in zip(student, teacher)]
    assert leading_channel_loss(exact, teacher).item() == 0.0
    # Each layer relative to the teacher's energy: a layer ten times larger weighs the same.
    scaled = [student[0] * 10, student[1]], [teacher[0] * 10, teacher[1]]
    torch.testing.assert_close(leading_channel_loss(*scaled), expected / 2)


def test_the_hinted_layers_are_the_narrower_ones_and_not_the_classifier():
    teacher, student = build_model("lenet5", 10, 1, 32), build_model("lenet5_half", 10, 1, 32)
    names = {id(m): n for n, m in student.named_modules()}
    pairs = narrower_layers(student, teacher)
    assert [names[id(mine)] for mine, _ in pairs] == ["backbone.0", "backbone.3", "backbone.6", "head.0"]
    assert all(theirs is dict(teacher.named_modules())[names[id(mine)]] for mine, theirs in pairs)
    recorder = LayerOutputs([theirs for _, theirs in pairs])
    x = torch.randn(2, 1, 32, 32)
    teacher(x)
    assert recorder.outputs == [None] * 4  # only while recording
    recorder.recording = True
    teacher(x)
    assert [o.shape[1] for o in recorder.outputs] == [6, 16, 120, 84]


def test_distill_with_the_hint_loss_keeps_the_student_at_the_teachers_leading_channels(digits_teacher, tmp_path):
    teacher, _ = load_model(digits_teacher)
    x = torch.randn(256, 1, 8, 8)

    def distance(run: str) -> float:
        student, _ = load_model(tmp_path / run / "student.safetensors")
        pairs = narrower_layers(student, teacher)
        mine, theirs = LayerOutputs([m for m, _ in pairs]), LayerOutputs([t for _, t in pairs])
        mine.recording = theirs.recording = True
        with torch.no_grad():
            student.eval()(x), teacher.eval()(x)
        return leading_channel_loss(mine.outputs, theirs.outputs).item()

    for run, weight in (("plain", 0), ("hinted", 30)):
        api.distill(
            "rdskd",
            digits_teacher,
            "digits_cnn_half",
            overrides=tiny_rdskd(student_init="teacher", feature_weight=weight, student_lr=0.01),
            out=tmp_path / run,
        )
        logged = (tmp_path / run / "metrics.jsonl").read_text()
        assert ('"feature"' in logged) == (weight > 0)
    assert distance("hinted") < 0.5 * distance("plain")


def test_the_hint_loss_is_refused_for_a_student_started_at_random(digits_teacher, tmp_path):
    with pytest.raises(ConfigError, match="params.student_init=teacher"):
        api.distill(
            "rdskd",
            digits_teacher,
            "digits_cnn_half",
            overrides=tiny_rdskd(student_init="random", feature_weight=1),
            out=tmp_path / "run",
        )


@pytest.mark.parametrize(("student", "init", "hinted"), [("digits_cnn_half", "auto", 4), ("digits_cnn", "teacher", 0)])
def test_the_hint_loss_is_on_where_the_student_started_from_a_wider_teacher(
    digits_teacher, tmp_path, student, init, hinted
):
    # A student as wide as the teacher starts as its copy: no layer is narrower, nothing to hint.
    summary = api.distill(
        "rdskd", digits_teacher, student, overrides=tiny_rdskd(student_init=init, feature_weight=1), out=tmp_path
    )
    assert summary["feature_hint_layers"] == hinted
    assert ('"feature"' in (tmp_path / "metrics.jsonl").read_text()) == (hinted > 0)


@pytest.mark.parametrize(("start", "hinted"), [("teacher", 4), ("random", 0)])
def test_with_auto_the_hint_loss_follows_where_the_student_started(digits_teacher, start, hinted):
    # student_init=auto falls back to a random start where slicing does not apply; its channels are then not
    # the teacher's, and the hint loss stays off.
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    teacher = engine.prepare(load_model(digits_teacher)[0], trainable=False)
    student = engine.prepare(build_model("digits_cnn_half", 10, 1, 8), trainable=True)
    cfg = RDSKDConfig(student_init="auto", feature_weight=1.0, gen_batch=32, student_data="pool", pool_size=64)
    setup = DistillSetup(teacher, student, 10, 1, 8, engine, (0.3,), (0.4,), student_start=start)
    assert RDSKD(cfg, setup).student_trainer.hinted_layers == hinted


def first_layer_importance(teacher: torch.nn.Module, ranking: str) -> torch.Tensor:
    """The importance of each of the first convolution's channels, written out for the two chains tested."""
    first = teacher.backbone[0].weight
    if ranking == "filter_norm":
        return first.abs().flatten(1).sum(1)
    norm = teacher.backbone[1]  # digits_cnn: BatchNorm, then ReLU and the second convolution
    if isinstance(norm, torch.nn.BatchNorm2d):
        return (
            teacher.backbone[3].weight.abs().sum((0, 2, 3)) * norm.weight.abs() / (norm.running_var + norm.eps).sqrt()
        )
    return teacher.backbone[3].weight.abs().sum((0, 2, 3))  # lenet5: ReLU, pooling, the second convolution


@pytest.mark.parametrize("ranking", ["filter_norm", "outgoing_norm"])
@pytest.mark.parametrize(
    ("teacher_name", "student_name", "image_size"),
    [("lenet5", "lenet5_half", 32), ("digits_cnn", "digits_cnn_half", 8)],
)
def test_a_student_sliced_by_rank_keeps_each_layers_most_important_channels(
    teacher_name, student_name, image_size, ranking
):
    torch.manual_seed(0)
    teacher = build_model(teacher_name, 10, 1, image_size).eval()
    for module in teacher.modules():  # BatchNorm statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(-2.0, 2.0)
    x = torch.randn(8, 1, image_size, image_size)
    reordered, orders = ranked_teacher(teacher, x, ranking)
    with torch.no_grad():  # the sorted copy is the teacher, channel for channel moved
        torch.testing.assert_close(reordered(x), teacher(x), rtol=1e-4, atol=1e-4)
    student = build_model(student_name, 10, 1, image_size)
    channels = init_from_teacher(student, teacher, ranking, x)
    assert list(channels) == [name for name, _ in narrower_layers_by_name(student, teacher)]
    first = teacher.backbone[0].weight
    kept = channels["backbone.0"]
    assert len(kept) == student.backbone[0].weight.shape[0]
    with torch.no_grad():
        assert set(kept.tolist()) == set(first_layer_importance(teacher, ranking).topk(len(kept)).indices.tolist())
    torch.testing.assert_close(student.backbone[0].weight, first[kept])  # one input channel: no fan-in rescale
    with torch.no_grad():  # the student's first layer computes the teacher's kept channels exactly
        mine, theirs = student.backbone[0](x), teacher.backbone[0](x)
    assert leading_channel_loss([mine], [theirs], [kept]).item() < 1e-10
    assert leading_channel_loss([mine], [theirs]).item() > 0.1


def narrower_layers_by_name(student: torch.nn.Module, teacher: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    names = {id(module): name for name, module in student.named_modules()}
    return [(names[id(mine)], mine) for mine, _ in narrower_layers(student, teacher)]


class ResidualBlock(torch.nn.Module):
    """Two convolutions of one width whose outputs are summed: registered in order, each parametrised layer reading
    the one before, so only the reordered copy's outputs can tell that the two must move their channels together."""

    def __init__(self, width: int):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, width, 3, padding=1)
        self.body = torch.nn.Conv2d(width, width, 3, padding=1)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.body(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("ranking", ["filter_norm", "outgoing_norm"])
def test_a_residual_teacher_is_not_ranked_and_its_student_keeps_the_leading_channels(ranking):
    torch.manual_seed(0)
    teacher, student = ResidualBlock(8).eval(), ResidualBlock(4)
    x = torch.randn(4, 1, 8, 8)
    assert ranked_teacher(teacher, x, ranking) is None  # sorting one layer's channels breaks the residual sum
    assert init_from_teacher(student, teacher, ranking, x) is None
    for name, tensor in leading_slice_state(student, teacher).items():
        torch.testing.assert_close(student.state_dict()[name], tensor)
    assert ranked_teacher(build_model("resnet18", 10, 3, 32), torch.randn(2, 3, 32, 32), ranking) is None
    assert ranked_teacher(torch.nn.Sequential(torch.nn.Flatten()), x, ranking) is None  # no layer to rank
    with pytest.raises(ValueError, match="channels must be one of"):
        init_from_teacher(student, teacher, "largest", x)


def test_distill_with_ranked_channels_hints_at_the_channels_it_kept(digits_teacher, tmp_path, monkeypatch):
    hinted = []

    def spy(student_features, teacher_features, channels=None):
        hinted.append(channels)
        return leading_channel_loss(student_features, teacher_features, channels)

    monkeypatch.setattr(losses, "leading_channel_loss", spy)
    summary = api.distill(
        "rdskd",
        digits_teacher,
        "digits_cnn_half",
        overrides=tiny_rdskd(student_init="teacher", student_channels="outgoing_norm", feature_weight=1),
        out=tmp_path / "run",
    )
    assert summary["student_channels"] == "outgoing_norm" and summary["feature_hint_layers"] == 4
    # Every step's hint compares each student layer with the teacher channels it was sliced from.
    teacher, _ = load_model(digits_teacher)
    expected = init_from_teacher(
        build_model("digits_cnn_half", 10, 1, 8), teacher, "outgoing_norm", torch.randn(8, 1, 8, 8)
    )
    assert any(not torch.equal(order, torch.arange(len(order))) for order in expected.values())
    assert hinted and all([c.tolist() for c in step] == [c.tolist() for c in expected.values()] for step in hinted)


def test_l2_sp_is_the_squared_distance_from_the_start():
    start = [torch.zeros(2, 3), torch.ones(4)]
    moved = [torch.full((2, 3), 2.0), torch.ones(4) * 3]
    assert l2_sp(moved, start).item() == pytest.approx(6 * 4 + 4 * 4)
    assert l2_sp(start, start).item() == 0.0


def test_the_anchor_keeps_a_sliced_student_near_its_start(digits_teacher, tmp_path):
    teacher, _ = load_model(digits_teacher)
    start = build_model("digits_cnn_half", 10, 1, 8)
    init_from_teacher(start, teacher)

    def moved(run: str) -> float:
        student, _ = load_model(tmp_path / run / "student.safetensors")
        return l2_sp(list(student.parameters()), list(start.parameters())).item()

    for run, weight in (("free", 0), ("anchored", 10)):
        api.distill(
            "rdskd",
            digits_teacher,
            "digits_cnn_half",
            overrides=tiny_rdskd(
                student_init="teacher", student_channels="leading", student_anchor=weight, student_lr=0.01
            ),
            out=tmp_path / run,
        )
        assert ('"anchor"' in (tmp_path / run / "metrics.jsonl").read_text()) == (weight > 0)
    assert moved("anchored") < 0.5 * moved("free")


def test_a_random_start_runs_without_ranking_or_anchor_the_preset_sets(digits_teacher, tmp_path):
    # RDSKD's cpu preset ranks and anchors; a user who asks for a random start must not have to undo both.
    summary = api.distill(
        "rdskd",
        digits_teacher,
        "digits_cnn_half",
        overrides=tiny_rdskd(student_init="random", student_channels="outgoing_norm", student_anchor=0.01),
        out=tmp_path,
    )
    assert summary["student_init"] == "random" and summary["student_channels"] is None
    assert '"anchor"' not in (tmp_path / "metrics.jsonl").read_text()
