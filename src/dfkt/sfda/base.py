"""What every source-free adaptation method is: a typed config, presets, and stages for the engine.

A method receives the source model (a trainable copy) and the unlabelled target images it adapts
on. Online methods (BN-adapt, Tent) see each target batch once, in a fixed seeded order, and are
scored on the predictions they made as the stream went by; offline methods (SHOT, NRC, AaD) run
several epochs and are scored after adapting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from dfkt.config import StrictModel
from dfkt.engine import Engine, Stage
from dfkt.engine.state import TrainState
from dfkt.errors import ConfigError
from dfkt.training import EpochBatches, make_optimizer


@dataclass
class AdaptSetup:
    model: nn.Module  # the source model to adapt, trainable, on the device
    images: Tensor  # normalised target images to adapt on, on the device
    engine: Engine


@dataclass(frozen=True)
class AdaptReport:
    """What an adaptation method tells the API about its run, beside the adapted model: the API reads
    this, never the method's parts."""

    # Online methods: the class predicted for each adapted image as the stream went by (-1: not seen, as
    # with several processes up to world size - 1 images are); None for offline methods.
    stream_predictions: Tensor | None


class OnlineConfig(StrictModel):
    batch_size: int = Field(200, ge=2)


class BatchNormConfig(OnlineConfig):
    include_batchnorm1d: bool = Field(
        False,
        description="adapt BatchNorm1d layers too (e.g. a bottleneck's); by "
        "default only BatchNorm2d, as the authors' Tent",
    )


class OfflineConfig(StrictModel):
    batch_size: int = Field(64, ge=2)
    epochs: int = Field(30, ge=1)
    max_steps: int | None = Field(
        None,
        ge=1,
        description="a cap on the run's steps: it keeps as many whole epochs of `epochs` as fit (at least "
        "one), so a large target costs at most this much and a small one gets every epoch",
    )
    lr: float = Field(0.01, gt=0)
    backbone_lr_mult: float = Field(
        1.0, ge=0, description="lr multiplier of the feature extractor (NRC/AaD/SHOT-objects authors: 0.1)"
    )
    bottleneck_lr_mult: float = Field(1.0, ge=0, description="lr multiplier of the bottleneck (Linear, BatchNorm1d)")
    head_lr_mult: float = Field(1.0, ge=0, description="lr multiplier of the classifier head, when it trains")
    lr_decay: bool = Field(
        True,
        description="SHOT's decay lr·(1 + 10t/T)^-0.75 over the run; false keeps the lr "
        "constant (AaD's Office-31 code)",
    )
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-3, ge=0)
    source_share: Annotated[float, Field(ge=0, le=1)] | Literal["agreement", "agreement_ramp", "auto"] = Field(
        0.0,
        description="share s of the source model in the models written, weights (1 - s)·adapted + s·source "
        "(WiSE-FT's weight-space ensemble), for the final and the selected model alike: a number, or "
        "'agreement': s = r², r the share of the adapted images on which the adapted model predicts the "
        "source model's class (label-free: near 1 on a mild shift, where adapting can lose accuracy, near "
        "chance on a large one), or 'agreement_ramp': s = clip((r - 0.3) / 0.5, 0, 1), all of the source "
        "from r = 0.8 up, or 'auto': agreement_ramp for a source with BatchNorm2d layers, agreement otherwise "
        "(the cpu presets). 0 (the authors') keeps the adapted weights. The summary also gives the "
        "figures before interpolating",
    )
    reestimate_batchnorm: bool = Field(
        False,
        description="recompute the written models' BatchNorm running statistics on the adapted images, with "
        "dropout off (after any interpolation with the source), as SWA does after averaging weights",
    )

    @field_validator("source_share", mode="before")
    @classmethod
    def _share_is_not_a_switch(cls, value: Any) -> Any:
        if isinstance(value, bool):  # true would silently write the source model itself (s = 1)
            raise ValueError(
                "source_share takes a number in [0, 1], 'agreement', 'agreement_ramp' or 'auto', not true/false"
            )
        return value


