"""Several processes (ranks) training one model: the collectives the engine uses.

Replicas are the trainable modules the engine prepared: they start from rank 0's weights, their
gradients are averaged over ranks before every optimizer step, and their buffers (BatchNorm
statistics) are averaged before every checkpoint, so every rank holds the same weights. Anything
else (synthesis noise, per-batch generators, pools) is each rank's own.

Why not DDP's module wrapper: its reducer expects the same parameters to get gradients in every
backward, and adversarial methods freeze the student inside the generator's step; SFDA calls
``forward_features`` and ``classify`` apart, which Fabric refuses under DDP. Averaging the
gradients in one flat all-reduce per step gives the same update for every method.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.strategies import DDPStrategy
from torch import Tensor, nn


class ReplicaStrategy(DDPStrategy):
    """Fabric's DDP launcher, process group and collectives, without the DDP module wrapper."""

    def setup_module(self, module: nn.Module) -> nn.Module:
        return module


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    """End the process group before the interpreter does: left to exit, gloo's threads can abort
    rank 0 ("terminate called without an active exception") after a finished run. Not a collective:
    a rank that failed alone still exits."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside multi-process runs and on rank 0: the process that writes files and prints."""
    return not active() or dist.get_rank() == 0


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank, in place."""
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Mean of each gradient over ranks, in one all-reduce. Every rank runs the same code, so the
    same parameters have gradients on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: nn.Module) -> None:
    """Floating buffers (BatchNorm running statistics) averaged over ranks; counters from rank 0."""
    world = dist.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world
        else:
            dist.broadcast(buffer, src=0)


def agree(flags: list[bool]) -> list[bool]:
    """Rank 0's decisions (time budget, time-based checkpoints and evaluations) for every rank:
    clocks differ, and a collective that only some ranks enter hangs."""
    if not active():
        return flags
    tensor = torch.tensor(flags, dtype=torch.uint8)
    dist.broadcast(tensor, src=0)
    return [bool(v) for v in tensor.tolist()]


def agree_value(value: float) -> float:
    """Rank 0's value of a clock-derived number (e.g. a stage's progress) for every rank."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(tensor: Tensor) -> Tensor:
    """Rows of every rank, concatenated in rank order; each rank must give the same shape."""
    if not active():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def state_sha256(modules: Iterable[nn.Module]) -> str:
    """A digest of the weights and buffers of ``modules``: equal digests mean identical replicas."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
