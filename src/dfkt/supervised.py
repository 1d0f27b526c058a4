"""Training on real images: the teacher, and the two reference students reported beside DFKD
(trained on labels; trained by KD from the teacher on the real training images)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkt import losses
from dfkt.config import RealTrainingConfig
from dfkt.data.augment import shift_and_flip
from dfkt.engine import Engine, Stage
from dfkt.engine.state import TrainState


class RealDataTraining(TrainState):
    """One model trained on real, normalised images: by cross-entropy on labels, or, when a
    teacher is given, by KD on the teacher's outputs (labels unused)."""

    def __init__(self, engine: Engine, model: nn.Module, images: Tensor, labels: Tensor,
                 cfg: RealTrainingConfig, teacher: nn.Module | None = None, name: str = "train"):
        super().__init__()
        self.engine, self.cfg, self.name, self.teacher = engine, cfg, name, teacher
        self.images = engine.to_device(images)
        self.labels = labels.to(engine.device)
        self.model = engine.prepare(model, trainable=True)
        self.modules["model"] = model
        params = self.model.parameters()
        if cfg.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  nesterov=cfg.momentum > 0)
        self.optimizer = self.optimizers["model"] = engine.prepare_optimizer(opt)
        self.steps_per_epoch = math.ceil(len(self.images) / cfg.batch_size)
        self.schedulers["model"] = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=cfg.epochs * self.steps_per_epoch)
        self.rngs["order"] = engine.noise_generator(offset=10)
        self.buffers["order"] = torch.arange(len(self.images), device=engine.device)

    def step(self, i: int) -> dict[str, Tensor]:
        position = i % self.steps_per_epoch
        if position == 0:  # a new epoch: a new order, kept in the state so a resume continues it
            self.buffers["order"] = torch.randperm(len(self.images), device=self.engine.device,
                                                   generator=self.rngs["order"])
        index = self.buffers["order"][position * self.cfg.batch_size:(position + 1) * self.cfg.batch_size]
        images = self.images[index]
        if self.cfg.augment:
            images = shift_and_flip(images, self.rngs["order"])
        logits = self.model(images)
        if self.teacher is None:
            loss = F.cross_entropy(logits.float(), self.labels[index], label_smoothing=self.cfg.label_smoothing)
        else:
            with torch.no_grad():
                target = self.teacher(images)
            loss = losses.kd_loss(logits, target, self.cfg.temperature or 4.0)
        self.engine.optimize(loss, self.optimizer, f"{self.name} loss")
        self.schedulers["model"].step()
        return {"loss": loss}

    def stages(self) -> list[Stage]:
        frozen = [self.teacher] if self.teacher is not None else []
        return [Stage(self.name, self.cfg.epochs * self.steps_per_epoch, self.step, train=[self.model],
                      frozen=frozen, evaluate=True)]


@torch.no_grad()
def evaluate_model(model: nn.Module, images: Tensor, labels: Tensor, engine: Engine,
                   num_classes: int, batch_size: int = 1000) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class) on normalised images."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with engine.eval_mode(model), engine.autocast():
        for start in range(0, len(images), batch_size):
            x = engine.to_device(images[start:start + batch_size])
            predicted = model(x).argmax(dim=1).cpu()
            truth = labels[start:start + batch_size].cpu()
            confusion += torch.bincount(truth * num_classes + predicted,
                                        minlength=num_classes**2).reshape(num_classes, num_classes)
    per_class = (confusion.diag().float() / confusion.sum(dim=1).clamp_min(1)).tolist()
    return {"accuracy": confusion.diag().sum().item() / max(1, confusion.sum().item()),
            "per_class": per_class, "confusion": confusion.tolist()}
