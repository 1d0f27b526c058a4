"""Training on real images: the teacher, and the two reference students reported beside DFKD
(trained on labels; trained by KD from the teacher on the real training images)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkt import losses
from dfkt.config import RealTrainingConfig
from dfkt.data.augment import crop_and_rotate, shift_and_flip
from dfkt.engine import Engine, Stage
from dfkt.engine.state import TrainState
from dfkt.training import EpochBatches, make_optimizer, shot_decay


class RealDataTraining(TrainState):
    """One model trained on real, normalised images: by cross-entropy on labels, or, when a
    teacher is given, by KD on the teacher's outputs (labels unused).

    With ``holdout`` (images, labels kept apart from training), every epoch ends with an
    evaluation on them and the best epoch's weights are kept (``best``), so the model is chosen
    without the test set.
    """

    def __init__(
        self,
        engine: Engine,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        cfg: RealTrainingConfig,
        teacher: nn.Module | None = None,
        name: str = "train",
        holdout: tuple[Tensor, Tensor] | None = None,
    ):
        super().__init__(engine.device)
        self.engine, self.cfg, self.name, self.teacher, self.holdout = engine, cfg, name, teacher, holdout
        self.num_classes = model.num_classes
        self.images = engine.to_device(images)
        self.labels = labels.to(engine.device)
        self.model = engine.prepare(model, trainable=True)
        opt = make_optimizer(
            list(self.model.parameters()), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, nesterov=True
        )
        self.optimizer = engine.prepare_optimizer(opt)
        self.batches = EpochBatches(self, engine, len(self.images), cfg.batch_size)
        # crop_rotate fills with black, before normalisation as in torchvision: the images' darkest value.
        self.fill = self.images.amin(dim=(0, 2, 3)) if cfg.augment == "crop_rotate" else None
        self.steps_per_epoch = self.batches.steps_per_epoch
        total = cfg.epochs * self.steps_per_epoch
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
            if cfg.lr_schedule == "cosine"
            else shot_decay(self.optimizer, total)
        )
        self.keep("model", model, self.optimizer, scheduler)
        if holdout is not None:
            self.keep("best", copy.deepcopy(model).requires_grad_(False))
            self.keep("best_holdout_acc", torch.tensor(-1.0))

    def step(self, i: int) -> dict[str, Tensor]:
        index = self.batches(i)
        images = self.images[index]
        if self.cfg.augment == "crop_rotate":  # SHOT's USPS->MNIST source: 4 px of 28, ±10 degrees
            images = crop_and_rotate(
                images, self.rngs["order"], max(1, round(images.shape[3] * 4 / 28)), 10.0, self.fill
            )
        elif self.cfg.augment:
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
        if self.holdout is not None and (i + 1) % self.steps_per_epoch == 0:
            return {"loss": loss, "holdout_acc": self.keep_if_best()}
        return {"loss": loss}

    def keep_if_best(self) -> float:
        images, labels = self.holdout
        accuracy = evaluate_model(self.model, images, labels, self.engine, self.num_classes)["accuracy"]
        self.engine.metrics.write({"event": "holdout", "stage": self.name, "holdout_acc": accuracy})
        if accuracy > self.buffers["best_holdout_acc"].item():
            self.buffers["best_holdout_acc"] = torch.tensor(accuracy)
            self.modules["best"].load_state_dict(self.modules["model"].state_dict())
        return accuracy

    @property
    def holdout_acc(self) -> float | None:
        """The chosen epoch's accuracy on the holdout images (None without them)."""
        return self.buffers["best_holdout_acc"].item() if self.holdout is not None else None

    def chosen(self) -> nn.Module:
        """The model to keep: the best epoch on the holdout images, else the last."""
        return self.modules["best"] if self.holdout is not None else self.modules["model"]

    def stages(self) -> list[Stage]:
        frozen = [self.teacher] if self.teacher is not None else []
        return [
            Stage(
                self.name,
                self.cfg.epochs * self.steps_per_epoch,
                self.step,
                train=[self.model],
                frozen=frozen,
                evaluate=True,
            )
        ]


@torch.no_grad()
def predict_classes(model: nn.Module, images: Tensor, engine: Engine, batch_size: int = 1000) -> Tensor:
    """The class ``model`` (in eval mode, at the run's precision) predicts for each normalised image, on the CPU."""
    with engine.eval_mode(model), engine.autocast():
        return torch.cat(
            [
                model(engine.to_device(images[start : start + batch_size])).argmax(dim=1).cpu()
                for start in range(0, len(images), batch_size)
            ]
        )


def evaluate_model(
    model: nn.Module, images: Tensor, labels: Tensor, engine: Engine, num_classes: int, batch_size: int = 1000
) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class) on normalised images."""
    predicted = predict_classes(model, images, engine, batch_size)
    confusion = torch.bincount(labels.cpu() * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    per_class = (confusion.diag().float() / confusion.sum(dim=1).clamp_min(1)).tolist()
    return {
        "accuracy": confusion.diag().sum().item() / max(1, confusion.sum().item()),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
