"""Making the most of a CPU budget: generator cost and width, samples inside the teacher's input range,
student-side augmentation relabelled by the teacher, stages sharing the time budget, pool refresh and
mining."""

import dataclasses
import itertools
import math

import pytest
import torch

import dfkt
from dfkt import losses
from dfkt.config import EngineConfig
from dfkt.data.augment import AUGMENTATIONS, augment_batch, gaussian_blur, mirror_safe
from dfkt.dfkd.base import DistillSetup
from dfkt.dfkd.rdskd import RDSKD, RDSKDConfig, within_room
from dfkt.dfkd.student import disagreement_ascent
from dfkt.engine import Engine, Stage
from dfkt.engine import engine as engine_module
from dfkt.engine.state import TrainState
from dfkt.errors import ConfigError
from dfkt.models import build_generator, build_model
from dfkt.models.cost import multiply_adds
from dfkt.models.files import load_model
from dfkt.registry import METHODS
from dfkt.synthesis import ImagePool, PixelInversion
from tests.conftest import FAST_ENGINE

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)


def test_multiply_adds_of_the_dafl_generator_counted_by_hand():
    """fc 100→128·8·8, then convs 128→128 at 16×16, 128→64 at 32×32, 64→1 at 32×32 (3×3 kernels)."""
    by_hand = 100 * 128 * 64 + 16 * 16 * 128 * 128 * 9 + 32 * 32 * 64 * 128 * 9 + 32 * 32 * 1 * 64 * 9
    assert multiply_adds(build_generator("dafl", 100, 1, 32), torch.zeros(1, 100)) == by_hand  # 114.7M
    narrow = 100 * 32 * 64 + 16 * 16 * 32 * 32 * 9 + 32 * 32 * 16 * 32 * 9 + 32 * 32 * 1 * 16 * 9
    assert (
        multiply_adds(build_generator("dafl", 100, 1, 32, width=32), torch.zeros(1, 100)) == narrow
    )  # 7.4M, 15x cheaper


