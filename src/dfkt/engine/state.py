"""A container for everything a training run must carry across a restart."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class TrainState:
    """Trainable modules, optimizers, schedulers, random streams and tensors, kept in tables so that
    one generic ``state_dict`` captures all a resume needs. A method and its parts put things in the
    tables with ``keep``; they read them back from the tables by name (``modules["generator"]``), and
    update a tensor by assigning it anew (``buffers["references"] = ...``)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device  # where buffers loaded from a checkpoint go (they are saved on the CPU)
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.rngs: dict[str, torch.Generator] = {}
        self.buffers: dict[str, Tensor] = {}

    def keep(self, name: str, *things: Any) -> None:
        """Put ``things`` in the checkpoint under ``name``: modules, optimizers, lr schedulers, random
        streams (``Engine.rng``) and tensors, each kind in its own table, so a module, its optimizer and
        its noise may share a name. A name taken twice in one table is an error: two parts of a method
        would otherwise overwrite each other's state in the checkpoint."""
        for thing in things:
            table = self._table_for(thing)
            if name in table:
                raise ValueError(
                    f"{type(self).__name__} already keeps a {type(thing).__name__} named {name!r} in "
                    "its checkpoint; give the new one its own name"
                )
            table[name] = thing

    def _table_for(self, thing: Any) -> dict[str, Any]:
        if isinstance(thing, torch.Generator):
            return self.rngs
        if isinstance(thing, Tensor):
            return self.buffers
        if isinstance(thing, nn.Module):
            return self.modules
        if isinstance(thing, torch.optim.Optimizer):
            return self.optimizers
        if isinstance(thing, torch.optim.lr_scheduler.LRScheduler):
            return self.schedulers
        raise TypeError(
            f"cannot keep a {type(thing).__name__} in a checkpoint: it is not a module, optimizer, "
            "lr scheduler, random stream or tensor"
        )

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
