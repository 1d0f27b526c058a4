"""Presets that are the authors' recipes (issue 14): SHOT's object recipe, AaD's Office-31 schedule, the
source recipe of SHOT's digit code, and B4's corruptions at MNIST-C's parameters. Untrained models on
random images, and small image batches: seconds."""

import math

import pytest
import torch
from torch import nn

from dfkt.config import EngineConfig, validate
from dfkt.engine import Engine
from dfkt.models import build_model
from dfkt.registry import ADAPT_METHODS
from dfkt.sfda.base import AdaptSetup

DROPOUT = nn.modules.dropout._DropoutNd


def make(method: str, preset: str, n: int = 96, size: int = 32, **params):
    torch.manual_seed(0)
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    model = engine.prepare(build_model("shot_lenet", 10, 1, size), trainable=True)
    cls = ADAPT_METHODS.get(method)
    cfg = validate(cls.Config, {**cls.presets[preset], **params})
    return cls(cfg, AdaptSetup(model, torch.randn(n, 1, size, size), engine))


def run_steps(runner, n: int) -> None:
    """The first ``n`` steps, through the engine (which sets the modes)."""
    for stage in runner.stages():
        stage.steps = min(n, stage.steps)
        stage.evaluate = False
        runner.engine.run([stage], runner, {})


# (a) SHOT's object recipe -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["shot", "shot_im"])
def test_paper_objects_is_the_authors_object_recipe(method):
    runner = make(method, "paper-objects", epochs=2)
    cfg = runner.cfg
    assert (cfg.beta, cfg.lr, cfg.batch_size) == ((0.3 if method == "shot" else 0.0), 0.01, 64)
    assert validate(runner.Config, runner.presets["paper-objects"]).epochs == 15
    assert cfg.bottleneck_dropout is False and cfg.lr_decay is True
    lrs = {g["name"]: g["lr"] for g in runner.optimizers["model"].param_groups}
    assert lrs == pytest.approx({"backbone": 0.001, "bottleneck": 0.01})  # the head stays frozen
    # The digit recipe ('paper') keeps one lr and the bottleneck's dropout.
    digits = make(method, "paper", epochs=2)
    assert digits.cfg.bottleneck_dropout is True
    assert {g["name"]: g["lr"] for g in digits.optimizers["model"].param_groups} == pytest.approx(
        {"backbone": 0.01, "bottleneck": 0.01}
    )


@pytest.mark.parametrize("preset, bottleneck_drops", [("paper-objects", False), ("paper", True)])
def test_object_recipe_turns_the_bottleneck_dropout_off_in_the_training_step(preset, bottleneck_drops):
    runner = make("shot", preset, epochs=1)
    model = runner.model
    bottleneck, extractor = model.backbone.dropout, model.backbone.extractor[4]
    assert isinstance(bottleneck, nn.Dropout) and isinstance(extractor, nn.Dropout2d)
    seen = []
    for name, layer in (("bottleneck", bottleneck), ("extractor", extractor)):
        layer.register_forward_hook(lambda m, i, o, name=name: seen.append((name, m.training, len(i[0]))))
    run_steps(runner, 2)
    step = [(name, training) for name, training, n in seen if n < 96]  # not the clustering pass over all 96
    assert ("bottleneck", bottleneck_drops) in step and ("bottleneck", not bottleneck_drops) not in step
    assert ("extractor", True) in step and ("extractor", False) not in step  # the extractor's dropout: SHOT's LeNet
    assert bottleneck.training and extractor.training  # modes as they were after the step


# (c) AaD's schedule -------------------------------------------------------------------------------


def dispersion_weights(runner, steps: int) -> list[float]:
    """λ_t of AaD's loss at each of the first ``steps`` steps, read back from the loss it optimises."""
    weights = []
    original = runner.loss

    def spy(i, index, features, logits):
        terms = original(i, index, features, logits)
        weights.append(((terms["loss"] - terms["attract"]) / terms["disperse"]).item())
        return terms

    runner.loss = spy
    run_steps(runner, steps)
    return weights


