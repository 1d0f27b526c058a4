"""What every data-free distillation method is: a typed config, presets, and stages for the engine."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import AfterValidator, Field
from torch import Tensor, nn

from dfkt.config import StrictModel
from dfkt.dfkd.student import StudentTrainer
from dfkt.engine import Engine, Stage
from dfkt.engine.state import TrainState
from dfkt.errors import ConfigError
from dfkt.models import build_generator
from dfkt.models.cost import multiply_adds
from dfkt.models.generator import GeneratorEnsemble
from dfkt.synthesis import Synthesizer
from dfkt.synthesis.inversion import Start


def _even(batch: int) -> int:
    if batch % 2:
        raise ValueError("gen_batch must be even: it is split into two halves")
    return batch


# A generator batch split into two halves for a pairwise diversity term (RDSKD, MSKD).
EvenBatch = Annotated[int, AfterValidator(_even)]


@dataclass
class DistillSetup:
    """What the API hands a method: prepared models and the shape of the data to invent."""

    teacher: nn.Module  # frozen, eval mode, on the device
    student: nn.Module  # trainable, on the device
    num_classes: int
    channels: int
    image_size: int
    engine: Engine
    mean: tuple[float, ...] | None = None  # the teacher's input normalisation, per channel
    std: tuple[float, ...] | None = None
    mirror_safe: bool = False  # a horizontal flip keeps the data's classes (clothes: yes; digits: no)
    student_start: Literal["random", "teacher"] = "random"  # the student's weights: its own, or sliced from the teacher
    # A student sliced from ranked channels: by name of each narrower layer, the teacher's channel behind each of its
    # output channels (empty: the leading slice).
    teacher_channels: dict[str, Tensor] = field(default_factory=dict)

    def pixel_range(self) -> tuple[Tensor, Tensor] | None:
        """Per channel (1×C×1×1), the normalised values of pixels 0 and 1: the teacher's input domain."""
        if self.mean is None or self.std is None:
            return None
        mean = torch.tensor(self.mean, device=self.engine.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.engine.device).view(1, -1, 1, 1)
        return -mean / std, (1 - mean) / std


class GeneratorFields(StrictModel):
    """The generator settings every generator-based method shares."""

    generator: str = "dafl"
    gen_width: int | None = Field(
        None,
        ge=2,
        description="channels of the generator's first stages (None: the "
        "architecture's own, 128 for dafl); the cost per image grows with its square",
    )
    generators: int = Field(
        1,
        ge=1,
        description="independent generators sharing each batch (an ensemble): more "
        "modes per class, less dependence on one initialisation",
    )
    gen_output: Literal["bn", "clamped", "pixels"] = Field(
        "bn",
        description="bn: tanh + affine-free BatchNorm (the DAFL authors'); clamped: that, clamped into the "
        "range of real inputs; pixels: sigmoid in pixel space, then the teacher's normalisation "
        "(inside that range, starting as flat grey)",
    )
    gen_smoothing: float = Field(
        0.0,
        ge=0,
        le=3,
        description="σ in pixels of a fixed Gaussian blur ending the generator, so its loss shapes images smooth at "
        "that scale rather than fine textures (ours); 0: none, the authors' generator",
    )


class BNPriorFields(StrictModel):
    """The setting every method with the BatchNorm-statistics prior shares (dfkt.synthesis.bn_prior)."""

    bn_distance: Literal["raw", "standardised"] = Field(
        "raw",
        description="raw: the papers' norms of the statistics' differences; standardised: each layer's "
        "differences in units of its running statistics, so no layer's activation scale drowns "
        "the others (dfkt's)",
    )


# downscale stops here: on 8×8 digits, 4×4 images gave a student of 0.73 where full-side ones gave 0.95 (the
# tests' budget), while on 32×32 Fashion-MNIST 16×16 ones lifted it from 15.8 to 45.3 (analysis of issue 13).
MIN_DOWNSCALED_SIDE = 8