@pytest.mark.parametrize("output", ["pixels", "clamped"])
def test_in_range_outputs_stay_inside_the_teachers_input_range(output):
    torch.manual_seed(0)
    low, high = -FMNIST_MEAN[0] / FMNIST_STD[0], (1 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    in_range = build_generator("dafl", 16, 1, 32, width=16, output=output, mean=FMNIST_MEAN, std=FMNIST_STD)
    authors = build_generator("dafl", 16, 1, 32, width=16)
    in_range.load_state_dict(authors.state_dict(), strict=False)  # pixels: all but the last BatchNorm
    z = torch.randn(256, 16) * 5
    x = in_range(z)
    assert x.min() >= low - 1e-5 and x.max() <= high + 1e-5
    assert x.max() - x.min() > 0.1 * (high - low)  # not a constant image
    y = authors(z)  # the authors' tanh + BatchNorm standardises: far outside the real range
    assert y.min() < low - 1 or y.max() > high + 1
    if output == "clamped":  # the authors' image wherever it was already in range
        inside = (y >= low) & (y <= high)
        assert torch.equal(x[inside], y[inside]) and inside.float().mean() > 0.5


@pytest.mark.parametrize("generator", ["dafl", "deep"])
def test_a_smoothing_generator_ends_in_the_blur_of_its_images_and_stays_in_range(generator):
    torch.manual_seed(0)
    low, high = -FMNIST_MEAN[0] / FMNIST_STD[0], (1 - FMNIST_MEAN[0]) / FMNIST_STD[0]
    options = {"width": 32, "output": "clamped", "mean": FMNIST_MEAN, "std": FMNIST_STD}
    sharp = build_generator(generator, 16, 1, 32, **options).eval()
    smooth = build_generator(generator, 16, 1, 32, smoothing=1.0, **options).eval()
    smooth.load_state_dict(sharp.state_dict())
    z = torch.randn(8, 16)
    x, y = sharp(z), smooth(z)
    assert torch.allclose(y, gaussian_blur(x, torch.ones(8), radius=2), atol=1e-5)
    assert y.min() >= low - 1e-5 and y.max() <= high + 1e-5
    roughness = [float(losses.total_variation(images)) for images in (x, y)]
    assert roughness[1] < 0.7 * roughness[0], roughness
    with pytest.raises(ConfigError, match="σ"):
        build_generator(generator, 16, 1, 32, smoothing=-1.0, **options)
    side = {"dafl": 4, "deep": 16}[generator]  # each one's smallest image
    with pytest.raises(ConfigError, match=f"σ below {side // 2}"):  # a window of 2σ either way cannot reflect-pad it
        build_generator(generator, 16, 1, side, smoothing=side / 2, **options)


def test_rdskd_gen_smoothing_reaches_its_generator(digits_teacher):
    method = RDSKD(_tiny_pool_config(gen_output="clamped", gen_smoothing=0.5), _setup(digits_teacher, mirror=False))
    assert [m.smoothing for m in method.generator.modules() if hasattr(m, "smoothing")] == [0.5]


@pytest.mark.parametrize("output", ["pixels", "clamped"])
def test_in_range_outputs_need_the_normalisation(output):
    with pytest.raises(ConfigError, match="mean and std"):
        build_generator("dafl", 16, 1, 32, output=output)


def test_augmentations_pad_with_black_and_mix_within_range():
    rng = torch.Generator().manual_seed(0)
    black = torch.tensor([-FMNIST_MEAN[0] / FMNIST_STD[0]])
    blank = black.view(1, 1, 1, 1).expand(16, 1, 32, 32).clone()
    for kinds in (["shift"], ["rotate", "scale"], ["blur", "brightness"], list(AUGMENTATIONS)):
        assert torch.allclose(augment_batch(blank, kinds, rng, fill=black), blank, atol=1e-5), kinds
    images = torch.rand(16, 1, 32, 32)
    mixed = augment_batch(images, ["mixup"], rng)
    assert mixed.min() >= images.min() - 1e-6 and mixed.max() <= images.max() + 1e-6
    assert not torch.allclose(mixed, images)
    cut = augment_batch(images, ["cutmix"], rng)
    # every pixel of a cutmix image comes from one of the batch's images at the same position
    assert ((cut[:, None] - images[None]).abs() < 1e-6).any(dim=1).all()
    flipped = augment_batch(images, ["flip"], rng)
    same = [torch.equal(f, i) for f, i in zip(flipped, images)]
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


def test_blur_smooths_each_image_by_its_own_sigma_and_brightness_stays_between_black_and_white():
    rng = torch.Generator().manual_seed(0)
    images = torch.rand(8, 2, 16, 16)
    assert torch.allclose(gaussian_blur(images, torch.zeros(8)), images)
    blurred = gaussian_blur(images[:1].expand(5, -1, -1, -1), torch.linspace(0, 1, 5))  # one image, five sigmas
    roughness = (blurred.diff(dim=-1).abs().mean((1, 2, 3))).tolist()
    assert all(a > b for a, b in zip(roughness, roughness[1:]))  # a larger sigma, a smoother image
    assert torch.allclose(blurred.mean((2, 3)), images[:1].mean((2, 3)), atol=0.02)  # the kernel sums to 1
    black, white = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 1.5])
    pixels = black.view(1, 2, 1, 1) + (0.1 + 0.9 * images) * (white - black).view(1, 2, 1, 1)  # none at black
    bright = augment_batch(pixels, ["brightness"], rng, fill=black, max_brightness=0.4, high=white)
    assert (bright >= black.view(1, 2, 1, 1) - 1e-6).all() and (bright <= white.view(1, 2, 1, 1) + 1e-6).all()
    ratio = (bright - black.view(1, 2, 1, 1)) / (pixels - black.view(1, 2, 1, 1))
    unclipped = bright < white.view(1, 2, 1, 1) - 1e-6
    factors = torch.where(unclipped, ratio, torch.nan).nanmean((1, 2, 3))
    assert ((factors > 0.6 - 1e-4) & (factors < 1.4 + 1e-4)).all() and factors.std() > 0.05
    per_image = torch.where(unclipped, ratio, factors.view(-1, 1, 1, 1)) - factors.view(-1, 1, 1, 1)
    assert per_image.abs().max() < 1e-4  # one factor for the whole image, both channels


def test_the_students_brightened_batches_stay_in_the_teachers_input_range(digits_teacher):
    method = _pool_drawn(RDSKD(_tiny_pool_config(augment=["brightness"]), _setup(digits_teacher, mirror=False)))
    images, _ = method.student_trainer.batch()
    black, white = method.student_trainer.pixel_range
    assert (images >= black - 1e-6).all() and (images <= white + 1e-6).all()
    assert images.amax() > black + 0.5 and images.amin() < white - 0.5  # neither all black nor all white
    with pytest.raises(ConfigError, match="student_data=pool"):
        RDSKD(RDSKDConfig(pool_balance=True), _setup(digits_teacher, mirror=False))


def test_the_students_blur_follows_augment_blur(digits_teacher):
    """A vanishing largest sigma leaves the pool's images as drawn; sigma up to 1 pixel changes them."""
    for largest, unchanged in ((1e-6, True), (1.0, False)):
        cfg = _tiny_pool_config(augment=["blur"], augment_blur=largest)
        method = _pool_drawn(RDSKD(cfg, _setup(digits_teacher, mirror=False)))
        state = method.rngs["student"].get_state()
        images, _ = method.student_trainer.batch()
        method.rngs["student"].set_state(state)  # the same draw from the pool, before the blur
        drawn, _ = method.pool.sample(16, method.rngs["student"])
        assert torch.allclose(images, drawn, atol=1e-5) == unchanged, largest