def test_aad_presets_keep_the_authors_schedules_and_cpu_is_unchanged():
    cls = ADAPT_METHODS.get("aad")
    office = validate(cls.Config, cls.presets["paper-office31"])
    assert (office.k, office.alpha, office.beta, office.epochs, office.lr, office.weight_decay) == (
        3,
        1.0,
        1.0,
        50,
        1e-3,
        5e-4,
    )
    assert (office.backbone_lr_mult, office.bottleneck_lr_mult, office.head_lr_mult, office.lr_decay) == (
        0.1,
        1.0,
        1.0,
        False,
    )
    visda = validate(cls.Config, cls.presets["paper"])
    assert (visda.k, visda.alpha, visda.beta, visda.lr, visda.backbone_lr_mult) == (5, 1.0, 5.0, 1e-3, 0.1)
    cpu, ablation = (validate(cls.Config, cls.presets[p]) for p in ("cpu", "cpu-office31"))
    assert (cpu.k, cpu.beta) == (5, 5.0)  # the cpu preset is not changed without a measurement
    # The ablation differs from cpu in the neighbours and the schedule only.
    differ = {k for k in cls.Config.model_fields if getattr(cpu, k) != getattr(ablation, k)}
    assert differ == {"k", "beta"} and (ablation.k, ablation.beta) == (3, 1.0)


@pytest.mark.parametrize("preset, beta", [("cpu", 5.0), ("cpu-office31", 1.0)])
def test_aad_dispersion_weight_follows_its_schedule(preset, beta):
    runner = make("aad", preset, n=192, epochs=1)  # 3 steps at batch 64
    total = runner.total_steps
    assert total == 3
    weights = dispersion_weights(runner, total)
    expected = [(1 + 10 * t / total) ** -beta for t in range(total)]
    assert weights == pytest.approx(expected, rel=1e-4)


def test_office31_recipe_keeps_the_lr_constant_and_the_default_decays():
    constant = make("aad", "paper-office31", n=192, epochs=2)
    decaying = make("aad", "paper", n=192, epochs=2)
    lrs = {}
    for name, runner in (("constant", constant), ("decaying", decaying)):
        first = [g["lr"] for g in runner.optimizers["model"].param_groups]
        run_steps(runner, 4)
        lrs[name] = (first, [g["lr"] for g in runner.optimizers["model"].param_groups])
    assert lrs["constant"][0] == pytest.approx([1e-4, 1e-3, 1e-3]) and lrs["constant"][1] == lrs["constant"][0]
    start, after = lrs["decaying"]
    assert after == pytest.approx([lr * (1 + 10 * 4 / 6) ** -0.75 for lr in start])


# (b) The source recipe ----------------------------------------------------------------------------


def test_source_presets_are_shots_digit_recipe_and_the_run_wins():
    from dfkt.config import SourceConfig

    cpu = validate(SourceConfig, {})
    assert (cpu.preset, cpu.batch_size, cpu.epochs, cpu.augment) == ("cpu", 128, 15, False)
    paper = validate(SourceConfig, {"preset": "paper"})
    assert (paper.batch_size, paper.epochs, paper.augment) == (64, 30, False)
    augmented = validate(SourceConfig, {"preset": "paper-augment"})
    assert (augmented.batch_size, augmented.epochs, augmented.augment) == (64, 30, "crop_rotate")
    # SHOT's optimisation, the same in every preset: SGD lr 0.01 with its decay, label smoothing, wd 1e-3.
    for cfg in (cpu, paper, augmented):
        assert (cfg.optimizer, cfg.lr, cfg.lr_schedule, cfg.label_smoothing, cfg.weight_decay) == (
            "sgd",
            0.01,
            "shot",
            0.1,
            1e-3,
        )
    mine = validate(SourceConfig, {"preset": "paper-augment", "epochs": 3, "augment": False})
    assert (mine.batch_size, mine.epochs, mine.augment) == (64, 3, False)
    with pytest.raises(Exception, match="paper-augment"):
        validate(SourceConfig, {"preset": "papr"})


def test_crop_and_rotate_shifts_within_the_padding_and_fills():
    from dfkt.data.augment import crop_and_rotate

    torch.manual_seed(0)
    images = torch.rand(64, 1, 12, 12) + 1.0  # every pixel > the fill
    fill = torch.tensor([-0.5])
    out = crop_and_rotate(images, torch.Generator().manual_seed(0), padding=2, max_degrees=0.0, fill=fill)
    padded = torch.nn.functional.pad(images, [2] * 4, value=-0.5)
    shifts = set()
    for k in range(len(images)):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.allclose(out[k], padded[k, :, dy : dy + 12, dx : dx + 12], atol=1e-6)
        ]
        assert found, k  # a crop of the padded image, filled with the fill
        shifts.add(found[0])
    assert len(shifts) > 10  # shifts vary over the ±2 px both ways


def line_angle(image: torch.Tensor) -> float:
    """The angle in degrees (image x right, y down) of the line of bright pixels through the centre."""
    ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
    centre = (image.shape[-1] - 1) / 2
    dx, dy = xs.float() - centre, ys.float() - centre
    far = (dx**2 + dy**2).argmax()
    return math.degrees(math.atan2(dy[far].item(), dx[far].item()))


