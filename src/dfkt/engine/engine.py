"""The engine: the one place that knows about devices, precision, seeding, checkpoints,
metrics and progress bars. Methods describe *what* to optimise as stages; the engine runs them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfkt.config import EngineConfig
from dfkt.engine import checkpoint, distributed
from dfkt.engine.cpu import cpu_has_native_bf16
from dfkt.engine.lock import lock_run_dir
from dfkt.engine.metrics import MetricsLog, environment
from dfkt.engine.streams import stream_seed
from dfkt.errors import DfktError, TrainingDivergedError

CHECKPOINT = "checkpoint.pt"
# Unless a run sets its evaluation interval, a stage marked ``evaluate`` is scored about EVAL_POINTS
# times (over its planned steps, or with a budget over the time it can have, whichever ends first),
# and never more often than keeps the evaluations under EVAL_SHARE of its training time.
EVAL_POINTS = 20
EVAL_SHARE = 0.05
FABRIC_LOGGERS = ("lightning_fabric", "lightning.fabric")  # set to WARNING by Engine(), not at import


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Stage:
    """A run of ``steps`` identical optimisation steps.

    ``step(i)`` does one step (asking the engine to optimise) and returns named values to log.
    ``train``/``frozen`` list the modules the engine puts in train/eval mode for this stage.
    ``begin`` runs when the stage starts or resumes; it must draw randomness only from its own
    named streams (``Engine.rng``) so a resumed run matches an uninterrupted one.
    ``budget_share``: with a run budget (``max_seconds``), the stage ends once it has trained for
    this share of it and the run moves on, so a later stage (the student) always gets its part.
    """

    name: str
    steps: int
    step: Callable[[int], dict[str, Tensor | float]]
    train: list[nn.Module] = field(default_factory=list)
    frozen: list[nn.Module] = field(default_factory=list)
    begin: Callable[[], None] | None = None
    evaluate: bool = False
    budget_share: float | None = None
    autocast: bool = True  # False: this stage runs in fp32 whatever the engine's precision


@dataclass
class RunResult:
    seconds: dict[str, float]
    stopped_by_budget: bool
    evaluations: list[dict[str, Any]]
    sections: dict[str, float] = field(default_factory=dict)  # timed() parts inside stages
    replica_sha256: list[str] = field(default_factory=list)  # per rank: the trained weights' digest
    evaluation_seconds: float = 0.0  # spent in on_eval, outside the training time


class Engine:
    def __init__(self, cfg: EngineConfig, run_dir: Path | None = None):
        from lightning_fabric import Fabric

        self.cfg = cfg
        for name in FABRIC_LOGGERS:  # Fabric's info lines (devices, precision) would drown the progress bars
            logging.getLogger(name).setLevel(logging.WARNING)
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=False)
        accelerator = cfg.accelerator
        if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
            accelerator = "cpu"
        self.precision = resolve_precision(cfg.precision, accelerator)
        several = cfg.devices * cfg.num_nodes > 1
        launched = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun (and by Fabric for its children)
        if launched > 1 and not several and not torch.distributed.is_initialized():
            raise DfktError(
                f"started as one of {launched} processes (WORLD_SIZE={launched}) with --devices "
                f"{cfg.devices} --num-nodes {cfg.num_nodes}: every process would write the same run "
                f"alone; pass --devices (processes per machine) and --num-nodes to match"
            )
        self.fabric = Fabric(
            accelerator=accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=distributed.ReplicaStrategy() if several else "auto",
            precision=self.precision,
        )
        if several:  # starts the other local ranks (or joins torchrun's / SLURM's); later engines join the group
            self.fabric.launch()
            # Python API runs and scripts end the group too, not only the CLI (see distributed.shutdown).
            atexit.register(distributed.shutdown)
        if cfg.threads is not None:  # after launch, which divides the cores between local ranks
            torch.set_num_threads(cfg.threads)
        self.seed_everything(cfg.seed)
        self.replicas: list[nn.Module] = []  # trainable modules kept identical on every rank
        self.replicated: set[int] = set()  # ids of their parameters: the gradients to average
        self.per_rank_rngs: list[torch.Generator] = []
        # How far the running stage is, 0..1: its steps, or with a budget its share of the time it
        # can have, whichever is further (read by time-aware schedules such as a cosine student lr).
        self.stage_progress = 0.0
        # Training seconds of the budget left when the running stage's begin() started (None: no budget),
        # so one-off work such as filling a pool can size itself to the time there is.
        self.budget_left: float | None = None
        # The running run's time budget (None: fixed steps), for settings that apply only under a budget.
        self.max_seconds: float | None = None
        # Every rank writes into rank 0's folder (its default name carries rank 0's clock).
        self.run_dir = self.fabric.broadcast(run_dir, 0) if several else run_dir
        log_path, self.run_lock, refused = None, None, None
        if self.run_dir is not None and self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.run_lock = lock_run_dir(self.run_dir)
            except DfktError as exc:
                refused = str(exc)
        if several and self.run_dir is not None:
            refused = self.fabric.broadcast(refused, 0)  # every rank stops with rank 0's reason
        if refused:
            raise DfktError(refused)
        if self.run_dir is not None and self.is_main:
            env = environment(self.device, self.precision, self.world_size)
            env["channels_last"] = cfg.channels_last
            (self.run_dir / "env.json").write_text(json.dumps(env, indent=2))
            log_path = self.run_dir / "metrics.jsonl"
        self.metrics = MetricsLog(log_path)
        self.sections: dict[str, float] = {}

    # -- devices and precision ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def is_main(self) -> bool:
        return self.fabric.is_global_zero

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every rank's rows (the same shape on each), concatenated in rank order."""
        return distributed.gather_rows(tensor)

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's share of ``n`` items split evenly between ranks: (start, end)."""
        per_rank = -(-n // self.world_size)
        start = min(n, self.fabric.global_rank * per_rank)
        return start, min(n, start + per_rank)

    def scaling(self, batch_sizes: dict[str, int]) -> dict[str, Any]:
        """The effective batch sizes and the learning-rate rule of this run, logged and returned."""
        info = {
            "world_size": self.world_size,
            "per_rank_batch": batch_sizes,
            "effective_batch": {k: v * self.world_size for k, v in batch_sizes.items()},
            "lr_scaling": (
                "linear: every learning rate x world size"
                if self.cfg.lr_scaling == "linear"
                else "none: learning rates as configured"
            ),
        }
        self.metrics.write({"event": "scaling", **info})
        return info

    def _memory_format(self) -> dict[str, Any]:
        return {"memory_format": torch.channels_last} if self.cfg.channels_last else {}

    def prepare(self, module: nn.Module, trainable: bool) -> nn.Module:
        """Move a module to the device. Frozen modules are never wrapped (no DDP on a teacher)."""
        module = module.to(self.device, **self._memory_format())
        if not trainable:
            module.eval().requires_grad_(False)
            return module
        if self.world_size > 1:
            distributed.broadcast_module(module)
        self.replicas.append(module)
        self.replicated.update(id(p) for p in module.parameters())
        return self.fabric.setup_module(module)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.cfg.lr_scaling == "linear":
            for group in optimizer.param_groups:
                group["lr"] *= self.world_size
        return self.fabric.setup_optimizers(optimizer)

    def to_device(self, tensor: Tensor) -> Tensor:
        tensor = tensor.to(self.device, non_blocking=True)
        if tensor.dim() == 4 and tensor.is_floating_point():
            tensor = tensor.contiguous(**self._memory_format())
        return tensor

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's precision for the block (Fabric's autocast; the plugin's own method, so it still
        applies inside ``full_precision()``)."""
        plugin = self.fabric.strategy.precision
        return type(plugin).forward_context(plugin)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """fp32 for the block, also inside trainable (Fabric-wrapped) modules, which otherwise cast their
        inputs and autocast on their own; an explicit ``autocast()`` within the block still applies.
        For tiny networks on a CPU, where bf16 casts cost more than they save."""
        plugin = self.fabric.strategy.precision
        plugin.forward_context = contextlib.nullcontext  # instance attributes shadow the plugin's methods
        plugin.convert_input = lambda data: data
        try:
            yield
        finally:
            del plugin.forward_context, plugin.convert_input

    @contextlib.contextmanager
    def eval_mode(self, *modules: nn.Module) -> Iterator[None]:
        """Eval mode (BatchNorm running statistics, no dropout) for the block, then the modes
        the modules had before: the one place outside stages where modes change."""
        before = [(sub, sub.training) for m in modules for sub in m.modules()]
        for m in modules:
            m.eval()
        try:
            yield
        finally:  # per submodule: a model with only its BatchNorm layers training comes back as it was
            for sub, training in before:
                sub.training = training

    def seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def rng(self, name: str, per_rank: bool = True) -> torch.Generator:
        """A new generator for the random stream ``name``, seeded from the run's seed and the name alone
        (``dfkt.engine.streams``): different on every rank (synthesis noise), or with ``per_rank=False``
        the same on all (e.g. the order of a dataset the ranks split). A stream drawn from while training
        goes in the method's checkpoint (``TrainState.keep``), so a resumed run continues it exactly."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(stream_seed(self.cfg.seed, name, self.fabric.global_rank if per_rank else None))
        if per_rank:
            self.per_rank_rngs.append(gen)
        return gen

    @contextlib.contextmanager
    def timed(self, section: str) -> Iterator[None]:
        """Time a part of a step (e.g. synthesis inside a joint student stage); kept across resumes."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sections[section] = self.sections.get(section, 0.0) + time.perf_counter() - started

    # -- optimisation -----------------------------------------------------------------------
    def input_gradient(self, loss: Tensor, inputs: Tensor) -> Tensor:
        """∂loss/∂inputs for a leaf ``inputs`` that requires grad. Through Fabric's backward: its wrapped
        modules refuse a bare ``torch.autograd.grad`` under mixed precision. A loss scaler's factor (16-mixed)
        is divided out. Weights that require grad get ``.grad`` too: callers freeze what must stay clean."""
        inputs.grad = None
        self.fabric.backward(loss)
        grad = inputs.grad
        inputs.grad = None
        scaler = getattr(self.fabric.strategy.precision, "scaler", None)
        return grad / scaler.get_scale() if scaler is not None else grad

    def optimize(
        self, loss: Tensor, optimizer: torch.optim.Optimizer, what: str = "loss", clip_norm: float | None = None
    ) -> None:
        """Backward, step, zero grads; refuse to train on inf/NaN. With ``clip_norm`` the gradients of the
        optimizer's parameters are rescaled to at most that total L2 norm before the step."""
        if not torch.isfinite(loss.detach()):
            raise TrainingDivergedError(
                f"{what} became {loss.item()} ; lower the learning rate or use --set engine.precision=32-true"
            )
        optimizer.zero_grad(set_to_none=True)
        self.fabric.backward(loss)
        if self.world_size > 1:
            distributed.average_gradients(
                p for group in optimizer.param_groups for p in group["params"] if id(p) in self.replicated
            )
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
            raise TrainingDivergedError(
                f"{what} gave inf/NaN gradients (weights left untouched); lower the "
                "learning rate or use --set engine.precision=32-true"
            )
        if clip_norm is not None and grads:
            # Fabric's wrapper hides the optimizer a mixed-precision scaler tracks: unscale the one inside.
            self.fabric.strategy.precision.unscale_gradients(getattr(optimizer, "optimizer", optimizer))
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None], clip_norm
            )
        optimizer.step()

    def fingerprint(self) -> dict[str, Any]:
        """The engine settings that change a run's numbers; a resume must keep them."""
        return {
            "seed": self.cfg.seed,
            "deterministic": self.cfg.deterministic,
            "precision": self.precision,
            "channels_last": self.cfg.channels_last,
        }

    def run(
        self,
        stages: list[Stage],
        state: Stateful,
        run_config: dict[str, Any],
        on_eval: Callable[[], dict[str, float]] | None = None,
        eval_every: int | None = None,
        max_seconds: float | None = None,
        resume: bool = False,
        on_start: Callable[[], None] | None = None,
        eval_seconds: float | None = None,
    ) -> RunResult:
        """Run ``stages`` in order with checkpoints, metrics, progress and an optional time budget.

        ``run_config`` holds the settings that determine the result (with ``fingerprint()``);
        a resume refuses a checkpoint whose settings differ.

        ``on_eval`` (a test-set evaluation) runs at the start and end of stages marked ``evaluate``
        and in between every ``eval_every`` steps, also once ``eval_seconds`` of training time have
        passed since the last one (so slow steps still give a curve). With neither given, the interval
        is the stage's: about ``EVAL_POINTS`` evaluations over its planned steps or, with a budget, over
        the time it can have, whichever comes first, and spaced so that the evaluations in between
        (each timed as it runs) take at most ``EVAL_SHARE`` of the training time. Evaluation time, like checkpoint
        writing, is not training time; ``RunResult.evaluation_seconds`` totals it.
        ``on_start`` runs once the checkpoint (if any) has been accepted, e.g. to record the config.
        """
        progress = _Progress(self.cfg.progress, self.is_main)
        self.max_seconds = max_seconds
        position = {
            "stage": 0,
            "step": 0,
            "seconds": {},
            "sections": {},
            "evaluations": [],
            "budget_hit": False,
            "evaluation_seconds": 0.0,
        }
        ckpt_path = self.run_dir / CHECKPOINT if self.run_dir else None
        if resume and ckpt_path is not None and ckpt_path.is_file():
            position = self._restore(ckpt_path, state, run_config)
        resumed_rng = position.pop("rng", None)
        self.sections = position.setdefault("sections", {})  # the same dict: checkpoints carry it
        if position["budget_hit"] and (max_seconds is None or sum(position["seconds"].values()) < max_seconds):
            position["budget_hit"] = False  # resumed with a larger budget: carry on
        if resume and ckpt_path is not None and not ckpt_path.is_file():
            self.metrics.write({"event": "resume requested, no checkpoint found: starting afresh"})
        if on_start is not None and self.is_main:
            on_start()
        last_saved = time.perf_counter()
        derived = eval_every is None and eval_seconds is None
        position.setdefault("evaluation_seconds", 0.0)
        eval_cost = 0.0  # how long the last evaluation within a stage took (its start's may include one-off work)

        def evaluate(stage: Stage, done: int, total: float) -> None:
            nonlocal eval_cost
            began = time.perf_counter()
            result = {"stage": stage.name, "step": done, "train_seconds": round(total, 3), **on_eval()}
            position["evaluations"].append(result)
            self.metrics.write({"event": "eval", **result})
            for module in stage.train:  # evaluation may have switched modes
                module.train()
            took = time.perf_counter() - began
            position["evaluation_seconds"] += took
            if done > 0:
                eval_cost = took

        for index, stage in enumerate(stages):
            if index < position["stage"] or position["budget_hit"]:
                continue
            first = position["step"] if index == position["stage"] else 0
            for module in stage.frozen:  # frozen first: a stage may train parts of a frozen model
                module.eval()
            for module in stage.train:
                module.train()
            if stage.begin is not None:  # e.g. filling a pool: timed apart, but inside the budget
                self.budget_left = (
                    None if max_seconds is None else max(0.0, max_seconds - sum(position["seconds"].values()))
                )
                begun = time.perf_counter()
                stage.begin()
                key = f"{stage.name}.begin"
                position["seconds"][key] = position["seconds"].get(key, 0.0) + time.perf_counter() - begun
            if resumed_rng is not None:  # after begin(), so its work does not shift the stream
                checkpoint.set_rng_state(resumed_rng)
                resumed_rng = None
            spent = position["seconds"].get(stage.name, 0.0)
            allowed = (
                None
                if max_seconds is None
                else max_seconds - sum(s for n, s in position["seconds"].items() if n != stage.name)
            )
            if allowed is not None and stage.budget_share is not None:
                allowed = min(allowed, stage.budget_share * max_seconds)
            self.stage_progress = first / stage.steps
            scored = stage.evaluate and on_eval is not None
            if scored and first == 0 and spent == 0.0:  # where the stage starts from: the curve's first point
                evaluate(stage, 0, sum(position["seconds"].values()))
            every, every_seconds = eval_every, eval_seconds
            if derived:
                every = max(1, round(stage.steps / EVAL_POINTS))
                every_seconds = allowed / EVAL_POINTS if allowed is not None and allowed > 0 else None
            bar = progress.bar(stage.name, stage.steps, first)
            started = time.perf_counter() - spent
            for i in range(first, stage.steps):
                with self.autocast() if stage.autocast else self.full_precision():
                    values = stage.step(i)
                done = i + 1
                if done % self.cfg.log_every == 0 or done == stage.steps:
                    record = {k: float(v.detach() if isinstance(v, Tensor) else v) for k, v in values.items()}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()}, refresh=False)
                    self.metrics.write(
                        {
                            "stage": stage.name,
                            "step": done,
                            "seconds": round(time.perf_counter() - started, 3),
                            **record,
                        }
                    )
                bar.update(1)
                elapsed = time.perf_counter() - started
                total = elapsed + sum(s for n, s in position["seconds"].items() if n != stage.name)
                previous = position["evaluations"][-1] if position["evaluations"] else None
                since_eval = total - (previous["train_seconds"] if previous else 0.0)
                if derived:  # steps since this stage's last evaluation, and cheap enough by now
                    since_step = done - (previous["step"] if previous and previous["stage"] == stage.name else 0)
                    due = (
                        since_step >= every or bool(every_seconds) and since_eval >= every_seconds
                    ) and since_eval * EVAL_SHARE >= eval_cost * (1 - EVAL_SHARE)
                else:
                    due = (
                        bool(eval_every) and done % eval_every == 0 or bool(eval_seconds) and since_eval >= eval_seconds
                    )
                share_used = (
                    max_seconds is not None
                    and stage.budget_share is not None
                    and elapsed >= stage.budget_share * max_seconds
                )
                over_budget, due, save_time, share_used = distributed.agree(
                    [
                        max_seconds is not None and total >= max_seconds,
                        due,
                        time.perf_counter() - last_saved >= self.cfg.checkpoint_seconds,
                        share_used,
                    ]
                )
                stage_over = done == stage.steps or share_used
                last = stage_over or over_budget
                if scored and (due or last):
                    paused = time.perf_counter()
                    evaluate(stage, done, total)
                    started += time.perf_counter() - paused
                    elapsed = time.perf_counter() - started
                position["seconds"][stage.name] = elapsed
                self.stage_progress = distributed.agree_value(
                    min(1.0, max(done / stage.steps, elapsed / allowed if allowed else 0.0))
                )
                if over_budget:
                    position["budget_hit"] = True
                if done % self.cfg.checkpoint_every == 0 or last or save_time:
                    next_pos = (index + 1, 0) if stage_over else (index, done)
                    position["stage"], position["step"] = next_pos
                    saving = time.perf_counter()
                    self._save(ckpt_path, state, run_config, position)
                    last_saved = time.perf_counter()
                    started += last_saved - saving
                if over_budget or stage_over:
                    if share_used and done < stage.steps:
                        self.metrics.write(
                            {
                                "event": f"{stage.name} stage ended at step {done} of {stage.steps}: "
                                f"its share of the budget ({stage.budget_share:g}) is used"
                            }
                        )
                    break
            bar.close()
        return RunResult(
            dict(position["seconds"]),
            position["budget_hit"],
            position["evaluations"],
            dict(self.sections),
            self._check_replicas(),
            position["evaluation_seconds"],
        )

    def _check_replicas(self) -> list[str]:
        """Each rank's digest of its replicas; ranks that drifted apart are an error, not a result."""
        if self.world_size == 1:
            return []
        digests = distributed.gather_objects(distributed.state_sha256(self.replicas))
        if len(set(digests)) > 1:
            raise DfktError(
                f"the {self.world_size} processes ended with different weights ({len(set(digests))} "
                "versions); this is a bug in dfkt, please report it with the run's config.yaml"
            )
        return digests

    # -- checkpoints ------------------------------------------------------------------------
    def _save(self, path: Path | None, state: Stateful, run_config: dict, position: dict) -> None:
        if self.world_size > 1:  # one checkpoint for all: rank 0's weights with everyone's statistics
            for module in self.replicas:  # (the last step always saves, so the run ends averaged too)
                distributed.average_buffers(module)
        if path is None:
            return
        # Per-rank noise streams of every rank, so a resume on as many ranks or fewer continues them.
        rank_rngs = distributed.gather_objects(self._per_rank_states(state))
        if self.is_main:
            payload = {
                "format": 1,
                "config": json.dumps(run_config, sort_keys=True),
                "position": json.dumps({k: v for k, v in position.items() if k != "rng"}),
                "state": state.state_dict(),
                "rng": checkpoint.rng_state(),
                "rank_rngs": rank_rngs,
            }
            checkpoint.save_atomic(payload, path)
        self.fabric.barrier()

    def _per_rank_states(self, state: Stateful) -> dict[str, Tensor]:
        rngs: dict[str, torch.Generator] = getattr(state, "rngs", {})
        return {k: g.get_state() for k, g in rngs.items() if any(g is mine for mine in self.per_rank_rngs)}

    def _restore_rank_rngs(self, state: Stateful, saved: list[dict[str, Tensor]]) -> None:
        """This rank's own noise streams: its saved ones, or, on a rank the saved run did not have,
        new streams drawn from rank 0's and this rank's number."""
        rank = self.fabric.global_rank
        rngs: dict[str, torch.Generator] = getattr(state, "rngs", {})
        for key in self._per_rank_states(state):
            if rank < len(saved) and key in saved[rank]:
                rngs[key].set_state(saved[rank][key])
            elif rank > 0:
                drawn = torch.randint(2**62, (1,), generator=rngs[key], device=rngs[key].device)
                rngs[key].manual_seed(int(drawn) + rank)

    def _restore(self, path: Path, state: Stateful, run_config: dict) -> dict:
        payload = checkpoint.load(path)
        saved = json.loads(payload["config"])
        if saved != json.loads(json.dumps(run_config, sort_keys=True)):
            changed = sorted(_diff_keys(saved, run_config))
            raise DfktError(
                f"cannot resume {path.parent}: the config differs from the saved run in "
                f"{', '.join(changed)}; rerun with the same settings or a new --out folder"
            )
        state.load_state_dict(payload["state"])
        self._restore_rank_rngs(state, payload.get("rank_rngs", []))
        position = json.loads(payload["position"])
        position["rng"] = payload["rng"]
        self.metrics.write({"event": "resume", "stage": position["stage"], "step": position["step"]})
        return position

    def close(self) -> None:
        self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.close()  # releases the folder
            self.run_lock = None

    # A run's engine is used as ``with Engine(...) as engine:``, so it closes however the run ends.
    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    if accelerator == "cpu":
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def _diff_keys(a: Any, b: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".") or "(root)"


class _Progress:
    """tqdm bars on the main process; None means "only on a terminal"."""

    def __init__(self, enabled: bool | None, is_main: bool):
        self.disable = (not enabled if enabled is not None else None) if is_main else True

    def bar(self, name: str, total: int, initial: int) -> tqdm:
        return tqdm(total=total, initial=initial, desc=name, disable=self.disable, dynamic_ncols=True, leave=False)
