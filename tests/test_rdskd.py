import copy
import json
import math

import pytest
import torch

from dfkt.config import EngineConfig, validate
from dfkt.dfkd.base import DistillSetup
from dfkt.dfkd.rdskd import RDSKD, RDSKDConfig
from dfkt.engine import Engine
from dfkt.errors import ConfigError
from dfkt.models import build_model
from dfkt.models.files import load_model
from dfkt.synthesis import BNStatsPrior, forward_with_prior


def make_method(teacher_path, **params):
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    teacher, info = load_model(teacher_path)
    teacher = engine.prepare(teacher, trainable=False)
    student = engine.prepare(build_model("digits_cnn_half", 10, 1, 8), trainable=True)
    cfg = RDSKDConfig(
        **{
            "gen_batch": 32,
            "gen_steps_per_epoch": 4,
            "gen_epochs": 2,
            "student_batch": 32,
            "student_epochs": 1,
            "student_steps_per_epoch": 5,
            "student_data": "pool",
            "pool_size": 64,
            **params,
        }
    )
    return RDSKD(cfg, DistillSetup(teacher, student, 10, 1, 8, engine, (0.3,), (0.4,)))


def test_references_follow_the_authors_schedule(digits_teacher):
    """r starts at 0, is set at step 1 of each epoch to that step's losses, and held otherwise."""
    method = make_method(digits_teacher)
    stage = method.stages()[0]
    seen = []
    for i in range(stage.steps):
        terms = stage.step(i)
        if i == 1:
            terms_at_reset = terms
        seen.append((method.buffers["references"].clone(), terms["oh"].item(), terms["ie"].item()))
    assert torch.equal(seen[0][0], torch.zeros(2))
    assert seen[1][0].tolist() == pytest.approx([seen[1][1], seen[1][2]], rel=1e-5)
    assert [terms_at_reset["exp_oh"].item(), terms_at_reset["exp_ie"].item()] == pytest.approx([1.0, 1.0])
    assert torch.equal(seen[2][0], seen[1][0]) and torch.equal(seen[3][0], seen[1][0])
    assert seen[5][0].tolist() == pytest.approx([seen[5][1], seen[5][2]], rel=1e-5)  # epoch 2, step 1


def test_step_reference_uses_previous_iteration(digits_teacher):
    method = make_method(digits_teacher, reference="step")
    stage = method.stages()[0]
    first = stage.step(0)
    assert method.buffers["references"].tolist() == pytest.approx([first["oh"].item(), first["ie"].item()])


def test_generator_loss_is_weight_free_sum(digits_teacher):
    """Each term from its formula (Han et al., ICASSP 2021), not from the values the method returns."""
    method = make_method(digits_teacher)
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    logits = 3 * torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits, dim=1)
    oh = -torch.log(p.max(dim=1).values).mean()  # cross-entropy to each sample's own argmax
    mean_p = p.mean(dim=0)
    ie = (mean_p * torch.log(mean_p)).sum()  # minus the entropy of the batch's mean prediction, natural log
    ds = (p[4:] - p[:4]).pow(2).sum().sqrt() / (images[4:] - images[:4]).pow(2).sum().sqrt()  # halves paired
    terms = method.generator_losses(images, logits, torch.tensor([0.5, -1.0]))
    assert [terms[k].item() for k in ("oh", "ie", "ds")] == pytest.approx([oh.item(), ie.item(), ds.item()], rel=1e-5)
    expected = math.exp(oh.item() - 0.5) + math.exp(ie.item() + 1.0) + ds.item()
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("distance", ["raw", "standardised"])
def test_batchnorm_prior_adds_its_weighted_loss_to_the_papers(digits_teacher, distance):
    """w_bn > 0: L_G + w_bn · L_bn, with L_bn the prior's loss on the teacher's forward of the same images."""
    plain = make_method(digits_teacher)
    method = make_method(digits_teacher, w_bn=0.3, bn_distance=distance)
    assert plain.prior is None
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    references = torch.tensor([0.5, -1.0])
    method.buffers["references"] = plain.buffers["references"] = references
    with torch.no_grad():
        terms = method.objective(images, torch.zeros(16, 1))
        paper = plain.objective(images, torch.zeros(16, 1))
        reference = BNStatsPrior(method.teacher, "test", distance=distance)
        l_bn = forward_with_prior(reference, method.teacher, images)[1]
        reference.remove()
    assert "bn" not in paper and terms["bn"].item() == pytest.approx(l_bn.item(), rel=1e-5)
    assert l_bn.item() > 0.1
    assert terms["loss"].item() == pytest.approx(paper["loss"].item() + 0.3 * l_bn.item(), rel=1e-5)


