"""The student's stage, shared by every method: KD on images from a synthesizer.

Joint methods (DAFL, DFAD, ZSKT, ...) call ``synthesize()`` every ``synthesize_every`` student
steps, so data making and learning interleave in this one stage; the time spent synthesizing is
timed apart. Methods whose data is made in an earlier stage (RDSKD) pass ``synthesize_every=0``.
With ``augment`` (a list from dfkt.data.augment.AUGMENTATIONS), each batch is augmented and the
teacher is asked again on exactly what the student sees (unless ``augment_relabel`` is off); otherwise
cached teacher logits are used when the source has them. A flip is only applied to data declared
mirror-safe (never to digits).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from dfkt import losses
from dfkt.config import StrictModel
from dfkt.data.augment import AUGMENTATIONS, augment_batch
from dfkt.engine import Stage
from dfkt.models.cost import multiply_adds
from dfkt.models.foreign import own_network
from dfkt.models.slicing import LayerOutputs, narrower_layers
from dfkt.synthesis import Synthesizer
from dfkt.training import make_optimizer

if TYPE_CHECKING:
    from dfkt.dfkd.base import DistillMethod

# Below this many multiply-adds per image (LeNet-5: 0.4M) bf16 casts may cost a CPU more than they save.
TINY_MULTIPLY_ADDS = 5_000_000

# student_loss(student_logits, teacher_logits, images) -> named terms including "loss".
StudentLoss = Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]


class StudentTrainingConfig(StrictModel):
    student_lr: float = Field(2e-3, gt=0)
    student_optimizer: Literal["adam", "sgd"] = "adam"
    student_momentum: float = Field(0.9, ge=0, description="sgd only")
    student_weight_decay: float = Field(0.0, ge=0)
    student_batch: int = Field(512, ge=1)
    student_epochs: int = Field(1000, ge=1)
    student_steps_per_epoch: int = Field(120, ge=1)
    lr_schedule: Literal["step", "cosine"] = Field(
        "step",
        description="step: multiply by lr_gamma at lr_milestones; cosine: anneal to 0 over the student stage "
        "(its steps, or with --max-seconds the time left for it, whichever ends first)",
    )
    lr_milestones: list[int] = Field([], description="epochs at which the student lr is multiplied by lr_gamma")
    lr_gamma: float = Field(0.1, gt=0)
    lr_min: float = Field(
        0.0, ge=0, description="cosine only: the lr it anneals to (Fast's authors: 2e-4; CMI's and ZSKT's: 0)"
    )
    student_clip_norm: float | None = Field(
        None,
        gt=0,
        description="rescale the student's gradients to at most this total L2 norm before each step "
        "(ZSKT's authors: 5); none: no clipping",
    )
    temperature: float = Field(10.0, gt=0)
    student_init: Literal["random", "teacher", "auto"] = Field(
        "random",
        description="the student's starting weights: random (the papers); teacher: the leading slice of each "
        "of the teacher's tensors, for a student that is the teacher with fewer channels (lenet5 -> "
        "lenet5_half); auto: teacher where the student is such a network, else random (summary.json: "
        "student_init)",
    )
    student_channels: Literal["leading", "filter_norm", "outgoing_norm"] = Field(
        "leading",
        description="which of the teacher's channels a student started from the teacher keeps in each narrower "
        "layer: leading (the first ones), filter_norm (those of largest L1 filter norm, Li et al. 2017) or "
        "outgoing_norm (those the next layer reads with the largest L1 weight, times a BatchNorm's |γ|/σ between "
        "them); ranked only where the teacher's convolution and linear layers form a chain, else leading; unused "
        "where the student starts at random (summary.json: student_channels)",
    )
    student_anchor: float = Field(
        0.0,
        ge=0,
        description="weight of an L2-SP penalty (dfkt.losses.l2_sp) keeping the student's weights near where they "
        "started from the teacher; on only where the student starts from the teacher (a random start, e.g. "
        "student_init=random with a preset that sets this, holds nothing to keep); 0: off",
    )
    feature_weight: float = Field(
        0.0,
        ge=0,
        description="weight of a hint loss keeping the outputs of each student layer narrower than the teacher's "
        "at the teacher's channels it was sliced from (leading, or ranked by student_channels; "
        "dfkt.losses.leading_channel_loss). Only a student "
        "started from the teacher computes those channels: with student_init=auto the loss is on where the "
        "student starts from the teacher and off elsewhere (summary.json: feature_hint_layers); 0: off",
    )
    student_precision: Literal["engine", "32", "auto"] = Field(
        "engine",
        description="precision of the student's own steps (synthesis keeps the run's): engine (the run's), "
        "32 (fp32), or auto: fp32 on a CPU when the teacher costs under "
        f"{TINY_MULTIPLY_ADDS // 10**6}M multiply-adds per image, else the run's",
    )
    augment: list[Literal["shift", "flip", "rotate", "scale", "blur", "brightness", "mixup", "cutmix"]] = Field(
        [],
        description="augmentations of the student's batches, relabelled by the teacher: shift, flip (mirror-safe "
        "data only), rotate, scale, blur, brightness, mixup, cutmix; true = shift + flip",
    )
    augment_degrees: float = Field(
        15.0, ge=0, le=180, description="rotate: the largest angle, either way (ZSKD's authors rotate by up to 90)"
    )
    augment_scale: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="scale: zoom by 1 ± this at most (ZSKD's authors' "
        "code zooms into central crops of 0.9 to 0.6 of the "
        "side)",
    )
    augment_blur: float = Field(
        1.0, gt=0, le=1, description="blur: the largest σ of the Gaussian, in pixels (its window is 5×5)"
    )
    augment_brightness: float = Field(
        0.4, gt=0, lt=1, description="brightness: scale each image's distance from black by 1 ± this at most"
    )
    augment_relabel: bool = Field(
        True,
        description="the teacher labels every augmented batch again, exactly what the student sees; false: the "
        "stored logits of the unaugmented images are kept (shift, flip, rotate, scale only), which saves a teacher "
        "forward pass per student step where the source stores logits (RDSKD's pool); no effect with "
        "adversarial_steps or the hint loss, which run the teacher anyway",
    )

    average_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="evaluate, select and save an exponential moving average of the student's weights "
        "(Polyak averaging), updated after every step with this decay (0.999: about the last 1,000 steps); "
        "none: the weights as trained",
    )
    adversarial_steps: int = Field(
        0,
        ge=0,
        description="signed-gradient steps that move a share of each student batch to where the student "
        "disagrees with the teacher (ascent on KL(T‖S)), then relabelled by the teacher; 0: off",
    )
    adversarial_step_size: float = Field(
        0.1, gt=0, description="each adversarial step moves every pixel by this much, in the teacher's normalised units"
    )
    adversarial_share: float = Field(0.5, gt=0, le=1, description="share of each student batch moved so")
    synthesis_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="with --max-seconds, the most of the student stage's time that synthesis may take: a due "
        "synthesis is skipped while synthesis has taken more than this share so far, and the student goes on with "
        "what it has (a costly teacher then gets fewer new images, not a starved student); a run of fixed steps "
        "ignores it, so that timing never changes what it trains; none: every due synthesis runs",
    )

    @model_validator(mode="after")
    def _hints_need_a_sliced_student(self):
        if self.feature_weight and self.student_init == "random":
            raise ValueError(
                "params.feature_weight matches the teacher's channels the student was sliced from, which only a "
                "student started from the teacher computes; set params.student_init=teacher (or auto), or "
                "params.feature_weight=0"
            )
        return self

    @model_validator(mode="after")
    def _new_pixels_need_the_teacher(self):
        changed = [kind for kind in self.augment if kind in ("blur", "brightness", "mixup", "cutmix")]
        if changed and not self.augment_relabel:
            raise ValueError(
                f"params.augment has {', '.join(changed)}: such an image is no longer the stored one, so the teacher "
                "must label it; set params.augment_relabel=true or drop those augmentations"
            )
        return self

    @field_validator("student_precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value):
        return str(value) if isinstance(value, int) else value  # --set params.student_precision=32 reads a number

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_flag(cls, value):
        return augmentation_list(value)


def augmentation_list(value):
    """A list of augmentations as a setting may give it: true/false (the older on/off switch: shift + flip or
    none), text from the command line (``--set params.augment=shift,mixup``), or the list itself."""
    if isinstance(value, bool):
        return ["shift", "flip"] if value else []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def disagreement_ascent(
    images: Tensor,
    teacher: nn.Module,
    student: nn.Module,
    steps: int,
    step_size: float,
    pixel_range: tuple[Tensor, Tensor] | None,
    gradient: Callable[[Tensor, Tensor], Tensor] = lambda loss, x: torch.autograd.grad(loss, x)[0],
) -> Tensor:
    """``images`` moved towards where ``student`` disagrees with ``teacher``, by ``steps`` signed-gradient
    ascent steps on the per-sample KL divergence (projected gradient ascent, Madry et al. 2018, with KD's
    divergence in place of the classification loss):

        x_{k+1} = clip(x_k + α · sign(∇_x KL(softmax T(x_k) ‖ softmax S(x_k)))),

    clipped to ``pixel_range`` (the teacher's input domain) when known. Samples near the teacher's
    decision boundaries, which a pool of confident class templates lacks, are what the student most
    needs to copy the teacher; the caller lets the teacher label the result. Only the images get
    gradients: the networks' weights and their ``.grad`` are untouched. Modes are the caller's. ``gradient(loss,
    x)`` gives ∂loss/∂x (in a run: :meth:`dfkt.engine.Engine.input_gradient`, which mixed precision needs)."""
    x = images.detach()
    for _ in range(steps):
        x.requires_grad_(True)
        kl = losses.kl_per_sample(teacher(x), student(x)).sum()
        x = (x + step_size * gradient(kl, x).sign()).detach()
        if pixel_range is not None:
            x = torch.maximum(torch.minimum(x, pixel_range[1]), pixel_range[0])
    return x


class StudentTrainer:
    """Builds the student's stage: KD steps on ``source`` samples, with ``source.synthesize()``
    every ``synthesize_every`` steps, at most ``max_syntheses`` times (timed as synthesis; its last values
    are logged every step)."""

    def __init__(
        self,
        method: DistillMethod,
        cfg: StudentTrainingConfig,
        source: Synthesizer,
        synthesize_every: int = 0,
        loss: StudentLoss | None = None,
        max_syntheses: int | None = None,
    ):
        self.method, self.cfg, self.source = method, cfg, source
        self.synthesize_every = synthesize_every
        self.max_syntheses = max_syntheses  # None: synthesize to the end
        self.loss = loss or (lambda s, t, x: {"loss": losses.kd_loss(s, t, cfg.temperature)})
        engine = method.engine
        self.optimizer = engine.prepare_optimizer(
            make_optimizer(
                list(method.student.parameters()),
                cfg.student_optimizer,
                cfg.student_lr,
                cfg.student_momentum,
                cfg.student_weight_decay,
            )
        )
        if cfg.lr_schedule == "cosine":  # follows the engine's progress, which knows the time budget
            floor = cfg.lr_min / cfg.student_lr
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda _: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * engine.stage_progress))
            )
        else:
            milestones = [m * cfg.student_steps_per_epoch for m in cfg.lr_milestones]
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones, cfg.lr_gamma)
        method.keep("student", self.optimizer, self.scheduler, engine.rng("student"))
        # The trained module itself: Fabric's wrapper keeps it as ``.module``.
        self.trained = getattr(method.student, "module", method.student)
        self.average: nn.Module | None = None
        if cfg.average_decay is not None:
            self.average = copy.deepcopy(self.trained).requires_grad_(False).eval()
            method.keep("student_average", self.average)
        # The weights the student starts from, for the L2-SP anchor; kept in the checkpoint so a resumed run
        # pulls towards the same point. Copied before the hint's hooks are set.
        self.start: nn.Module | None = None
        if cfg.student_anchor and method.setup.student_start == "teacher":
            self.start = copy.deepcopy(self.trained).requires_grad_(False)
            method.keep("student_start", self.start)
        # The hint loss, where the student started from the teacher and has layers narrower than the teacher's
        # (one as wide as the teacher is its copy: nothing to hint).
        self.student_layers = self.teacher_layers = None
        pairs = []
        if cfg.feature_weight and method.setup.student_start == "teacher":
            pairs = narrower_layers(self.trained, own_network(getattr(method.teacher, "module", method.teacher)))
        self.hinted_layers = len(pairs)
        if pairs:
            self.student_layers = LayerOutputs([mine for mine, _ in pairs])
            self.teacher_layers = LayerOutputs([theirs for _, theirs in pairs])
            names = {id(module): name for name, module in self.trained.named_modules()}
            sliced = method.setup.teacher_channels
            self.hint_channels = [
                sliced[names[id(mine)]].to(engine.device) if names[id(mine)] in sliced else None for mine, _ in pairs
            ]
        self.last_synthesis: dict[str, Tensor | float] = {}
        # Of the first batch this process trains on: ranks must each see their own data.
        self.first_batch_sha256: str | None = None
        setup = method.setup
        self.augmentations = [k for k in AUGMENTATIONS if k in cfg.augment and (k != "flip" or setup.mirror_safe)]
        # What a shifted or rotated image is padded with: black, in the teacher's normalised units.
        self.pixel_range = setup.pixel_range()
        self.fill = None if self.pixel_range is None else self.pixel_range[0]

    def lr_factor(self) -> float:
        """The student's current lr over its initial one: what its schedule has done so far (a generator whose lr
        follows the student's schedule is multiplied by it)."""
        return self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]

    @property
    def steps(self) -> int:
        return self.cfg.student_epochs * self.cfg.student_steps_per_epoch

    def stage(self, train: list, frozen: list, begin: Callable[[], None] | None = None) -> Stage:
        return Stage(
            "student",
            self.steps,
            self.step,
            train=[self.method.student, *train],
            frozen=frozen,
            begin=begin,
            evaluate=True,
            autocast=not self.in_fp32(),
        )

    def in_fp32(self) -> bool:
        """Whether the student stage runs in fp32 rather than the engine's precision."""
        if self.cfg.student_precision != "auto":
            return self.cfg.student_precision == "32"
        setup = self.method.setup
        if setup.engine.device.type != "cpu" or setup.engine.precision in ("32-true", "32"):
            return False
        example = torch.zeros(1, setup.channels, setup.image_size, setup.image_size, device=setup.engine.device)
        return multiply_adds(self.method.teacher, example) < TINY_MULTIPLY_ADDS

    def batch(self) -> tuple[Tensor, Tensor]:
        """A training batch and the teacher's logits on it."""
        rng = self.method.rngs["student"]
        images, logits = self.source.sample(self.cfg.student_batch, rng)
        if self.augmentations:
            images = augment_batch(
                images,
                self.augmentations,
                rng,
                self.fill,
                self.cfg.augment_degrees,
                self.cfg.augment_scale,
                self.cfg.augment_blur,
                self.cfg.augment_brightness,
                None if self.pixel_range is None else self.pixel_range[1],
            )
            if self.cfg.augment_relabel:
                logits = None
        if self.cfg.adversarial_steps:
            images, logits = self.adversarial(images), None
        if logits is None or self.teacher_layers is not None:  # the hint loss needs the teacher's layers too
            with torch.no_grad(), self.recording(self.teacher_layers):
                logits = self.method.teacher(images)
        if self.first_batch_sha256 is None:
            self.first_batch_sha256 = hashlib.sha256(images.detach().float().cpu().numpy().tobytes()).hexdigest()
        return images, logits

    def adversarial(self, images: Tensor) -> Tensor:
        """The first ``adversarial_share`` of the batch moved by :func:`disagreement_ascent`; the student
        judges as in the adversarial synthesis terms (eval mode, no gradients for its weights)."""
        cfg, method = self.cfg, self.method
        moved = max(1, round(cfg.adversarial_share * len(images)))
        with method.student_as_judge(), torch.enable_grad():
            hard = disagreement_ascent(
                images[:moved],
                method.teacher,
                method.student,
                cfg.adversarial_steps,
                cfg.adversarial_step_size,
                self.pixel_range,
                method.engine.input_gradient,
            )
        return torch.cat([hard, images[moved:]])

    @staticmethod
    def recording(layers: LayerOutputs | None) -> contextlib.AbstractContextManager:
        """``layers.record()``, or nothing when the hint loss is off."""
        return contextlib.nullcontext() if layers is None else layers.record()

    @torch.no_grad()
    def update_average(self, i: int) -> None:
        """average ← d·average + (1 − d)·student, with d = min(decay, (1 + i)/(10 + i)) so that the first
        steps' averages are not held at the random initialisation (the warm-up of TensorFlow's
        ExponentialMovingAverage). Integer buffers (BatchNorm's step count) are copied."""
        decay = min(self.cfg.average_decay, (1 + i) / (10 + i))
        for mean, now in zip(self.average.state_dict().values(), self.trained.state_dict().values()):
            if mean.is_floating_point():
                mean.lerp_(now, 1 - decay)
            else:
                mean.copy_(now)

    def synthesis_due(self, i: int) -> bool:
        """Whether step ``i`` synthesizes: every ``synthesize_every`` steps, at most ``max_syntheses`` times, and
        with ``synthesis_share`` and a time budget only while synthesis has had at most that share of the stage's time
        (both parts are timed sections, which a checkpoint carries, so a resumed run decides on the time spent
        before). A run of fixed steps synthesizes whenever due, so its timing never changes what it trains."""
        if not self.synthesize_every or i % self.synthesize_every:
            return False
        if self.max_syntheses is not None and i // self.synthesize_every >= self.max_syntheses:
            return False
        share, engine = self.cfg.synthesis_share, self.method.engine
        if share is None or engine.max_seconds is None:  # fixed steps: timing must not change what is trained
            return True
        sections = engine.sections
        spent = sections.get("synthesis", 0.0)
        return spent <= share * (spent + sections.get("distillation", 0.0))

    def step(self, i: int) -> dict[str, Tensor | float]:
        engine = self.method.engine
        if self.synthesis_due(i):
            with engine.timed("synthesis"), engine.autocast():
                terms = self.source.synthesize()
            self.last_synthesis = {k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()}
        values = dict(self.last_synthesis)  # logged on every step, whichever steps the log falls on
        with engine.timed("distillation"):
            images, teacher_logits = self.batch()
            with self.recording(self.student_layers):
                student_logits = self.method.student(images)
            terms = self.loss(student_logits, teacher_logits, images)
            if self.student_layers is not None:
                terms["feature"] = losses.leading_channel_loss(
                    self.student_layers.outputs, self.teacher_layers.outputs, self.hint_channels
                )
                terms["loss"] = terms["loss"] + self.cfg.feature_weight * terms["feature"]
            if self.start is not None:
                terms["anchor"] = losses.l2_sp(list(self.trained.parameters()), list(self.start.parameters()))
                terms["loss"] = terms["loss"] + self.cfg.student_anchor * terms["anchor"]
            engine.optimize(terms["loss"], self.optimizer, "student loss", self.cfg.student_clip_norm)
            self.scheduler.step()
            if self.average is not None:
                self.update_average(i)
        values.update({f"s_{k}" if k == "loss" else k: v for k, v in terms.items()})
        return values