class PixelInversionFields(StrictModel):
    """The settings of the methods that optimise pixels against the teacher (dfkt.synthesis.PixelInversion)."""

    clamp: bool = Field(
        True,
        description="clamp pixels into the teacher's input range after every step (as the "
        "authors' code does); false leaves them unbounded",
    )
    start: Start = Field(
        "noise",
        description="noise: pixels start as N(0, 1), the authors'; dark: at black plus N(0, start_noise²) noise "
        "(needs clamp)",
    )
    start_noise: float = Field(
        0.1,
        ge=0,
        description="start=dark: the std of the noise added to black, in normalised units (larger: images of one "
        "class start, and end, further apart)",
    )
    resolution: int | None = Field(
        None,
        ge=1,
        description="optimise images of this side, bilinearly upsampled to "
        "the teacher's (smooth images); none: the teacher's side",
    )
    downscale: int | None = Field(
        None,
        ge=2,
        description="optimise images of the teacher's side divided by this, but never below "
        f"{MIN_DOWNSCALED_SIDE} pixels: resolution relative to the teacher, so one setting fits any image size",
    )
    standardise: bool = Field(
        False,
        description="rescale each finished batch to pixel mean 0 and variance 1 per "
        "channel (what the input normalisation gives real batches), then "
        "clamp (needs clamp)",
    )

    def inverted_side(self, image_size: int) -> int | None:
        """The side of the optimised images for a teacher of this side (None: the teacher's own)."""
        if self.resolution is not None and self.downscale is not None:
            raise ConfigError(
                "set params.resolution (a side in pixels) or params.downscale (a divisor of the "
                "teacher's side), not both"
            )
        if self.downscale is not None:
            return min(image_size, max(MIN_DOWNSCALED_SIDE, image_size // self.downscale))
        return self.resolution


@dataclass(frozen=True)
class DistillReport:
    """What a distillation method tells the API about its run, beside the student's weights: the API
    reads this, never the method's parts."""

    first_batch_sha256: str | None  # of the first batch this process trained the student on: ranks differ
    generator_multiply_adds_per_image: int | None  # None for methods without a generator network


def build_method_generator(cfg: GeneratorFields, nz: int, setup: DistillSetup) -> nn.Module:
    """The generator ``cfg`` describes, shaped for the teacher's input."""
    members = [
        build_generator(
            cfg.generator,
            nz,
            setup.channels,
            setup.image_size,
            width=cfg.gen_width,
            output=cfg.gen_output,
            mean=setup.mean,
            std=setup.std,
            smoothing=cfg.gen_smoothing,
        )
        for _ in range(cfg.generators)
    ]
    return members[0] if len(members) == 1 else GeneratorEnsemble(members)


class DistillMethod(TrainState):
    """Base class. Subclasses set ``Config``, ``presets`` (at least ``paper`` and ``cpu``), a
    ``source`` synthesizer and a ``student_trainer``, and implement ``stages``.

    The contract with the engine and the API: random numbers come from named streams
    (``engine.rng("crops")``); everything a resume needs is registered once with
    ``keep(name, module, optimizer, stream, tensor, ...)``; the API reads ``stages()``, ``samples()``,
    ``validation_samples()`` and, after the run, ``report()``.
    """

    Config: ClassVar[type[StrictModel]]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    summary: ClassVar[str] = ""
    # Reads the teacher's penultimate features (forward_features/classify), not only its outputs.
    needs_teacher_features: ClassVar[bool] = False
    # Joint methods: the student only ever sees the generator in train mode (batch statistics),
    # so diagnostics sample it that way too; a frozen generator (RDSKD) is sampled in eval mode.
    samples_in_train_mode: ClassVar[bool] = False
    source: Synthesizer
    student_trainer: StudentTrainer

    def __init__(self, cfg: StrictModel, setup: DistillSetup):
        super().__init__(setup.engine.device)
        self.cfg = cfg
        self.setup = setup
        self.engine = setup.engine
        self.teacher = setup.teacher
        self.student = setup.student
        self.keep("student", setup.student)

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def report(self) -> DistillReport:
        return DistillReport(self.student_trainer.first_batch_sha256, self.generator_cost())

    def generator_cost(self) -> int | None:
        """Multiply-adds of one generated image (None for pixel methods, which have no generator)."""
        generator = getattr(self.source, "generator", None)
        nz = getattr(self.source, "nz", None)
        if generator is None or nz is None:
            return None
        return multiply_adds(generator, torch.zeros(1, nz, device=self.engine.device))

    @torch.no_grad()
    def samples(self, n: int, stream: str = "samples") -> Tensor:
        """``n`` synthetic images in the teacher's input space, for grids and diagnostics: new
        images from a generator source, else draws from the pool."""
        rng = self.engine.rng(stream)  # from its start on every call: the same images each time
        generator = self.modules.get("generator")
        if generator is None:
            return self.source.sample(n, rng)[0].float()
        if self.samples_in_train_mode:  # a copy, so its running statistics stay untouched
            generator = copy.deepcopy(generator).train()
        with self.engine.eval_mode(*([] if self.samples_in_train_mode else [generator])), self.engine.autocast():
            return generator(self.source.noise(n, rng)).float()

    def validation_samples(self, n: int) -> Tensor | None:
        """Synthetic images the student never trains on, for label-free selection (None while there are
        not yet enough): new draws from the generator; pool methods hold some of their batches out."""
        return self.samples(n, stream="validation_samples")

    def evaluated_student(self) -> nn.Module:
        """What is tested, selected and saved: the average of the student's weights when the run keeps one
        (``average_decay``), else the student as trained (the module itself, not Fabric's wrapper)."""
        trainer = self.student_trainer
        return trainer.trained if trainer.average is None else trainer.average

    @contextlib.contextmanager
    def student_as_judge(self, eval_mode: bool = True) -> Iterator[None]:
        """The student scores synthetic images (adversarial terms): no gradients for its weights,
        and by default eval mode so those images do not move its BatchNorm statistics."""
        params = list(self.student.parameters())
        trainable = [p.requires_grad for p in params]
        self.student.requires_grad_(False)
        try:
            with self.engine.eval_mode(*([self.student] if eval_mode else [])):
                yield
        finally:
            for p, flag in zip(params, trainable):
                p.requires_grad_(flag)
