"""The synthesizer interface.

``synthesize()`` advances the data source by one unit of work (one generator update, one
inverted batch added to a pool) and returns named values to log; ``sample(n, rng)`` returns
``n`` images without gradients, with the teacher's logits on them when those are cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor | None]  # images, cached teacher logits (None: ask the teacher)
# objective(images, z or targets) -> named terms including "loss", which synthesis minimises.
Objective = Callable[[Tensor, Tensor], dict[str, Tensor]]


class Synthesizer(Protocol):
    def synthesize(self) -> dict[str, Tensor | float]: ...

    def sample(self, n: int, rng: torch.Generator) -> Batch: ...
