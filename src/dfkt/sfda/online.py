"""Online adaptation: each target batch is seen once and predicted as it arrives.

BN-adapt (AdaBN, Li et al. 2016; Schneider et al. 2020): BatchNorm layers normalise with the
target batch's statistics, and their running statistics become the average over the target
stream; nothing is trained.
Tent (Wang et al., ICLR 2021): the same, plus one step per batch on the mean prediction entropy,
training only the BatchNorm affine parameters. Tent scores the predictions made before each
step; its running statistics (used afterwards, e.g. on held-out target images) average the stream.
Both run the rest of the model in eval mode (no dropout). As the authors' Tent, they adapt the
BatchNorm2d layers only (a model without any is refused); ``include_batchnorm1d`` adds BatchNorm1d
layers (e.g. a SHOT bottleneck's), which otherwise keep their source statistics.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from dfkt import losses
from dfkt.engine import Stage
from dfkt.errors import ConfigError
from dfkt.registry import ADAPT_METHODS
from dfkt.sfda.base import AdaptMethod, AdaptSetup, BatchNormConfig, batchnorm_layers


class TentConfig(BatchNormConfig):
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


@ADAPT_METHODS.register("bn_adapt")
class BNAdapt(AdaptMethod):
    Config = BatchNormConfig
    name = "bn_adapt"
    summary = "online: BatchNorm uses target statistics; nothing trained"
    online = True
    presets = {"paper": {}, "cpu": {}}

    def __init__(self, cfg: BatchNormConfig, setup: AdaptSetup):
        super().__init__(cfg, setup)
        self.bn = batchnorm_layers(self.model, self.name, cfg.include_batchnorm1d)
        for layer in self.bn:  # a cumulative average over the target stream (restored on resume)
            layer.reset_running_stats()
            layer.momentum = None

    def predict(self, i: int) -> Tensor:
        index = self.batches(i)
        logits = self.model(self.images[index])
        gather = self.engine.gather_rows  # every rank's predictions, with several processes
        self.buffers["online_predictions"][gather(index)] = gather(logits.detach().argmax(dim=1))
        return logits

    def step(self, i: int) -> dict[str, Tensor | float]:
        with torch.no_grad():
            return {"entropy": losses.entropy(self.predict(i))}

    def stages(self) -> list[Stage]:
        # The engine puts the model in eval mode, then its BatchNorm layers in train mode.
        return [
            Stage(
                "adapt",
                self.batches.steps_per_epoch,
                self.step,
                train=list(self.bn),
                frozen=[self.model],
                evaluate=True,
            )
        ]


@ADAPT_METHODS.register("tent")
class Tent(BNAdapt):
    Config = TentConfig
    name = "tent"
    summary = "online: entropy minimisation on BatchNorm affine parameters, one step per batch"
    presets = {"paper": {}, "cpu": {}}  # CIFAR-10-C in the paper: Adam 1e-3, batch 200

    def __init__(self, cfg: TentConfig, setup: AdaptSetup):
        super().__init__(cfg, setup)
        self.model.requires_grad_(False)
        params = [p for layer in self.bn for p in (layer.weight, layer.bias) if p is not None]
        if not params:
            raise ConfigError(
                "tent trains BatchNorm affine parameters and this model's BatchNorm layers have none; use bn_adapt"
            )
        for p in params:
            p.requires_grad_(True)
        self.keep("model", self.optimizer(params))

    def step(self, i: int) -> dict[str, Tensor | float]:
        loss = losses.entropy(self.predict(i))
        self.engine.optimize(loss, self.optimizers["model"], "Tent entropy")
        return {"entropy": loss}