def test_crop_and_rotate_rotates_by_up_to_max_degrees_at_the_nearest_pixel():
    from dfkt.data.augment import crop_and_rotate

    image = torch.zeros(1, 1, 41, 41)
    image[0, 0, 20, 20:] = 1.0  # a line from the centre to the right edge: angle 0
    images = image.repeat(200, 1, 1, 1)
    out = crop_and_rotate(images, torch.Generator().manual_seed(1), padding=0, max_degrees=10.0)
    assert set(out.unique().tolist()) <= {0.0, 1.0}  # nearest pixel: no value is interpolated
    angles = [line_angle(o) for o in out]
    assert max(abs(a) for a in angles) <= 10.0 + 2.0  # within ±10 degrees, to a pixel's precision at radius 20
    assert min(angles) < -6 and max(angles) > 6  # both ways, spread over the range


def test_source_training_with_crop_rotate_uses_shots_augmentation(monkeypatch):
    import dfkt.supervised as supervised
    from dfkt.config import SourceConfig

    calls = []

    def spy(images, rng, padding, max_degrees, fill=None):
        calls.append((images.shape[-1], padding, max_degrees, fill.tolist()))
        return images

    monkeypatch.setattr(supervised, "crop_and_rotate", spy)
    engine = Engine(EngineConfig(precision="32-true", progress=False))
    images = torch.rand(40, 1, 32, 32) * 2 - 0.4  # darkest value -0.4 (black, once normalised)
    images[0, 0, 0, 0] = -0.4
    labels = torch.arange(40) % 10
    for preset, expected in (("paper-augment", [(32, 5, 10.0, [pytest.approx(-0.4)])] * 2), ("paper", [])):
        calls.clear()
        cfg = validate(SourceConfig, {"preset": preset, "epochs": 1, "batch_size": 20, "holdout": 0})
        task = supervised.RealDataTraining(engine, build_model("shot_lenet", 10, 1, 32), images, labels, cfg)
        for i in range(2):
            task.step(i)
        assert calls == expected, preset