def _setup(digits_teacher, mirror: bool, precision: str = "32-true") -> DistillSetup:
    engine = Engine(EngineConfig(precision=precision, progress=False))
    teacher = engine.prepare(load_model(digits_teacher)[0], trainable=False)
    student = engine.prepare(build_model("digits_cnn_half", 10, 1, 8), trainable=True)
    return DistillSetup(teacher, student, 10, 1, 8, engine, (0.3,), (0.4,), mirror)


def _tiny_pool_config(**settings) -> RDSKDConfig:
    """RDSKD on a pool, small enough for a test: one generator epoch of 2 steps, batches of 16, a pool of 32;
    ``settings`` override any of these."""
    base = dict(gen_batch=16, gen_epochs=1, gen_steps_per_epoch=2, student_batch=16, student_data="pool", pool_size=32)
    return RDSKDConfig(**{**base, **settings})


def _pool_drawn(method: RDSKD) -> RDSKD:
    """``method`` after one generator step and its pool drawn, ready for student batches."""
    method.stages()[0].step(0)
    method.fill_pool()
    return method


def test_flip_only_on_mirror_safe_data_and_the_teacher_labels_what_the_student_sees(digits_teacher):
    assert mirror_safe("fmnist") and not mirror_safe("digits") and not mirror_safe("mnist")
    cfg = _tiny_pool_config(augment=["shift", "flip", "mixup"])
    digits = RDSKD(cfg, _setup(digits_teacher, mirror=False))
    assert digits.student_trainer.augmentations == ["shift", "mixup"]
    clothes = RDSKD(cfg, _setup(digits_teacher, mirror=True))
    assert clothes.student_trainer.augmentations == ["shift", "flip", "mixup"]
    _pool_drawn(clothes)
    images, logits = clothes.student_trainer.batch()
    with torch.no_grad():
        assert torch.allclose(logits, clothes.teacher(images), atol=1e-5)  # relabelled, not the cached pool logits


def test_without_relabelling_the_pools_stored_logits_label_the_augmented_batch(digits_teacher):
    """augment_relabel=false: no teacher forward in the student's batch, and the logits are the pool's own for
    the images before their shift; mixing needs the teacher, so it is refused without relabelling."""
    cfg = _tiny_pool_config(augment=["shift"], augment_relabel=False)
    method = _pool_drawn(RDSKD(cfg, _setup(digits_teacher, mirror=False)))
    calls = []
    hook = method.teacher.register_forward_hook(lambda *_: calls.append(1))
    state = method.rngs["student"].get_state()
    images, logits = method.student_trainer.batch()
    hook.remove()
    assert not calls
    method.rngs["student"].set_state(state)  # the same draw from the pool, before augmentation
    unshifted, stored = method.pool.sample(16, method.rngs["student"])
    assert torch.equal(logits, stored) and not torch.equal(images, unshifted)
    for changed in ("cutmix", "blur", "brightness"):
        with pytest.raises(ValueError, match="augment_relabel=true"):
            RDSKDConfig(augment=["shift", changed], augment_relabel=False)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # mixed: Fabric refuses a bare autograd.grad
def test_adversarial_samples_raise_the_disagreement_stay_in_range_and_leave_weights_alone(digits_teacher, precision):
    """A share of each student batch is moved to where the student disagrees with the teacher; the
    teacher labels the moved images; the student's weights and gradients are untouched by the move."""
    cfg = _tiny_pool_config(adversarial_steps=3, adversarial_step_size=0.1, adversarial_share=0.5)
    method = _pool_drawn(RDSKD(cfg, _setup(digits_teacher, mirror=False, precision=precision)))
    trainer, student, teacher = method.student_trainer, method.student, method.teacher
    clean, _ = method.pool.sample(16, torch.Generator().manual_seed(0))
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    with method.engine.autocast():  # as in the student's step
        moved = trainer.adversarial(clean)
    assert all(p.grad is None for p in student.parameters())
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in weights.items())
    low, high = trainer.pixel_range
    assert (moved >= low - 1e-6).all() and (moved <= high + 1e-6).all()
    with method.student_as_judge():  # 1.5 units in all: more than most pixels' margin to the range's edge
        far = disagreement_ascent(clean, teacher, student, 3, 0.5, trainer.pixel_range, method.engine.input_gradient)
    assert (far >= low - 1e-6).all() and (far <= high + 1e-6).all()
    assert torch.equal(moved[8:], clean[8:]) and not torch.equal(moved[:8], clean[:8])  # half of the batch
    with torch.no_grad():
        before = losses.kl_per_sample(teacher(clean[:8]), student(clean[:8]))
        after = losses.kl_per_sample(teacher(moved[:8]), student(moved[:8]))
    assert after.mean() > 2 * before.mean()
    images, logits = trainer.batch()
    with torch.no_grad():
        assert torch.allclose(logits, teacher(images), atol=1e-5)  # the teacher labels the moved images


