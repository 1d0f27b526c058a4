"""RDSKD: robustness and diversity seeking data-free KD (Han, Park, Wang, Liu; ICASSP 2021).

Three stages, not alternating: (1) a teacher trained on real data (``dfkt train-teacher``);
(2) a generator trained against the frozen teacher alone with the weight-free loss
    L_G = exp(L_oh − r_oh) + exp(L_ie − r_ie) + L_ds;
(3) a student trained by KD on samples of the frozen generator (in eval mode).
``w_bn`` > 0 adds the teacher's BatchNorm-statistics prior (dfkt.synthesis.bn_prior) to L_G, on teachers
that have BatchNorm layers: not in the paper, whose loss never looks at the images' statistics.
``w_tv`` > 0 adds DeepInversion's total-variation prior (dfkt.losses.total_variation) on the generated
images to L_G: also not in the paper; a smoothness prior that any teacher allows, BatchNorm or not.
The references r_oh, r_ie are detached loss values: in the authors' code they start at 0 and
are reset once per epoch, at its second step, to that step's losses ("epoch"); "step" uses the
previous iteration's values instead.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from dfkt import losses
from dfkt.data.augment import augment_batch
from dfkt.dfkd.base import (
    BNPriorFields,
    DistillMethod,
    DistillSetup,
    EvenBatch,
    GeneratorFields,
    build_method_generator,
)
from dfkt.dfkd.student import StudentTrainer, StudentTrainingConfig, augmentation_list
from dfkt.engine import Stage
from dfkt.errors import ConfigError
from dfkt.registry import METHODS
from dfkt.synthesis import BNStatsPrior, GeneratorSynthesizer, ImagePool, forward_with_prior, statistics_layers
from dfkt.synthesis.bn_prior import no_statistics_reason

POOL_CHUNK = 1024
# With a time budget, drawing the pool may take at most this share of the time left, so a slow generator
# or teacher (a WRN-16-2 pair overran a 2-minute budget by 50 s here) leaves the student its steps; the
# pool then holds what was drawn (at least one chunk).
POOL_FILL_SHARE = 0.25
# A class-balanced pool stops choosing after this many candidates per pool image and fills the rest as drawn, so a
# class the generator (almost) never draws cannot hold the student back.
BALANCE_DRAWS = 4


class RDSKDConfig(StudentTrainingConfig, GeneratorFields, BNPriorFields):
    nz: int = Field(100, ge=1, description="latent size: 100 for MNIST, 1000 for SVHN/CIFAR-10")
    gen_lr: float = Field(1e-3, gt=0)
    gen_batch: EvenBatch = Field(512, ge=2, description="split into two halves for L_ds")
    gen_epochs: int = Field(20, ge=0)
    gen_steps_per_epoch: int = Field(120, ge=2)
    reference: Literal["epoch", "step"] = "epoch"
    w_bn: float = Field(
        0.0,
        ge=0,
        description="weight of the teacher's BatchNorm-statistics prior added to the generator's loss (0: the "
        "paper's loss); a teacher without BatchNorm layers runs the paper's loss whatever this is",
    )
    w_tv: float = Field(
        0.0,
        ge=0,
        description="weight of DeepInversion's total-variation prior on the generated images, added to the "
        "generator's loss (0: the paper's loss); the prior is an L2 norm over the whole batch, so it grows as "
        "the square root of gen_batch",
    )
    gen_augment: list[Literal["shift", "flip"]] = Field(
        [],
        description="the teacher judges the generator's images shifted (by up to max(1, side // 16) pixels, black "
        "coming in) and flipped (mirror-safe data only) while the generator trains, and RDSKD's three terms are "
        "computed on those moved views, so its loss rewards images whose class survives the moves rather than "
        "textures tied to exact pixels (ours, DeepInversion's jitter applied to a generator); []: the images as "
        "drawn, the authors'",
    )
    max_exponent: float = Field(30.0, gt=0, description="exp() argument clamp, so it cannot overflow")
    student_data: Literal["fresh", "pool"] = Field(
        "fresh", description="fresh generator samples every step (paper), or a fixed pool drawn once (cpu)"
    )
    pool_size: int = Field(50000, ge=1)
    pool_refresh: int = Field(
        0,
        ge=0,
        description="pool only: new frozen-generator images replacing the oldest "
        "before every student step (0: the pool drawn once stays)",
    )
    pool_balance: bool = Field(
        False,
        description="pool only: draw the pool with as many images of each class (the teacher's top class) as "
        f"of any other, choosing among up to {BALANCE_DRAWS} candidates per pool image (then filling the rest as "
        "drawn) within the pool's share of the budget; images that pool_refresh or gen_train_every add later are "
        "as drawn; false: the classes as the generator draws them",
    )
    pool_min_confidence: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="pool only: keep only images on which the teacher's top class has at least this probability "
        f"(at temperature 1), choosing among up to {BALANCE_DRAWS} candidates per pool image like pool_balance "
        "(then filling the rest as drawn); 0: every image",
    )
    pool_mining: int = Field(
        1,
        ge=1,
        description="pool_refresh only: candidates drawn per image kept; the kept "
        "ones are those where the student disagrees most with the teacher "
        "(KL), so the pool fills with what the student has yet to learn",
    )
    gen_train_every: int = Field(
        0,
        ge=0,
        description="pool only: keep training the generator in the student stage "
        "(RDSKD's loss, the teacher alone), one step every this many "
        "student steps, its batch replacing the oldest pool images "
        "(0: the generator is frozen after its stage)",
    )
    gen_budget_share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="with --max-seconds, the generator stage ends after this share of the budget "
        "(or its steps, if sooner), so the student always gets the rest",
    )

    _gen_augment_list = field_validator("gen_augment", mode="before")(augmentation_list)


def generator_losses(
    images: Tensor, logits: Tensor, references: Tensor | None, max_exponent: float
) -> dict[str, Tensor]:
    """The RDSKD generator objective on one batch: exp(L_oh − r_oh) + exp(L_ie − r_ie) + L_ds.
    ``references=None`` takes this batch's own loss values as the references (the authors' reset step).
    Also used without a student, to train a calibration generator (``dfkt.quantize``)."""
    l_oh = losses.one_hot_loss(logits)
    l_ie = losses.class_balance_loss(logits)
    l_ds = losses.pairwise_diversity_loss(images, logits)
    refs = torch.stack([l_oh, l_ie]).detach() if references is None else references
    w_oh, clamp_oh = losses.exp_penalty(l_oh, refs[0], max_exponent)
    w_ie, clamp_ie = losses.exp_penalty(l_ie, refs[1], max_exponent)
    return {
        "loss": w_oh + w_ie + l_ds,
        "oh": l_oh,
        "ie": l_ie,
        "ds": l_ds,
        "exp_oh": w_oh,
        "exp_ie": w_ie,
        "references": refs,
        "clamped": (clamp_oh | clamp_ie).float(),
    }


@METHODS.register("rdskd")
class RDSKD(DistillMethod):
    Config = RDSKDConfig
    summary = "generator vs frozen teacher with exp-penalised weight-free loss, then KD (reference)"
    presets = {
        "paper": {},  # MNIST LeNet-5 -> LeNet-5-half: the defaults are the authors' settings
        "paper-cifar10": {"nz": 1000, "lr_milestones": [800]},
        # 224x224 ImageNet-style teachers (no published RDSKD setting): CIFAR-10's, with the deep
        # generator (7x7 map, five upsamplings) and batches halved to fit a GPU at this size.
        "paper-imagenet": {
            "nz": 1000,
            "lr_milestones": [800],
            "generator": "deep",
            "gen_batch": 256,
            "student_batch": 256,
        },
        # 2 CPU cores, measured on B2 (benchmarks/analysis/ablation_b2_rdskd.md): the authors' generator
        # (width 128, tanh + BatchNorm) for 240 steps at batch 128, then a fixed pool of 20,000 images
        # whose batches are shifted (and flipped where the data allows) and labelled again by the
        # teacher. At 10 minutes this beat a 15x cheaper width-32 generator with 2,400 steps and a
        # refreshed pool by 3.4 points in the mean (74.8 ± 3.5 against 71.4 ± 6.1, two sessions): sample
        # quality mattered more than generator steps. With
        # --max-seconds the generator stage gets at most 40% of the budget, so any budget yields a
        # student. The in-range sigmoid output collapsed onto one class on digits and on a WRN teacher;
        # the authors' output clamped into the input range (benchmarks/results/ablation_b2_rdskd_clamped_600s.md)
        # gave 76.2 ± 1.6 at 10 minutes against 74.8 ± 3.5 unclamped (3 seeds each, two sessions).
        # The student started from the teacher's weights where it is the teacher with fewer channels
        # (student_init=auto): 77.3 ± 1.5 on B2 at 10 minutes against 75.8 ± 1.6 (fp32 on AVX2; two seeds of
        # three up, every seed ahead after the student's first 120 s), and the digits demo's student higher on two
        # seeds of three and level on the third (benchmarks/analysis/student_init.md).
        # Student batches of 64, not 256: where each step is costly (a WRN-16-2 teacher on an EPYC without AMX)
        # twice the steps on the same images per second helped twice. 128 against 256 (~460 steps): 56.8 / 65.5 /
        # 52.2 against 52.0 / 54.5 / 51.6 (eighteenth session); 64 against 128 (~1,950 steps against ~1,000), with
        # the BatchNorm prior below: 81.7 / 83.1 / 78.6 / 81.3 / 82.8 against 78.3 / 81.0 / 69.5 / 68.1 / 79.4
        # (twenty-fourth session). On B2, where the student has steps to spare, both stayed level: 77.9 / 79.2 /
        # 80.0 at 128 against 78.2 / 79.2 / 77.5 at 256, and 79.3 / 77.3 / 79.8 at 64 against 77.0 / 78.7 / 80.0 at
        # 128 (benchmarks/analysis/batchnorm_pairs.md). student_epochs 400 keeps the images of 200 epochs of 128.
        # The teacher's BatchNorm statistics as a prior on the generator, where the teacher has them (w_bn 0.3,
        # standardised): on the WRN pair RDSKD's own loss drew no sneaker and 0-1 ankle boot in 500, whatever its
        # other settings; with the prior every class is drawn and the student reaches 79.7 / 74.8 / 69.1 against
        # 56.8 / 65.5 / 52.2 (10 minutes; 0.1: 71.5 ± 5.8, 0.03 and 1 lower on seed 1; nineteenth session), 57.5 ±
        # 2.9 against 44.7 ± 4.7 at 5 minutes; at 2 minutes (~40 generator steps) 24.3 ± 7.5 against 28.2 ± 0.6.
        # Teachers without BatchNorm (B2's LeNet-5) run RDSKD's own loss.
        # The student keeps the teacher's channels the next layer reads most (student_channels=outgoing_norm), not
        # the first ones, and is held near that start by L2-SP (student_anchor 0.01): the features the teacher learned
        # on real images survive training on synthetic ones. On B2 at 10 minutes (seeds 1-5, twenty-seventh session)
        # 83.1 ± 0.9 (every seed ≥ 81.6, pullovers 60-80%) against 79.2 ± 1.1 (pullovers 21-49%), 81.6 ± 1.0 with the
        # ranking alone; screened first on the stored pools of three preset runs (benchmarks/pool_student.py, 20,000
        # student steps): 83.7 against 78.0 for the leading slice, 81.5 with the ranking alone, 75.2 with the anchor
        # alone (benchmarks/analysis/student_init.md).
        "cpu": {
            "gen_batch": 128,
            "gen_epochs": 2,
            "gen_budget_share": 0.4,
            "student_batch": 64,
            "student_epochs": 400,
            "student_data": "pool",
            "pool_size": 20000,
            "augment": ["shift", "flip"],
            "gen_output": "clamped",
            "student_init": "auto",
            "student_channels": "outgoing_norm",
            "student_anchor": 0.01,
            "w_bn": 0.3,
            "bn_distance": "standardised",
        },
    }

    def __init__(self, cfg: RDSKDConfig, setup: DistillSetup):
        super().__init__(cfg, setup)
        self.source = GeneratorSynthesizer(
            self,
            self.engine,
            build_method_generator(cfg, cfg.nz, setup),
            cfg.nz,
            cfg.gen_lr,
            cfg.gen_batch,
            self.objective,
        )
        self.generator = self.source.generator
        self.prior: BNStatsPrior | None = None
        if cfg.w_bn > 0 and statistics_layers(self.teacher):
            self.prior = BNStatsPrior(self.teacher, "rdskd", distance=cfg.bn_distance)
        elif cfg.w_bn > 0:  # the cpu preset sets it for any teacher; one without BatchNorm runs the paper's loss
            why = no_statistics_reason(self.teacher)
            self.engine.metrics.write(
                {"event": f"params.w_bn unused (BatchNorm statistics: {why}); the generator trains on RDSKD's own loss"}
            )
        self.keep("references", torch.zeros(2, device=self.engine.device))  # r_oh, r_ie
        self.gen_augment = [kind for kind in cfg.gen_augment if kind != "flip" or setup.mirror_safe]
        if self.gen_augment:
            self.keep("gen_augment", self.engine.rng("gen_augment"))
        self.reset_references = False
        self.pool = ImagePool(self, cfg.pool_size) if cfg.student_data == "pool" else None
        if (cfg.pool_balance or cfg.pool_min_confidence) and self.pool is None:
            raise ConfigError(
                "params.pool_balance and params.pool_min_confidence need params.student_data=pool: fresh batches "
                "come as the generator draws them"
            )
        if cfg.gen_train_every and (self.pool is None or cfg.pool_refresh):
            raise ConfigError(
                "params.gen_train_every needs params.student_data=pool and params.pool_refresh=0: the "
                "generator's own batches refresh the pool"
            )
        if self.pool is None:
            student_source, every = self.source, 0
        elif cfg.gen_train_every:
            student_source, every = TrainedPool(self, self.pool), cfg.gen_train_every
        else:
            student_source, every = (
                RefreshedPool(self, self.pool, cfg.pool_refresh, cfg.pool_mining),
                int(cfg.pool_refresh > 0),
            )
        self.student_trainer = StudentTrainer(self, cfg, student_source, synthesize_every=every)

    def generator_losses(self, images: Tensor, logits: Tensor, references: Tensor | None) -> dict[str, Tensor]:
        """The RDSKD generator objective on one batch (see ``generator_losses``)."""
        return generator_losses(images, logits, references, self.cfg.max_exponent)

    def objective(self, images: Tensor, z: Tensor) -> dict[str, Tensor]:
        references = None if self.reset_references else self.buffers["references"]
        seen = images
        if self.gen_augment:
            black = None if (bounds := self.setup.pixel_range()) is None else bounds[0]
            seen = augment_batch(images, self.gen_augment, self.rngs["gen_augment"], fill=black)
        logits, l_bn = forward_with_prior(self.prior, self.teacher, seen)
        terms = self.generator_losses(seen, logits, references)
        if self.prior is not None:
            terms["loss"] = terms["loss"] + self.cfg.w_bn * l_bn
            terms["bn"] = l_bn
        if self.cfg.w_tv > 0:
            terms["tv"] = losses.total_variation(images)
            terms["loss"] = terms["loss"] + self.cfg.w_tv * terms["tv"]
        # The teacher's logits label the images only when it saw them as drawn.
        return terms if self.gen_augment else {**terms, "teacher_logits": logits}

    def generator_step(self, i: int) -> dict[str, Tensor | float]:
        per_epoch = self.cfg.reference == "epoch"
        self.reset_references = per_epoch and i % self.cfg.gen_steps_per_epoch == 1
        terms = self.source.synthesize()
        refs = terms.pop("references")
        # "epoch": keep the references set at the reset step; "step": next step compares to this one.
        self.buffers["references"] = refs if per_epoch else torch.stack([terms["oh"], terms["ie"]]).detach()
        return terms

    @torch.no_grad()
    def fill_pool(self) -> None:
        """Draw the pool once from the frozen generator (kept in the checkpoint, so a resume reuses it),
        within ``POOL_FILL_SHARE`` of the budget left."""
        assert self.pool is not None
        if "pool_drawn" in self.buffers:  # a resume: the checkpoint holds the pool as it was drawn
            return
        rng = self.engine.rng("pool_fill")
        left = self.engine.budget_left
        deadline = None if left is None else time.perf_counter() + POOL_FILL_SHARE * left
        classes = self.setup.num_classes
        room = torch.full((classes,), self.cfg.pool_size // classes, device=self.engine.device)
        room[: self.cfg.pool_size % classes] += 1  # images each class may still add
        drawn, counts = 0, torch.zeros(classes, dtype=torch.long, device=self.engine.device)
        with self.engine.autocast(), self.engine.eval_mode(self.generator):  # it may train in this stage
            while not self.pool.full and (self.pool.size == 0 or deadline is None or time.perf_counter() < deadline):
                wanted = self.cfg.pool_size - self.pool.size
                candidates_left = BALANCE_DRAWS * self.cfg.pool_size - drawn
                choosing = (self.cfg.pool_balance or self.cfg.pool_min_confidence > 0) and candidates_left > 0
                images, _ = self.source.sample(min(POOL_CHUNK, candidates_left if choosing else wanted), rng)
                logits = self.teacher(images)
                drawn += len(images)
                if choosing and self.cfg.pool_min_confidence > 0:
                    confident = logits.float().softmax(1).amax(1) >= self.cfg.pool_min_confidence
                    images, logits = images[confident], logits[confident]
                labels = logits.argmax(1)
                if choosing and self.cfg.pool_balance:
                    keep = within_room(labels, room)
                    images, logits, labels = images[keep], logits[keep], labels[keep]
                images, logits, labels = images[:wanted], logits[:wanted], labels[:wanted]
                self.pool.add(images, logits)
                counts += torch.bincount(labels, minlength=classes)
        self.keep("pool_drawn", torch.tensor(self.pool.size))
        self.engine.metrics.write(
            {"event": "pool drawn", "candidates": drawn, "images": self.pool.size, "per_class": counts.tolist()}
        )
        if not self.pool.full:
            self.engine.metrics.write(
                {
                    "event": f"pool drawn: {self.pool.size} of {self.cfg.pool_size} images, within "
                    f"{POOL_FILL_SHARE:g} of the {left:.0f} s of budget left"
                }
            )

    def stages(self) -> list[Stage]:
        gen_stage = Stage(
            "generator",
            self.cfg.gen_epochs * self.cfg.gen_steps_per_epoch,
            self.generator_step,
            train=[self.generator],
            frozen=[self.teacher],
            budget_share=self.cfg.gen_budget_share,
        )
        # Stage 3 samples the *frozen* generator (eval mode, no gradients), unless it keeps training.
        if self.cfg.gen_train_every:
            train, frozen = [self.generator], [self.teacher]
        else:
            train, frozen = [], [self.teacher, self.generator]
        return [
            gen_stage,
            self.student_trainer.stage(train=train, frozen=frozen, begin=None if self.pool is None else self.fill_pool),
        ]


def within_room(labels: Tensor, room: Tensor) -> Tensor:
    """Which of ``labels`` to keep, in order, so that class c keeps at most ``room[c]`` more; ``room`` is
    lowered by what is kept."""
    one_hot = torch.nn.functional.one_hot(labels, len(room))
    rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # how many of its class came before it in this batch
    keep = rank < room[labels]
    room -= one_hot[keep].sum(0)
    return keep


class TrainedPool:
    """The student's view of RDSKD's pool while the generator keeps training: ``synthesize()`` takes one more
    generator step (the steps continue the generator stage's count, so its reference resets carry on) and
    puts that step's batch, with the teacher's logits on it, in place of the oldest pool images."""

    def __init__(self, method: RDSKD, pool: ImagePool):
        self.method, self.pool = method, pool
        method.keep("generator_steps", torch.tensor(method.cfg.gen_epochs * method.cfg.gen_steps_per_epoch))

    def synthesize(self) -> dict[str, Tensor | float]:
        method = self.method
        steps = method.buffers["generator_steps"]
        terms = method.generator_step(int(steps))
        steps += 1
        images, logits = method.source.latest
        if logits is None:  # with gen_augment the teacher judged moved views: ask it about the images as drawn
            with torch.no_grad():
                logits = method.teacher(images)
        self.pool.add(images, logits)
        return terms

    def sample(self, n: int, rng: torch.Generator):
        return self.pool.sample(n, rng)


class RefreshedPool:
    """The student's view of RDSKD's pool: ``synthesize()`` replaces the ``refresh`` oldest images with new
    draws of the frozen generator (more distinct images than the pool holds, at a fraction of the cost
    of fresh batches), ``sample()`` draws from the pool.

    With ``mining`` > 1, ``mining × refresh`` candidates are drawn and the ``refresh`` on which the
    student's prediction is furthest from the teacher's (KL(T ‖ S) at the KD temperature) are kept: the
    adversarial idea of DFAD and ZSKT applied to which samples of the frozen generator the student sees,
    leaving the generator and its loss as RDSKD's."""

    def __init__(self, method: RDSKD, pool: ImagePool, refresh: int, mining: int = 1):
        self.method, self.pool, self.refresh, self.mining = method, pool, refresh, mining
        self.rng = method.engine.rng("pool_refresh")
        method.keep("pool_refresh", self.rng)

    @torch.no_grad()
    def synthesize(self) -> dict[str, Tensor | float]:
        method = self.method
        images, _ = method.source.sample(self.refresh * self.mining, self.rng)
        logits = method.teacher(images)
        if self.mining == 1:
            self.pool.add(images, logits)
            return {}
        with method.engine.eval_mode(method.student):
            gap = losses.kl_per_sample(logits, method.student(images), method.cfg.temperature)
        keep = gap.topk(self.refresh).indices
        self.pool.add(images[keep], logits[keep])
        return {"mined_kl": gap[keep].mean()}

    def sample(self, n: int, rng: torch.Generator):
        return self.pool.sample(n, rng)