def test_train_source_takes_the_preset_from_the_command_line(tmp_path, capsys):
    import yaml

    from dfkt.cli import main

    out = tmp_path / "source"
    assert (
        main(
            [
                "train-source",
                "--model",
                "shot_dtn",
                "--data",
                "digits",
                "--epochs",
                "1",
                "--set",
                "preset=paper-augment",
                "--set",
                "engine.precision=32-true",
                "--set",
                "engine.progress=false",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["preset"], saved["batch_size"], saved["augment"], saved["epochs"]) == (
        "paper-augment",
        64,
        "crop_rotate",
        1,
    )
    assert (out / "model.safetensors").is_file()


# (d) B4's corruptions at MNIST-C's parameters -----------------------------------------------------


def blob(side: int, dx: int, dy: int, n: int = 16) -> torch.Tensor:
    """uint8 images of a 3×3 white square (dx, dy) px from the pixel left of and above the centre."""
    x = torch.zeros(n, 1, side, side, dtype=torch.uint8)
    c = (side - 1) // 2
    x[:, 0, c + dy - 1 : c + dy + 2, c + dx - 1 : c + dx + 2] = 255
    return x


def centroid(image: torch.Tensor) -> tuple[float, float]:
    """The intensity centroid (x right, y down) relative to the image centre, (side − 1)/2."""
    w = image[0].double()
    side = w.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return ((w * xs).sum() / w.sum() - (side - 1) / 2).item(), ((w * ys).sum() / w.sum() - (side - 1) / 2).item()


def test_mnist_c_scale_moves_pixels_by_mnist_cs_parameters():
    from dfkt.data.corruptions import MNIST_C_SEVERITY, corrupt

    assert (MNIST_C_SEVERITY["rotate"], MNIST_C_SEVERITY["translate"]) == (2, 3)  # MNIST-C's data: ±23°, 3 px
    # rotate: ±0.2 ... 1.0 rad, exactly, both signs.
    for severity, radians in ((2, 0.4), (5, 1.0)):
        angles = [math.atan2(*centroid(o)[::-1]) for o in corrupt(blob(41, 15, 0), "rotate", severity)]
        assert [abs(a) for a in angles] == pytest.approx([radians] * 16, abs=0.01), severity
        assert min(angles) < 0 < max(angles)
    # translate: 1 ... 5 px along each axis per 28 px of side, each sign random.
    for side in (28, 56):
        moves = [centroid(o) for o in corrupt(blob(side, 0, 0), "translate", 3)]
        start = centroid(blob(side, 0, 0)[0])
        assert all(
            abs(abs(x - start[0]) - 3 * side / 28) < 0.01 and abs(abs(y - start[1]) - 3 * side / 28) < 0.01
            for x, y in moves
        ), side
    # scale: to 0.7 at severity 3; shear: (x, y) -> (x − sin(c)·y, cos(c)·y) back to the input, c = ±0.4.
    assert [centroid(o)[0] for o in corrupt(blob(41, 10, 0), "scale", 3)] == pytest.approx([7.0] * 16, abs=0.05)
    sheared = [centroid(o) for o in corrupt(blob(41, 0, 10), "shear", 2)]
    assert [abs(x) for x, _ in sheared] == pytest.approx([10 * math.tan(0.4)] * 16, abs=0.1)
    assert [y for _, y in sheared] == pytest.approx([10 / math.cos(0.4)] * 16, abs=0.1)
    assert min(x for x, _ in sheared) < 0 < max(x for x, _ in sheared)


def test_mnist_c_scale_blurs_stripes_and_inverts_as_mnist_c():
    from dfkt.data.corruptions import corrupt

    point = torch.zeros(8, 1, 29, 29, dtype=torch.uint8)
    point[:, 0, 14, 14] = 255
    # gaussian_blur: σ = 1, 2, 3, 4, 6 px (the horizontal variance of a point's blur ≈ σ², less the uint8 tails).
    for severity, sigma in ((1, 1.0), (2, 2.0)):
        profile = corrupt(point, "gaussian_blur", severity)[0, 0].double().sum(0)
        variance = (profile * (torch.arange(29) - 14.0) ** 2).sum() / profile.sum()
        assert 0.75 * sigma**2 < variance < 1.05 * sigma**2, severity
    # motion_blur: ImageMagick's one-sided smear, radius 10 and σ 3 px at severity 1, within ±45° of horizontal.
    for smear in corrupt(point, "motion_blur", 1):
        ys, xs = torch.nonzero(smear[0], as_tuple=True)
        dx, dy = xs - 14, ys - 14
        assert (dx <= 0).all() and (dy.abs() <= dx.abs() + 1).all()  # from the point, one way, near horizontal
        assert 7 <= (dx**2 + dy**2).double().sqrt().max() <= 10
    # stripe: the outer 7 of 28 columns on each side inverted, the rest untouched; inversion: 255 − x.
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    striped = corrupt(images, "stripe", 3)
    assert torch.equal(striped[..., 7:21], images[..., 7:21])
    assert torch.equal(striped[..., :7], 255 - images[..., :7]) and torch.equal(
        striped[..., 21:], 255 - images[..., 21:]
    )
    assert torch.equal(corrupt(images, "inversion", 1), 255 - images)


def test_the_projects_scale_stays_available_and_names_choose_it():
    from dfkt.data import load_dataset
    from dfkt.data.corruptions import corrupt
    from dfkt.errors import ConfigError

    base = load_dataset("digits")
    default, explicit, project = (load_dataset(f"digits-c:rotate:3{s}") for s in ("", ":mnist-c", ":dfkt"))
    assert default.name == explicit.name == "digits-c:rotate:3" and project.name == "digits-c:rotate:3:dfkt"
    assert torch.equal(default.test_images, corrupt(base.test_images, "rotate", 3, seed=2, scale="mnist-c"))
    assert torch.equal(project.test_images, corrupt(base.test_images, "rotate", 3, seed=2, scale="dfkt"))
    assert not torch.equal(default.test_images, project.test_images)
    # Where MNIST-C's tables are the project's (noise, contrast, brightness), both scales give the same images.
    for name in ("gaussian_noise:3", "contrast:2", "brightness:4"):
        assert torch.equal(
            load_dataset(f"digits-c:{name}").test_images, load_dataset(f"digits-c:{name}:dfkt").test_images
        )
    with pytest.raises(ConfigError, match="unknown corruption scale 'mnistc'.*mnist-c, dfkt"):
        load_dataset("digits-c:rotate:3:mnistc")


def test_an_adapt_target_keeps_its_scale():
    from dfkt.api import target_images
    from dfkt.config import DataConfig
    from dfkt.data import load_dataset
    from dfkt.models.files import ModelInfo

    base = load_dataset("digits")
    info = ModelInfo("shot_dtn", 10, 1, 8, base.mean, base.std, "digits")
    for suffix, scale in (("", "mnist-c"), (":dfkt", "dfkt")):
        target = target_images(DataConfig(name=f"digits-c:translate:2{suffix}"), info)
        assert target.name == f"digits-c:translate:2{suffix}"
        assert torch.equal(target.images, load_dataset(f"digits-c:translate:2:{scale}").test_images)