def test_old_augment_switch_still_reads():
    assert RDSKDConfig(augment=True).augment == ["shift", "flip"]
    assert RDSKDConfig(augment=False).augment == []
    assert RDSKDConfig(augment="rotate, cutmix").augment == ["rotate", "cutmix"]
    with pytest.raises(ValueError, match="augment.0\n.*'shift', 'flip', 'rotate'.*input_value='solarize'"):
        RDSKDConfig(augment=["solarize"])


def test_a_stage_with_a_budget_share_hands_over_to_the_next(monkeypatch, tmp_path):
    """A fake clock: each step takes one second. The generator stage may use 30% of a 20 s budget."""
    clock = itertools.count()
    now = [0.0]
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: now[0])

    def slow(i):
        now[0] += 1.0
        next(clock)
        return {}

    engine = Engine(EngineConfig(precision="32-true", progress=False, checkpoint_every=1000), tmp_path)
    state = TrainState(engine.device)
    left_at_begin = []  # what a stage's one-off work (RDSKD's pool) may size itself to
    stages = [
        Stage("generator", 100, slow, budget_share=0.3),
        Stage("student", 100, slow, begin=lambda: left_at_begin.append(engine.budget_left)),
    ]
    result = engine.run(stages, state, {}, max_seconds=20)
    assert left_at_begin == [pytest.approx(20 - result.seconds["generator"])]
    assert result.seconds["generator"] == pytest.approx(6, abs=1)
    assert result.seconds["student"] == pytest.approx(14, abs=1)
    assert result.stopped_by_budget
    engine.close()


def test_a_budget_shorter_than_the_generator_stage_still_yields_a_student(digits_teacher, tmp_path, monkeypatch):
    """A sweep of 25 s trials used to lose RDSKD runs whose generator stage alone outlasted the budget.
    A fake clock (5 ms per reading) makes the step counts independent of the machine's load."""
    clock = itertools.count()
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: next(clock) * 0.005)
    params = {
        "gen_batch": 64,
        "gen_epochs": 1000,
        "student_batch": 64,
        "pool_size": 256,
        "gen_budget_share": 0.4,
        "gen_width": 32,
    }
    summary = dfkt.distill(
        "rdskd",
        digits_teacher,
        preset="cpu",
        max_seconds=6,
        out=tmp_path,
        overrides=FAST_ENGINE + [f"params.{k}={v}" for k, v in params.items()],
    )
    assert summary["seconds"]["by_stage"]["generator"] < 0.4 * 6 + 1
    assert summary["seconds"]["by_stage"]["student"] > 1
    assert summary["student_acc"] > 0.5
    assert summary["generator_multiply_adds_per_image"] == multiply_adds(
        build_generator("dafl", 100, 1, 8, width=32), torch.zeros(1, 100)
    )