def test_total_variation_prior_adds_its_weighted_loss_to_the_papers(digits_teacher):
    """w_tv > 0: L_G + w_tv · TV(x), TV the sum of the L2 norms of the four neighbour differences."""
    plain = make_method(digits_teacher)
    method = make_method(digits_teacher, w_tv=1e-3)
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    method.buffers["references"] = plain.buffers["references"] = torch.tensor([0.5, -1.0])
    tv = sum(
        d.pow(2).sum().sqrt()
        for d in (
            images[..., :, 1:] - images[..., :, :-1],
            images[..., 1:, :] - images[..., :-1, :],
            images[..., 1:, :-1] - images[..., :-1, 1:],
            images[..., 1:, 1:] - images[..., :-1, :-1],
        )
    )
    with torch.no_grad():
        terms, paper = method.objective(images, None), plain.objective(images, None)
    assert "tv" not in paper and terms["tv"].item() == pytest.approx(tv.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(paper["loss"].item() + 1e-3 * tv.item(), rel=1e-5)


def test_batchnorm_prior_is_left_out_on_a_teacher_without_batchnorm(tmp_path):
    """The cpu preset's w_bn must not stop a BatchNorm-free teacher (LeNet-5) from distilling: RDSKD's own loss,
    and the run's log says why."""
    engine = Engine(EngineConfig(precision="32-true", progress=False), run_dir=tmp_path)
    teacher = engine.prepare(build_model("lenet5", 10, 1, 32).eval(), trainable=False)
    student = engine.prepare(build_model("lenet5_half", 10, 1, 32), trainable=True)
    setup = DistillSetup(teacher, student, 10, 1, 32, engine, (0.3,), (0.4,))
    with_prior, plain = (RDSKD(RDSKDConfig(gen_batch=16, w_bn=w), setup) for w in (0.3, 0.0))
    assert with_prior.prior is None
    images = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert with_prior.objective(images, None)["loss"].item() == plain.objective(images, None)["loss"].item()
    events = [json.loads(line).get("event", "") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("params.w_bn unused" in e and "none that keep running statistics" in e for e in events) == 1


def test_stages_train_the_right_modules_without_nan(digits_teacher):
    method = make_method(digits_teacher)
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    gen_before = copy.deepcopy(method.modules["generator"].state_dict())
    student_before = copy.deepcopy(method.modules["student"].state_dict())
    gen_stage, student_stage = method.stages()
    for i in range(gen_stage.steps):
        terms = gen_stage.step(i)
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in terms.values())
    gen_after = copy.deepcopy(method.modules["generator"].state_dict())
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert changed(gen_before, gen_after)
    assert not changed(student_before, method.modules["student"].state_dict())  # stage 2 ignores the student
    # Stage 3 through the engine: the generator is frozen there, buffers included.
    method.engine.run([student_stage], method, {})
    assert not method.generator.training
    assert not changed(gen_after, method.modules["generator"].state_dict())
    assert changed(student_before, method.modules["student"].state_dict())
    assert not changed(teacher_before, method.teacher.state_dict())


def test_odd_generator_batch_is_rejected():
    with pytest.raises(ConfigError, match="even"):
        validate(RDSKDConfig, {"gen_batch": 33})
