"""Calibration sources: where the images that set an int8 model's activation ranges come from.

Each is registered by name in ``CALIBRATION_SOURCES`` with a ``Config`` (its ``--set params.*``
settings), a one-line ``summary`` and ``images(n)``, which returns ``n`` normalised N×C×H×W float
images in the model's input space.

- ``bn-inversion``: ZeroQ's distilled data (Cai et al., CVPR 2020): pixels start as N(0, 1) and are
  optimised so that the batch statistics at every BatchNorm layer match its running statistics
  (dfkt's BatchNorm-statistics prior, no label term). Needs BatchNorm.
- ``generator``: samples of a generator trained against the frozen model with RDSKD's or DAFL's
  objective, or the frozen generator (or pool) of an existing distill run folder, without retraining.
- ``gaussian``: N(0, 1) noise in normalised units (the baseline ZeroQ compares against).
- ``real``: the dataset's training images (an upper reference; it needs the data).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from pydantic import Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfkt.config import DataConfig, EngineConfig, StrictModel, validate
from dfkt.engine.streams import stream_seed
from dfkt.errors import ConfigError, DfktError
from dfkt.models.files import ModelInfo
from dfkt.models.generator import GeneratorOutput
from dfkt.registry import CALIBRATION_SOURCES
from dfkt.synthesis.bn_prior import BNStatsPrior, statistics_layers

RDSKD_EPOCH = 120  # generator steps per reference reset, as in the RDSKD authors' code


@dataclass
class CalibrationContext:
    """What a source gets: the fp32 model (eval mode, on the CPU) and how to feed it."""

    model: nn.Module
    info: ModelInfo
    seed: int
    data: DataConfig
    run_dir: Path | None = None  # MODEL's distill run folder, when it is one
    progress: bool | None = None

    def bar(self, desc: str, total: int) -> tqdm:
        return tqdm(
            total=total,
            desc=desc,
            disable=None if self.progress is None else not self.progress,
            dynamic_ncols=True,
            leave=False,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.in_channels, self.info.image_size, self.info.image_size

    def rng(self, name: str) -> torch.Generator:
        """A new generator for the random stream ``name`` of this calibration, seeded from the seed and the
        name alone (``dfkt.engine.streams``)."""
        return torch.Generator().manual_seed(stream_seed(self.seed, name))


class CalibrationSource:
    Config: ClassVar[type[StrictModel]]
    summary: ClassVar[str] = ""
    synthetic: ClassVar[bool] = True

    def __init__(self, cfg: StrictModel, ctx: CalibrationContext):
        self.cfg, self.ctx = cfg, ctx

    def images(self, n: int) -> Tensor:
        raise NotImplementedError


def source_config(name: str, params: dict[str, Any]) -> StrictModel:
    return validate(CALIBRATION_SOURCES.get(name).Config, params, where=f"{name} params")


class NoParams(StrictModel):
    pass


@CALIBRATION_SOURCES.register("gaussian")
class Gaussian(CalibrationSource):
    Config = NoParams
    summary = "N(0, 1) noise in normalised units (baseline)"

    def images(self, n: int) -> Tensor:
        return torch.randn((n, *self.ctx.shape), generator=self.ctx.rng("gaussian"))


@CALIBRATION_SOURCES.register("real")
class Real(CalibrationSource):
    Config = NoParams
    summary = "the dataset's training images (upper reference: needs the data)"
    synthetic = False

    def images(self, n: int) -> Tensor:
        from dfkt.data import load_dataset, normalize

        info, data = self.ctx.info, self.ctx.data
        dataset = load_dataset(data.name or info.dataset, data.root, data.download, data.image_size or info.image_size)
        info.check_fits(dataset.num_classes, dataset.channels, dataset.image_size, f"dataset {dataset.name}")
        available = len(dataset.train_images)
        if n > available:
            raise ConfigError(
                f"calibration source real: {n} images asked (calibration + check images) but "
                f"{dataset.name} has {available} training images; lower --calibration-images"
            )
        index = torch.randperm(available, generator=self.ctx.rng("real_images"))[:n]
        return normalize(dataset.train_images[index], info.mean, info.std)


class BNInversionConfig(StrictModel):
    iterations: int = Field(200, ge=1, description="Adam steps per batch (ZeroQ: 500)")
    lr: float = Field(0.5, gt=0, description="Adam lr on the pixels (ZeroQ: 0.5)")
    batch: int = Field(64, ge=2, description="images optimised together (their statistics are matched as a batch)")
    # ZeroQ does not clamp. Unclamped pixels on the B6 WRN-16-2 spread over -6.5..7.3 against real images'
    # -0.66..2.35 (normalised): the int8 input range over 4x too wide, early activation ranges 2-3x; clamped,
    # int8 accuracy over 3 seeds was 93.30 against 93.15 (fp32 93.41, gaussian 93.24).
    clamp: bool = Field(True, description="clamp pixels into the model's input range after every step (ZeroQ: no)")


@CALIBRATION_SOURCES.register("bn-inversion")
class BNInversion(CalibrationSource):
    """ZeroQ's distilled data: L = Σ_l ‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂ over the BatchNorm layers,
    minimised over the pixels of each batch."""

    Config = BNInversionConfig
    summary = "ZeroQ distilled data: pixels matching every BatchNorm layer's running statistics (needs BatchNorm)"

    def __init__(self, cfg: BNInversionConfig, ctx: CalibrationContext):
        super().__init__(cfg, ctx)
        if not statistics_layers(ctx.model):
            raise ConfigError(
                f"calibration source bn-inversion matches BatchNorm statistics and this {ctx.info.arch} "
                "model has no BatchNorm layers; use --calibration generator (or gaussian)"
            )

    def images(self, n: int) -> Tensor:
        cfg, ctx = self.cfg, self.ctx
        prior = BNStatsPrior(ctx.model, "bn-inversion")
        rng = ctx.rng("bn_inversion")
        low = high = None
        if cfg.clamp:
            mean = torch.tensor(ctx.info.mean).view(1, -1, 1, 1)
            std = torch.tensor(ctx.info.std).view(1, -1, 1, 1)
            low, high = -mean / std, (1 - mean) / std
        batches = []
        bar = ctx.bar("bn-inversion", -(-n // cfg.batch) * cfg.iterations)
        try:
            for start in range(0, n, cfg.batch):
                # A batch of at least 2 images: one image has no variance to match.
                size = max(2, min(cfg.batch, n - start))
                x = torch.randn((size, *ctx.shape), generator=rng).requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=cfg.lr)
                for _ in range(cfg.iterations):
                    with prior.record():
                        ctx.model(x)
                    loss = prior.loss()
                    if not torch.isfinite(loss):
                        raise DfktError("bn-inversion's BatchNorm loss became inf/NaN; lower --set params.lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if low is not None:
                        with torch.no_grad():
                            x.copy_(torch.maximum(torch.minimum(x, high), low))
                    bar.update(1)
                    bar.set_postfix(bn=f"{loss.item():.3g}", refresh=False)
                batches.append(x.detach()[: n - start])
        finally:
            bar.close()
            prior.remove()
        return torch.cat(batches)


class GeneratorSourceConfig(StrictModel):
    objective: Literal["rdskd", "dafl"] = Field(
        "rdskd", description="the generator's loss: RDSKD's weight-free loss or DAFL's weighted one"
    )
    steps: int = Field(200, ge=1, description="generator steps")
    batch: int = Field(64, ge=2, description="generator batch (even: RDSKD pairs its halves)")
    lr: float | None = Field(None, gt=0, description="Adam lr; default the objective's (rdskd 1e-3, dafl 0.2)")
    nz: int = Field(100, ge=1)
    generator: str = "dafl"
    width: int | None = Field(64, ge=2, description="generator channels (DAFL's: 128)")
    # "clamped" keeps the DAFL authors' spread (tanh + BatchNorm, about ±4.8 normalised) but inside the range
    # real images occupy. B6, 3 seeds: WRN-16-2 int8 93.33 against 93.13 with "bn" and 93.24 for gaussian;
    # LeNet-5 90.33, as with "bn". "pixels" (a sigmoid) gave 93.36 on WRN-16-2 but 56-60 on LeNet-5: its
    # 200-step samples stay narrow, so real activations were clipped.
    output: GeneratorOutput = Field("clamped", description="last layer: clamped (default), bn or pixels")
    w_oh: float = Field(1.0, ge=0, description="dafl objective weight")
    w_a: float = Field(0.1, ge=0, description="dafl objective weight")
    w_ie: float = Field(5.0, ge=0, description="dafl objective weight")
    from_run: str | None = Field(
        None,
        description="a distill run folder whose frozen generator (or pool) to sample "
        "instead of training one; default: MODEL's run folder when it is "
        "a distill run with a generator or pool",
    )
    retrain: bool = Field(False, description="train a generator even when MODEL is a distill run folder")


@CALIBRATION_SOURCES.register("generator")
class GeneratorSource(CalibrationSource):
    Config = GeneratorSourceConfig
    summary = "a generator trained against the model (RDSKD or DAFL objective), or a distill run's frozen one"

    def images(self, n: int) -> Tensor:
        cfg, ctx = self.cfg, self.ctx
        run = cfg.from_run or (None if cfg.retrain else _distill_run(ctx.run_dir))
        if run is not None:
            return _from_run(Path(run), n, ctx)
        generator, train_mode = self._train()
        return _sample(generator, cfg.nz, n, train_mode, ctx.rng("generator_samples"))

    def _train(self) -> tuple[nn.Module, bool]:
        from dfkt.dfkd import dafl, rdskd
        from dfkt.engine import Engine
        from dfkt.engine.state import TrainState
        from dfkt.models import build_generator
        from dfkt.synthesis import GeneratorSynthesizer

        cfg, ctx = self.cfg, self.ctx
        if cfg.batch % 2:
            raise ConfigError("generator params.batch must be even: RDSKD's diversity term pairs its two halves")
        if cfg.objective == "dafl" and not hasattr(ctx.model, "forward_features"):
            raise ConfigError("the dafl objective reads the model's penultimate features; use params.objective=rdskd")
        if cfg.objective == "dafl" and hasattr(ctx.model, "require_features"):
            ctx.model.require_features()
        engine = Engine(
            EngineConfig(precision="32-true", channels_last=False, seed=ctx.seed, progress=False, accelerator="cpu")
        )
        info = ctx.info
        net = build_generator(
            cfg.generator,
            cfg.nz,
            info.in_channels,
            info.image_size,
            width=cfg.width,
            output=cfg.output,
            mean=info.mean,
            std=info.std,
        )
        references = torch.zeros(2)
        reset = [False]

        def objective(images: Tensor, z: Tensor) -> dict[str, Tensor]:
            if cfg.objective == "dafl":
                return dafl.generator_objective(ctx.model, images, cfg.w_oh, cfg.w_a, cfg.w_ie)
            return rdskd.generator_losses(images, ctx.model(images), None if reset[0] else references, 30.0)

        lr = cfg.lr or (1e-3 if cfg.objective == "rdskd" else 0.2)
        source = GeneratorSynthesizer(TrainState(engine.device), engine, net, cfg.nz, lr, cfg.batch, objective)
        source.generator.train()
        bar = ctx.bar(f"generator ({cfg.objective})", cfg.steps)
        try:
            for i in range(cfg.steps):
                reset[0] = i % RDSKD_EPOCH == 1  # the authors' reference reset, at each epoch's second step
                terms = source.synthesize()
                if "references" in terms:
                    references = terms.pop("references")
                bar.update(1)
                bar.set_postfix(loss=f"{float(torch.as_tensor(terms['g_loss']).detach()):.3g}", refresh=False)
        finally:
            bar.close()
        # RDSKD samples its frozen generator in eval mode; DAFL's student only ever saw it in train mode.
        return source.generator, cfg.objective == "dafl"


def _distill_run(run_dir: Path | None) -> Path | None:
    """``run_dir`` when it is a distill run folder whose checkpoint holds a generator or a pool."""
    if run_dir is None or not (run_dir / "checkpoint.pt").is_file() or not (run_dir / "config.yaml").is_file():
        return None
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return run_dir if config.get("method") else None


def _from_run(run: Path, n: int, ctx: CalibrationContext) -> Tensor:
    """Samples of a distill run's frozen generator, or images of its pool when it has no generator."""
    from dfkt.api.common import method_config
    from dfkt.dfkd.base import build_method_generator
    from dfkt.engine import checkpoint
    from dfkt.registry import METHODS

    config_file, checkpoint_file = run / "config.yaml", run / "checkpoint.pt"
    if not config_file.is_file() or not checkpoint_file.is_file():
        raise ConfigError(f"{run} is not a distill run folder (no config.yaml and checkpoint.pt in it)")
    config = yaml.safe_load(config_file.read_text()) or {}
    method = config.get("method")
    if method not in METHODS:
        raise ConfigError(f"{run} is not a distill run folder of a known method (its config names {method!r})")
    state = checkpoint.load(checkpoint_file)["state"]
    weights, buffers = state["modules"].get("generator"), state["buffers"]
    cls = METHODS.get(method)
    if weights is not None:
        cfg = method_config(cls, method, None, config.get("params") or {})
        info = ctx.info
        setup = _Shape(info.in_channels, info.image_size, info.mean, info.std)
        net = build_method_generator(cfg, cfg.nz, setup)  # type: ignore[arg-type]
        net.load_state_dict(weights)
        return _sample(net, cfg.nz, n, cls.samples_in_train_mode, ctx.rng("run_generator_samples"))
    pool = buffers.get("pool.images")
    if pool is None:
        raise ConfigError(f"the {method} run {run} has neither a generator nor a pool of images to calibrate with")
    size = min(len(pool), int(buffers["pool.added"].item()))
    if size < n:
        raise ConfigError(
            f"the pool of {run} holds {size} images and {n} are needed (calibration + check images); "
            "lower --calibration-images or params.check_images"
        )
    index = torch.randperm(size, generator=ctx.rng("run_pool"))[:n]
    return pool[index].float()


@dataclass
class _Shape:
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@torch.no_grad()
def _sample(generator: nn.Module, nz: int, n: int, train_mode: bool, rng: torch.Generator) -> Tensor:
    """``n`` images of a frozen generator (eval mode), or of a copy in train mode (batch statistics) when
    that is how the model saw its samples; in chunks, so memory stays bounded."""
    net = copy.deepcopy(generator).cpu().float()
    net.train(train_mode)
    chunk = 256 if train_mode else 1024
    out = []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        z = torch.randn(max(size, 2), nz, generator=rng)  # train-mode BatchNorm needs two samples
        out.append(net(z)[:size])
    return torch.cat(out).contiguous()
