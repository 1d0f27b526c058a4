"""A container for everything a training run must carry across a restart."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class TrainState:
    """Trainable modules, optimizers, schedulers, private RNGs and tensors, kept in dicts so that
    one generic ``state_dict`` captures all a resume needs. Subclasses fill the dicts."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device  # where buffers loaded from a checkpoint go (they are saved on the CPU)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.rngs: dict[str, torch.Generator] = {}
        self.buffers: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "rngs": {k: g.get_state() for k, g in self.rngs.items()},
            "buffers": {k: v.detach().cpu() for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, module in self.modules.items():
            module.load_state_dict(state["modules"][key])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        for key, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][key])
        for key, gen in self.rngs.items():
            gen.set_state(state["rngs"][key])
        for key, value in state["buffers"].items():
            current = self.buffers.get(key)
            device = current.device if current is not None else self.device
            self.buffers[key] = value if device is None else value.to(device)