def test_the_pool_is_drawn_within_its_share_of_the_budget_left(digits_teacher, monkeypatch):
    """A fake clock, one second per reading: with 10 s left the pool may take 2.5 s. The first chunk is drawn
    whatever the time; the clock then reads 1 and 2 (two more chunks), then 3: three of four chunks."""
    from dfkt.dfkd import rdskd

    clock = itertools.count()
    monkeypatch.setattr(rdskd.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(rdskd, "POOL_CHUNK", 16)  # small chunks keep the test quick
    assert rdskd.POOL_FILL_SHARE == 0.25
    cfg = RDSKDConfig(gen_width=32, student_data="pool", pool_size=4 * rdskd.POOL_CHUNK)
    method = RDSKD(cfg, _setup(digits_teacher, mirror=False))
    method.engine.budget_left = 10.0
    method.fill_pool()
    assert method.pool.size == 3 * rdskd.POOL_CHUNK
    method.fill_pool()  # as a resume does: the checkpoint's pool stays as it was drawn
    assert method.pool.size == 3 * rdskd.POOL_CHUNK
    images, _ = method.pool.sample(8, torch.Generator().manual_seed(0))
    assert images.shape == (8, 1, 8, 8)

    unbudgeted = RDSKD(cfg, _setup(digits_teacher, mirror=False))
    unbudgeted.engine.budget_left = None
    unbudgeted.fill_pool()
    assert unbudgeted.pool.full


def test_within_room_keeps_each_class_up_to_its_room_in_order():
    room = torch.tensor([2, 1, 5])
    keep = within_room(torch.tensor([0, 0, 1, 0, 2, 1]), room)
    assert keep.tolist() == [True, True, True, False, True, False] and room.tolist() == [0, 0, 4]


class CyclingTeacher(torch.nn.Module):
    """Calls the n-th image it sees class ``pattern[n % len(pattern)]``."""

    def __init__(self, pattern: list[int]):
        super().__init__()
        self.pattern, self.seen = torch.tensor(pattern), 0

    def forward(self, images):
        labels = self.pattern[torch.arange(self.seen, self.seen + len(images)) % len(self.pattern)]
        self.seen += len(images)
        return 10 * torch.nn.functional.one_hot(labels, 10).float()


@pytest.mark.parametrize(
    "balance, pattern, draws, per_class, candidates",
    [
        (False, [0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9], 4, [8, 4] + [1] * 8, 20),
        (True, [0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9], 4, [2] * 10, 40),
        # class 9 never drawn: after 2 candidates per image the last 2 places take the next images as drawn
        (True, [0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8], 2, [4, 2, 2, 2, 2, 2, 2, 2, 2, 0], 42),
    ],
)
def test_a_balanced_pool_holds_every_class_alike_while_its_candidates_last(
    digits_teacher, monkeypatch, balance, pattern, draws, per_class, candidates
):
    from dfkt.dfkd import rdskd

    monkeypatch.setattr(rdskd, "POOL_CHUNK", 40)
    monkeypatch.setattr(rdskd, "BALANCE_DRAWS", draws)
    method = RDSKD(_tiny_pool_config(pool_size=20, pool_balance=balance), _setup(digits_teacher, mirror=False))
    method.teacher = CyclingTeacher(pattern)
    events = []
    monkeypatch.setattr(method.engine.metrics, "write", events.append)
    method.fill_pool()
    counts = torch.bincount(method.pool.state.buffers["pool.logits"].argmax(1), minlength=10)
    (drawn,) = [e for e in events if e.get("event") == "pool drawn"]
    assert method.pool.full and counts.tolist() == drawn["per_class"] == per_class
    assert drawn["candidates"] == candidates


def test_a_confident_pool_keeps_what_the_teacher_is_sure_of_while_its_candidates_last(digits_teacher, monkeypatch):
    """Every other image is a sure 3, the rest a 0.6/0.4 split between 5 and 7: a threshold of 0.9 keeps the
    sure ones for 2 candidates per image, then the rest as drawn."""
    from dfkt.dfkd import rdskd

    class HalfSure(torch.nn.Module):
        def forward(self, images):
            sure = torch.nn.functional.one_hot(torch.full((len(images),), 3), 10) * 20.0
            unsure = torch.full((len(images), 10), -30.0)
            unsure[:, 5], unsure[:, 7] = math.log(0.6), math.log(0.4)
            return torch.where((torch.arange(len(images)) % 2 == 0)[:, None], sure, unsure)

    monkeypatch.setattr(rdskd, "POOL_CHUNK", 20)
    monkeypatch.setattr(rdskd, "BALANCE_DRAWS", 2)
    method = RDSKD(_tiny_pool_config(pool_size=30, pool_min_confidence=0.9), _setup(digits_teacher, mirror=False))
    method.teacher = HalfSure()
    method.fill_pool()
    labels = method.pool.state.buffers["pool.logits"].argmax(1)
    assert method.pool.full and labels[:30].tolist() == [3] * 30  # 60 candidates, 30 sure
    with pytest.raises(ConfigError, match="student_data=pool"):
        RDSKD(RDSKDConfig(pool_min_confidence=0.5), _setup(digits_teacher, mirror=False))


def test_a_generator_that_keeps_training_refreshes_the_pool_with_its_own_batches(digits_teacher):
    cfg = _tiny_pool_config(pool_size=64, gen_train_every=2, gen_width=32)
    method = RDSKD(cfg, _setup(digits_teacher, mirror=False))
    generator_stage, student_stage = method.stages()
    assert method.generator in student_stage.train and method.generator not in student_stage.frozen
    for module in student_stage.train:
        module.train()
    student_stage.begin()
    assert method.pool.added == 64
    before = [p.detach().clone() for p in method.generator.parameters()]
    steps_seen = []
    original_step = method.generator_step
    method.generator_step = lambda i: steps_seen.append(i) or original_step(i)
    for i in range(4):  # generator steps at student steps 0 and 2
        student_stage.step(i)
    assert steps_seen == [2, 3]  # the generator stage's two steps, counted on
    assert any(not torch.equal(a, b) for a, b in zip(before, method.generator.parameters()))
    latest_images, latest_logits = method.source.latest
    assert method.pool.added == 64 + 2 * 16
    assert torch.equal(method.buffers["pool.images"][16:32], latest_images.float())  # ring: rows 0-31 replaced
    assert torch.allclose(method.buffers["pool.logits"][16:32], method.teacher(latest_images).float(), atol=1e-5)


def test_a_training_generator_needs_a_pool_without_other_refresh(digits_teacher):
    with pytest.raises(ConfigError, match="gen_train_every needs params.student_data=pool"):
        RDSKD(RDSKDConfig(gen_train_every=2), _setup(digits_teacher, mirror=False))
    with pytest.raises(ConfigError, match="pool_refresh=0"):
        RDSKD(RDSKDConfig(gen_train_every=2, student_data="pool", pool_refresh=8), _setup(digits_teacher, mirror=False))


def test_pool_refresh_replaces_images_and_mining_keeps_the_hardest(digits_teacher):
    cfg = _tiny_pool_config(pool_size=64, pool_refresh=8, pool_mining=4)
    method = RDSKD(cfg, _setup(digits_teacher, mirror=False))
    method.fill_pool()
    pool = method.student_trainer.source
    candidates = torch.randn(32, 1, 8, 8)
    method.source.sample = lambda n, rng: (candidates[:n], None)
    with torch.no_grad(), method.engine.eval_mode(method.student):  # as mining judges: running statistics
        gap = losses.kl_per_sample(method.teacher(candidates), method.student(candidates), cfg.temperature)
    pool.synthesize()
    newest = method.buffers["pool.images"][:8]  # the ring buffer wrapped: rows 0-7 were the oldest
    assert method.pool.added == 64 + 8
    assert {tuple(x.flatten().tolist()) for x in newest} == {
        tuple(candidates[k].flatten().tolist()) for k in gap.topk(8).indices
    }


def test_pixel_inversion_clamps_into_the_range(digits_teacher):
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    teacher = engine.prepare(load_model(digits_teacher)[0], trainable=False)
    state = TrainState(engine.device)
    low, high = torch.full((1, 1, 1, 1), -0.5), torch.full((1, 1, 1, 1), 1.5)

    def push_out(images, targets):
        return {"loss": -(images**2).mean() * 100}

    inversion = PixelInversion(
        state,
        engine,
        teacher,
        ImagePool(state, 16),
        push_out,
        lambda n, r: None,
        (1, 8, 8),
        16,
        5,
        1.0,
        (0.5, 0.99),
        0,
        False,
        pixel_range=(low, high),
    )
    inversion.synthesize()
    images = state.buffers["pool.images"]
    assert images.min() >= -0.5 - 1e-6 and images.max() <= 1.5 + 1e-6
    assert (images == -0.5).any() and (images == 1.5).any()  # it did push out, and was held


def test_cosine_student_lr_anneals_over_the_time_left(monkeypatch, tmp_path, digits_teacher):
    """With a budget the cosine schedule follows the time the student stage can have, not its step count."""
    now = [0.0]
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: now[0])
    cfg = _tiny_pool_config(gen_steps_per_epoch=4, student_epochs=1000, lr_schedule="cosine")
    method = RDSKD(cfg, _setup(digits_teacher, mirror=False))
    engine = method.engine
    lrs = []
    stages = method.stages()
    for stage in stages:
        step = stage.step

        def timed(i, step=step, name=stage.name):
            now[0] += 1.0
            out = step(i)
            if name == "student":
                lrs.append(method.student_trainer.optimizer.param_groups[0]["lr"])
            return out

        stage.step = timed
    engine.run(stages, method, {}, max_seconds=24)  # 4 s of generator, then 20 s of student steps
    assert lrs[0] == pytest.approx(cfg.student_lr)
    assert lrs[9] == pytest.approx(cfg.student_lr * 0.5 * (1 + math.cos(math.pi * 9 / 20)), rel=0.02)
    assert lrs[-1] < 0.02 * cfg.student_lr and len(lrs) == 20


