"""A fixed-capacity pool of synthetic images with the teacher's logits on them."""

from __future__ import annotations

import torch
from torch import Tensor

from dfkt.engine.state import TrainState
from dfkt.synthesis.base import Batch


class ImagePool:
    """A ring buffer: once full, each new batch overwrites the oldest images.

    The tensors are kept in the owner's ``TrainState`` (``keep``), so the checkpoint carries the pool and
    a resumed run continues with exactly the images it had (pixel-inverted images cannot be redrawn).

    With ``holdout``, a tenth of each batch added goes to a separate ``validation`` pool until it
    holds ``holdout`` images: synthetic images the student never trains on, for label-free selection.
    """

    def __init__(self, state: TrainState, capacity: int, name: str = "pool", holdout: int = 0):
        self.state = state
        self.capacity = capacity
        self.keys = (f"{name}.images", f"{name}.logits", f"{name}.added")
        self.validation = ImagePool(state, holdout, f"{name}.validation") if holdout else None

    @property
    def added(self) -> int:
        """How many images were ever added (the pool holds the last ``capacity`` of them)."""
        count = self.state.buffers.get(self.keys[2])
        return 0 if count is None else int(count.item())

    @property
    def size(self) -> int:
        """Images held now. (A property, not __len__: an empty pool must not read as false.)"""
        return min(self.added, self.capacity)

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def add(self, images: Tensor, logits: Tensor) -> None:
        if self.validation is not None and not self.validation.full and len(images) > 1:
            kept = len(images) - min(self.validation.capacity - self.validation.size, max(1, len(images) // 10))
            self.validation.add(images[kept:], logits[kept:])
            images, logits = images[:kept], logits[:kept]
        images, logits = images.detach().float()[: self.capacity], logits.detach().float()[: self.capacity]
        images_key, logits_key, count_key = self.keys
        if count_key not in self.state.buffers:  # the first batch gives the shapes (a resume loads them)
            self.state.keep(images_key, images.new_zeros((self.capacity, *images.shape[1:])))
            self.state.keep(logits_key, logits.new_zeros((self.capacity, *logits.shape[1:])))
            self.state.keep(count_key, torch.zeros((), dtype=torch.long))
        start = self.added % self.capacity
        rows = (torch.arange(images.shape[0], device=images.device) + start) % self.capacity
        self.state.buffers[images_key][rows] = images
        self.state.buffers[logits_key][rows] = logits
        self.state.buffers[count_key] += images.shape[0]

    def held_out(self) -> Tensor | None:
        """The validation images, once there are ``holdout`` of them (a fixed set to compare against)."""
        return (
            self.state.buffers[self.validation.keys[0]]
            if self.validation is not None and self.validation.full
            else None
        )

    def sample(self, n: int, rng: torch.Generator) -> Batch:
        if self.size == 0:
            raise RuntimeError("sample() from an empty pool: synthesize() must run first")
        images = self.state.buffers[self.keys[0]]
        index = torch.randint(0, self.size, (n,), device=images.device, generator=rng)
        return images[index], self.state.buffers[self.keys[1]][index]
