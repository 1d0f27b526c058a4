"""Label-free checkpoint selection for data-free distillation.

A user without test labels cannot pick the best-on-test student; the teacher is the only judge
there is. At every evaluation the student is scored by its agreement with the teacher (the share
of equal arg-max predictions) on a fixed set of synthetic images it never trains on, and the most
agreeing weights are kept. The best-on-test student stays in reports only as a labelled oracle.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from dfkt.engine import Engine
from dfkt.engine.state import TrainState

VALIDATION_IMAGES = 256


class TeacherAgreementSelection:
    """Keeps, in ``state`` (so the checkpoint carries it), the student weights with the highest
    teacher agreement seen so far on ``held_out(n)``'s images, drawn once when first available."""

    def __init__(self, state: TrainState, student: nn.Module, teacher: nn.Module, engine: Engine,
                 held_out: Callable[[int], Tensor | None]):
        self.state, self.student, self.teacher, self.engine, self.held_out = state, student, teacher, engine, held_out
        state.modules["selected_student"] = copy.deepcopy(student).requires_grad_(False)
        state.buffers["selection.agreement"] = torch.tensor(-1.0)
        state.buffers["selection.updates"] = torch.tensor(0)
        state.buffers["selection.chosen"] = torch.tensor(-1)  # which update (evaluation) it was chosen at

    @torch.no_grad()
    def _predict(self, model: nn.Module, images: Tensor) -> Tensor:
        with self.engine.eval_mode(model), self.engine.autocast():
            return model(images).argmax(dim=1)

    def _validation(self) -> tuple[Tensor, Tensor] | None:
        buffers = self.state.buffers
        if "selection.images" not in buffers:
            images = self.held_out(VALIDATION_IMAGES)
            if images is None:
                return None
            buffers["selection.images"] = images.detach().float()
            buffers["selection.teacher"] = self._predict(self.teacher, buffers["selection.images"])
        return buffers["selection.images"], buffers["selection.teacher"]

    def update(self) -> float | None:
        """Score the student now; keep it if it agrees best. None while no held-out set exists yet."""
        buffers = self.state.buffers
        buffers["selection.updates"] = buffers["selection.updates"] + 1
        validation = self._validation()
        if validation is None:
            return None
        images, teacher_says = validation
        agreement = (self._predict(self.student, images) == teacher_says).float().mean().item()
        if agreement > buffers["selection.agreement"].item():
            buffers["selection.agreement"] = torch.tensor(agreement)
            buffers["selection.chosen"] = buffers["selection.updates"] - 1
            self.state.modules["selected_student"].load_state_dict(self.student.state_dict())
        return agreement

    @property
    def chosen(self) -> nn.Module | None:
        """The selected student, or None when no evaluation had a held-out set to score on."""
        return self.state.modules["selected_student"] if self.chosen_at is not None else None

    @property
    def chosen_at(self) -> int | None:
        """The index of the evaluation whose weights were kept."""
        index = int(self.state.buffers["selection.chosen"].item())
        return index if index >= 0 else None

    @property
    def agreement(self) -> float | None:
        return self.state.buffers["selection.agreement"].item() if self.chosen_at is not None else None