def test_list_params_shows_each_setting_its_presets_and_meaning(capsys):
    from dfkt.cli import main

    assert main(["list", "params", "rdskd"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert "cpu" in header and "paper" in header
    assert any(r.startswith("gen_width") and "channels of the generator" in r for r in rows)
    assert len(rows) == len(RDSKDConfig.model_fields)
    assert main(["list", "params"]) == 2
    assert "dfkt list params METHOD" in capsys.readouterr().err


def test_a_tiny_teachers_student_stage_runs_in_fp32_even_under_bf16(digits_teacher):
    """Fabric-wrapped students cast their inputs to bf16 by themselves; full_precision() undoes that."""
    engine = Engine(EngineConfig(precision="bf16-mixed", progress=False))
    teacher = engine.prepare(load_model(digits_teacher)[0], trainable=False)
    student = engine.prepare(build_model("digits_cnn_half", 10, 1, 8), trainable=True)
    setup = DistillSetup(teacher, student, 10, 1, 8, engine, (0.3,), (0.4,))
    seen = []
    inner = student.module  # the wrapper casts its outputs back to fp32; look inside
    inner.register_forward_hook(lambda m, inputs, out: seen.append(out.dtype))
    x = torch.randn(4, 1, 8, 8)
    student(x)
    with engine.full_precision():
        student(x)
        with engine.autocast():  # an explicit autocast inside still applies
            student(x)
    student(x)
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]
    cfg = RDSKDConfig(gen_batch=16, student_batch=16, student_data="pool", pool_size=32, student_precision="auto")
    assert RDSKD(cfg, setup).student_trainer.stage([], []).autocast is False  # digits_cnn: well under 5M
    assert (
        RDSKD(cfg.model_copy(update={"student_precision": "engine"}), setup).student_trainer.stage([], []).autocast
        is True
    )


def test_student_precision_32_given_on_the_command_line_is_accepted():
    """`--set params.student_precision=32` reads as the number 32, which the setting takes as its text "32"."""
    from dfkt.config import apply_overrides, validate

    raw = apply_overrides({}, ["params.student_precision=32"])["params"]
    assert raw == {"student_precision": 32}
    assert validate(RDSKDConfig, raw).student_precision == "32"
    with pytest.raises(ConfigError, match="student_precision"):
        validate(RDSKDConfig, {"student_precision": 16})


def test_a_generator_ensemble_gives_each_member_its_own_chunk_of_the_batch():
    from dfkt.models.generator import GeneratorEnsemble

    torch.manual_seed(0)
    members = [build_generator("dafl", 8, 1, 8, width=8) for _ in range(3)]
    ensemble = GeneratorEnsemble(members).eval()
    z = torch.randn(9, 8)
    with torch.no_grad():
        out = ensemble(z)
        assert torch.allclose(out[3:6], members[1](z[3:6])) and torch.allclose(out[6:], members[2](z[6:]))
    # the cost of one image is one member's
    assert multiply_adds(ensemble, torch.zeros(1, 8)) == multiply_adds(members[0], torch.zeros(1, 8))


def test_deepinversion_flips_while_inverting_only_mirror_safe_data(digits_teacher):
    from dfkt.dfkd.deepinversion import DeepInversion, DeepInversionConfig

    cfg = DeepInversionConfig(synthesis_batch=8, pool_size=32)
    assert DeepInversion(cfg, _setup(digits_teacher, mirror=False)).source.flip is False
    assert DeepInversion(cfg, _setup(digits_teacher, mirror=True)).source.flip is True


@pytest.mark.parametrize("name", ["deepinversion", "zskd"])
def test_pixel_methods_downscale_optimises_images_a_fraction_of_the_teachers_side(digits_teacher, name):
    """``downscale`` is ``resolution`` relative to the teacher, never below 8 pixels a side (so 8×8 digits stay
    whole), and the two cannot be set together; every pixel-inversion method takes them, and its start and
    rescaling, to its source."""
    method = METHODS.get(name)

    def source(image_size=8, **params):
        cfg = method.Config(synthesis_batch=8, pool_size=32, start="dark", standardise=True, **params)
        setup = dataclasses.replace(_setup(digits_teacher, mirror=False), image_size=image_size)
        return method(cfg, setup).source

    def latent_side(image_size=8, **params):
        return source(image_size, **params).latent_shape[-1]

    assert (source().start, source().standardise) == ("dark", True)

    assert (
        latent_side(32),
        latent_side(32, downscale=2),
        latent_side(32, downscale=3),
        latent_side(64, downscale=16),
    ) == (32, 16, 10, 8)
    assert (latent_side(downscale=2), latent_side(resolution=3)) == (8, 3)
    with pytest.raises(ConfigError, match="not both"):
        latent_side(resolution=4, downscale=2)


@pytest.mark.parametrize("share, budget, syntheses", [(None, 100.0, 12), (0.5, 100.0, 4), (0.5, None, 12)])
def test_synthesis_share_skips_due_syntheses_once_synthesis_has_had_its_share(
    digits_teacher, monkeypatch, share, budget, syntheses
):
    """A fake clock: a synthesis takes 3 s and a student step 1 s. Every step is due; with a share of one half
    and a time budget, step 0 synthesizes (nothing spent yet), then one step in three does (3 s of 6 per three
    steps). Without a budget (fixed steps) the share is ignored, so timing cannot change what the run trains."""
    from dfkt.dfkd.deepinversion import DeepInversion, DeepInversionConfig

    clock = [0.0]
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: clock[0])
    cfg = DeepInversionConfig(
        synthesis_batch=8, synthesis_iterations=1, student_batch=8, student_steps_per_synthesis=1, pool_size=64
    )
    method = DeepInversion(cfg.model_copy(update={"synthesis_share": share}), _setup(digits_teacher, mirror=False))
    method.engine.max_seconds = budget  # as Engine.run sets it
    trainer, synthesize, batch = method.student_trainer, method.source.synthesize, method.student_trainer.batch
    calls = []

    def slow_synthesis():
        calls.append(1)
        clock[0] += 3.0
        return synthesize()

    def slow_batch():
        clock[0] += 1.0
        return batch()

    monkeypatch.setattr(method.source, "synthesize", slow_synthesis)
    monkeypatch.setattr(trainer, "batch", slow_batch)
    for i in range(12):
        trainer.step(i)
    assert len(calls) == syntheses
    sections = method.engine.sections
    assert sections == {"synthesis": 3.0 * syntheses, "distillation": 12.0}