class AdaptMethod(TrainState):
    """Base class: ``Config``, ``name``, ``presets`` (``paper``, ``cpu``), ``online``, ``stages()``.

    The contract with the engine and the API is a distillation method's (``dfkt.dfkd.base.DistillMethod``):
    named random streams, one ``keep(...)`` call per thing a resume needs, and a ``report()`` the API reads.
    """

    Config: ClassVar[type[StrictModel]]
    name: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    summary: ClassVar[str] = ""
    online: ClassVar[bool] = False

    def __init__(self, cfg: Any, setup: AdaptSetup):
        super().__init__(setup.engine.device)
        self.cfg, self.setup, self.engine = cfg, setup, setup.engine
        self.model = setup.model
        self.images = setup.images
        self.keep("model", self.model)
        self.batches = EpochBatches(self, self.engine, len(self.images), getattr(cfg, "batch_size", 1))
        # Online methods' predictions as the stream went by (-1: not seen yet).
        self.keep(
            "online_predictions", torch.full((len(self.images),), -1, dtype=torch.long, device=self.engine.device)
        )

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one pass over the images this process adapts on."""
        return self.batches.steps_per_epoch

    def report(self) -> AdaptReport:
        return AdaptReport(self.buffers["online_predictions"].cpu() if self.online else None)

    def optimizer(self, params: list[nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The method's optimizer over ``params``: parameters, or param groups (dicts with their own lr)."""
        cfg = self.cfg
        return self.engine.prepare_optimizer(
            make_optimizer(
                params, cfg.optimizer, cfg.lr, getattr(cfg, "momentum", 0.9), cfg.weight_decay, nesterov=True
            )
        )

    def stages(self) -> list[Stage]:
        raise NotImplementedError


def model_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every parameter of a classifier under ``backbone`` (the feature extractor), ``bottleneck`` or
    ``head``. SHOT-shaped models (models/shot.py) keep the extractor at ``backbone.extractor`` and
    the bottleneck in the rest of ``backbone``; in other classifiers all of ``backbone`` is the
    extractor. Parameters outside ``backbone`` and ``head`` count as backbone."""
    extractor = getattr(model.backbone, "extractor", model.backbone)
    head = {id(p) for p in model.head.parameters()}
    extracting = {id(p) for p in extractor.parameters()}
    parts: dict[str, list[nn.Parameter]] = {"backbone": [], "bottleneck": [], "head": []}
    bottleneck = {id(p) for p in model.backbone.parameters()} - extracting
    for p in model.parameters():
        parts["head" if id(p) in head else "bottleneck" if id(p) in bottleneck else "backbone"].append(p)
    return parts


def parameter_groups(
    model: nn.Module, params: list[nn.Parameter], lr: float, multipliers: dict[str, float]
) -> list[dict[str, Any]]:
    """Param groups of ``params`` (the trainable ones), one per part of ``model_parts`` that has any,
    each with lr = ``lr`` × its part's multiplier and a ``name``."""
    wanted = {id(p) for p in params}
    groups = []
    for part, members in model_parts(model).items():
        chosen = [p for p in members if id(p) in wanted]
        if chosen:
            groups.append({"params": chosen, "lr": lr * multipliers[part], "name": part})
    return groups


def bottleneck_modules(model: nn.Module) -> list[nn.Module]:
    """The bottleneck's modules (``model_parts``' ``bottleneck``): the children of ``backbone`` other
    than ``backbone.extractor``; none when the backbone has no separate extractor."""
    extractor = getattr(model.backbone, "extractor", None)
    if extractor is None:
        return []
    return [m for m in model.backbone.children() if m is not extractor]


@contextlib.contextmanager
def dropout_off(*modules: nn.Module) -> Iterator[None]:
    """Dropout layers of ``modules`` in eval mode (identity) for the block, every other layer's mode
    (e.g. BatchNorm training on the batch) untouched; then each dropout layer's mode as before.
    Gradients flow as usual."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    before = [m.training for m in layers]
    for m in layers:
        m.training = False
    try:
        yield
    finally:
        for m, training in zip(layers, before):
            m.training = training


def batchnorm_layers(
    model: nn.Module, method: str, include_batchnorm1d: bool = False
) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers Tent and BN-adapt adapt: BatchNorm2d, and BatchNorm1d when asked."""
    every = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not every:
        raise ConfigError(
            f"{method} adapts BatchNorm layers and this source model has none; use shot, nrc or "
            "aad, or a source model with BatchNorm2d (e.g. 'dfkt train-source --model shot_dtn')"
        )
    kinds = (nn.BatchNorm2d, nn.BatchNorm1d) if include_batchnorm1d else (nn.BatchNorm2d,)
    layers = [m for m in every if isinstance(m, kinds)]
    if not layers:
        has = ", ".join(sorted({type(m).__name__ for m in every}))
        raise ConfigError(
            f"{method} adapts BatchNorm2d layers (as the authors' Tent) and this source model has only "
            f"{has}; pass --set params.include_batchnorm1d=true to adapt its BatchNorm1d, or use a "
            "source model with BatchNorm2d (e.g. 'dfkt train-source --model shot_dtn')"
        )
    return layers