def test_deepinversion_target_mix_aims_a_share_of_each_batch_between_two_classes(digits_teacher):
    from dfkt.dfkd.deepinversion import DeepInversion, DeepInversionConfig

    cfg = DeepInversionConfig(synthesis_batch=16, synthesis_iterations=2, pool_size=64, target_mix=0.5)
    method = DeepInversion(cfg, _setup(digits_teacher, mirror=False))
    targets = method.random_labels(16, torch.Generator().manual_seed(0))
    assert targets.shape == (16, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(16))
    classes = (targets > 0).sum(dim=1)
    assert classes[:8].tolist() == [2] * 8 and classes[8:].tolist() == [1] * 8
    top = targets[:8].max(dim=1).values
    assert bool(((top >= 0.5) & (top < 1)).all())
    method.source.synthesize()  # the inversion's cross-entropy takes the probability targets
    assert method.pool.size > 0

    plain = DeepInversion(cfg.model_copy(update={"target_mix": 0.0}), _setup(digits_teacher, mirror=False))
    assert plain.random_labels(16, torch.Generator().manual_seed(0)).dtype == torch.long


def test_rdskd_gen_augment_shows_the_teacher_moved_images(digits_teacher):
    """With gen_augment the generator's loss is computed on shifted images (flips only where mirror-safe), and
    the logits of those moved views never label the images as drawn."""
    assert RDSKDConfig(gen_augment="shift,flip").gen_augment == ["shift", "flip"]  # as --set gives it
    seen = []
    for kinds, mirror in (([], False), (["shift"], False), (["shift", "flip"], False), (["flip"], True)):
        method = RDSKD(_tiny_pool_config(gen_augment=kinds), _setup(digits_teacher, mirror=mirror))
        hook = method.teacher.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
        images = torch.randn(16, 1, 8, 8)
        terms = method.objective(images, torch.zeros(16, method.cfg.nz))
        hook.remove()
        assert ("teacher_logits" in terms) == (not kinds), kinds
        assert torch.allclose(seen[-1], images, atol=1e-5) == (not kinds), kinds
        assert method.gen_augment == [kind for kind in kinds if kind != "flip" or mirror]
        assert ("gen_augment" in method.rngs) == bool(method.gen_augment)  # a stream in the checkpoint only if used
        if kinds == ["flip"]:
            flipped = [torch.allclose(seen[-1][i], images[i].flip(2), atol=1e-5) for i in range(16)]
            kept = [torch.allclose(seen[-1][i], images[i], atol=1e-5) for i in range(16)]
            assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_rdskd_gen_augment_with_a_generator_that_keeps_training_labels_its_images_as_drawn(digits_teacher):
    """gen_train_every puts each generator batch in the pool: with gen_augment the teacher's logits of the moved
    views are not those of the images, so the pool gets the teacher's logits on the images as drawn."""
    method = _pool_drawn(
        RDSKD(_tiny_pool_config(gen_train_every=1, gen_augment=["shift"]), _setup(digits_teacher, mirror=False))
    )
    start = method.pool.added % method.pool.capacity
    method.student_trainer.source.synthesize()
    rows = (torch.arange(16) + start) % method.pool.capacity  # where the generator's batch of 16 went
    images, logits = method.buffers["pool.images"][rows], method.buffers["pool.logits"][rows]
    with torch.no_grad():
        assert torch.allclose(logits, method.teacher(images).float(), atol=1e-4)
