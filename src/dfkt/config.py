"""Typed run configs (pydantic v2, unknown keys are errors), YAML loading and ``--set`` overrides.

A config resolves in layers, later ones winning: class defaults, a method preset, a YAML
file, command-line flags, then ``--set a.b=c`` overrides.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dfkt.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(StrictModel):
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    devices: int = Field(
        1,
        ge=1,
        description="processes on this machine, trained data-parallel (one per GPU; on a "
        "CPU they split the cores); started here, or by torchrun/SLURM with "
        "the same number. Each process uses the batch size given, so the "
        "effective batch is devices x it; see --set engine.lr_scaling=linear",
    )
    num_nodes: int = Field(
        1,
        ge=1,
        description="machines of `devices` processes each (torchrun or SLURM starts "
        "them; the run folder on a shared disk)",
    )
    lr_scaling: Literal["none", "linear"] = Field(
        "none",
        description="with several processes the effective batch is world size x batch: 'linear' "
        "multiplies every learning rate by the world size, 'none' keeps them",
    )
    precision: Literal["auto", "bf16-mixed", "32-true"] = Field(
        "auto",
        description="auto: bf16-mixed where the hardware runs bf16 natively (CUDA, or a CPU with "
        "AMX/AVX512-BF16), else 32-true",
    )
    channels_last: bool = True
    seed: int = 1
    deterministic: bool = False
    threads: int | None = Field(None, ge=1, description="CPU threads; None keeps torch's default")
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    checkpoint_seconds: float = Field(120.0, gt=0, description="also checkpoint when this much time has passed")
    log_every: int = Field(20, ge=1, description="steps between metric lines in metrics.jsonl")
    progress: bool | None = Field(None, description="progress bars; None shows them on a terminal")


class DataConfig(StrictModel):
    name: str | None = Field(None, description="dataset; for distill/evaluate, default: the teacher's")
    root: str | None = Field(None, description="folder holding the dataset files")
    download: bool = Field(False, description="allow torchvision to download data")
    image_size: int | None = Field(None, ge=4)


class RealTrainingConfig(StrictModel):
    """Training on real images: the teacher, and the reference students beside DFKD."""

    epochs: int = Field(15, ge=1, description="passes over the training images")
    batch_size: int = Field(128, ge=1, description="images per step")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="adam, or sgd with Nesterov momentum")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    momentum: float = Field(0.9, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (L2)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    augment: bool | Literal["crop_rotate"] = Field(
        False,
        description="true: a random shift (up to 1/16 of the side) and horizontal flip; crop_rotate: SHOT's "
        "USPS->MNIST source augmentation, a random crop of the image padded by 4 px (per 28 px of side) then a "
        "rotation by up to ±10 degrees (nearest pixel), filled with the images' darkest value",
    )
    temperature: float | None = Field(
        None,
        gt=0,
        description="KD temperature, used only by distill's KD-on-real-data reference; default: the method's",
    )
    lr_schedule: Literal["cosine", "shot"] = Field(
        "cosine", description="cosine annealing, or shot: lr·(1 + 10t/T)^-0.75"
    )
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of the training images kept apart to choose the best epoch; 0 keeps the last",
    )


class TeacherConfig(RealTrainingConfig):
    """``dfkt train-teacher``: supervised training on real labelled data."""

    model: str = Field("digits_cnn", description="architecture (see 'dfkt list models')")
    data: DataConfig = DataConfig(name="digits")
    engine: EngineConfig = EngineConfig()


# ``dfkt train-source``'s presets: settings a preset fills in unless the run sets them itself.
# SHOT's digit code (tim-learn/SHOT, digit/uda_digit.py) trains its sources for 30 epochs at batch 64,
# lr 0.01 with its decay, label smoothing 0.1, weight decay 1e-3 (the SourceConfig defaults); only the
# USPS source of USPS->MNIST is augmented (RandomCrop(28, padding=4), RandomRotation(10)), the MNIST and
# SVHN sources are not.
SOURCE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "paper": {"batch_size": 64, "epochs": 30},
    "paper-augment": {"batch_size": 64, "epochs": 30, "augment": "crop_rotate"},
}


class SourceConfig(TeacherConfig):
    """``dfkt train-source``: a source model for adaptation, SHOT's recipe by default.

    ``preset`` (``--set preset=NAME``): ``cpu`` (the default: batch 128, 15 epochs, no augmentation),
    ``paper`` (SHOT's digit sources: batch 64, 30 epochs, as for MNIST->USPS and SVHN->MNIST) or
    ``paper-augment`` (``paper`` with SHOT's USPS->MNIST augmentation, for a source of other digits that
    is adapted to MNIST-like images, e.g. digits -> mnist5k). Settings given in the run win over the
    preset's. The epoch is chosen on held-out training images (``holdout``), where SHOT's code chose it
    on the source test split."""

    preset: Literal["cpu", "paper", "paper-augment"] = Field(
        "cpu",
        description="cpu: batch 128, 15 epochs; paper: SHOT's digit sources, batch 64, 30 epochs; "
        "paper-augment: paper plus SHOT's USPS->MNIST crop and rotation (augment=crop_rotate)",
    )
    model: str = "shot_lenet"
    data: DataConfig = DataConfig(name="fmnist")
    optimizer: Literal["adam", "sgd"] = "sgd"
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    lr_schedule: Literal["cosine", "shot"] = "shot"
    holdout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of the source training images kept apart to choose the epoch (never the test set)",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_in_the_preset(cls, data: Any) -> Any:
        """The preset's settings under the ones the run gives (an unknown preset is left to the field)."""
        if isinstance(data, dict) and data.get("preset", "cpu") in SOURCE_PRESETS:
            return {**SOURCE_PRESETS[data.get("preset", "cpu")], **data}
        return data


class AdaptRunConfig(StrictModel):
    """``dfkt adapt``: a method's own settings live under ``params``."""

    method: str = Field("shot", description="adaptation method (see 'dfkt list adapt-methods')")
    preset: str | None = Field(
        "cpu",
        description="method preset: 'cpu' (default, 2 cores) or 'paper'; some methods "
        "have more (e.g. shot: paper-objects); a wrong name lists them",
    )
    source: str = Field("", description="source model.safetensors written by 'dfkt train-source'")
    target: DataConfig = DataConfig()
    split_seed: int = Field(0, description="seed of the split of the target into the adapted and held-out halves")
    params: dict[str, Any] = {}
    eval_every: int | None = Field(
        None,
        ge=1,
        description="adaptation steps between evaluations (label-free "
        "score, selection, accuracy); default: one epoch (online methods: the pass)",
    )
    eval_seconds: float | None = Field(None, gt=0, description="also evaluate after this many training seconds")
    max_seconds: float | None = Field(None, gt=0, description="wall-time budget for adapting")
    selection_score: Literal["mixval", "im"] = Field(
        "mixval",
        description="label-free score that picks model_selected.safetensors among the evaluations and "
        "is compared with the source model's: 'mixval' (inter-cluster MixVal, Hu et al. 2023, over all pairs) or 'im' "
        "(information maximisation, SHOT-IM's objective, which favours their last epoch)",
    )
    engine: EngineConfig = EngineConfig()


class DeclaredInfo(StrictModel):
    """What a user states about a teacher from outside dfkt; unset values are inferred
    (``dfkt.models.foreign``)."""

    num_classes: int | None = Field(None, ge=1)
    in_channels: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=4)
    mean: list[float] | None = Field(None, description="per-channel mean the teacher was trained with, in [0, 1]")
    std: list[float] | None = Field(None, description="per-channel std the teacher was trained with")


class DistillConfig(StrictModel):
    """``dfkt distill``: a method's own settings live under ``params``."""

    method: str = Field("rdskd", description="DFKD method (see 'dfkt list methods')")
    preset: str | None = Field(
        "cpu",
        description="method preset: 'cpu' (default, 2-core laptop scale) or 'paper'; "
        "some methods have more (e.g. deepinversion: cpu-adi); a wrong name "
        "lists them",
    )
    teacher: str = Field(
        "",
        description="the teacher: a model.safetensors from 'dfkt train-teacher', a TorchScript "
        "file, torchvision:NAME (e.g. torchvision:resnet18) or package.module:function "
        "(called with no arguments, returns the nn.Module); the last two need "
        "--teacher-weights and --data. Declare what cannot be inferred with --set "
        "teacher_info.mean=[...] teacher_info.std=[...] (default: the data's)",
    )
    teacher_weights: str | None = Field(
        None,
        description="state dict (.pt/.pth from torch.save, or .safetensors) of "
        "a torchvision:NAME or module:function teacher",
    )
    teacher_info: DeclaredInfo = DeclaredInfo()
    student: str | None = Field(None, description="student architecture; default: the teacher's half-width partner")
    data: DataConfig = DataConfig()
    params: dict[str, Any] = {}
    eval_every: int | None = Field(
        None,
        ge=1,
        description="student steps between test-set evaluations (default, "
        "with eval_seconds unset too: about 20 over the student "
        "stage, under 5% of its time)",
    )
    eval_seconds: float | None = Field(None, gt=0, description="also evaluate after this many training seconds")
    max_seconds: float | None = Field(None, gt=0, description="wall-time budget for training")
    references: bool = Field(
        False, description="also train the KD-on-real-data and labels-trained students for comparison"
    )
    reference: RealTrainingConfig = RealTrainingConfig()
    engine: EngineConfig = EngineConfig()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is parsed as YAML so types come out right."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return path, value


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def validate(model: type[M], raw: dict, where: str = "config") -> M:
    """Validate ``raw`` into ``model``, turning pydantic's report into one readable line."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown key {key!r} (valid here: {', '.join(_valid_keys(model, err['loc']))})")
            else:
                problems.append(f"{key}: {err['msg']}")
        raise ConfigError(f"invalid {where}: " + "; ".join(problems)) from None


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (sub)model that holds the unknown key at ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def dump_yaml(cfg: BaseModel | dict, path: str | Path) -> None:
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


class QuantizeConfig(StrictModel):
    """``dfkt quantize``: int8 post-training quantization through ONNX Runtime, calibrated on synthetic
    images (or real ones, as a reference); the calibration source's own settings live under ``params``."""

    model: str = Field(
        "",
        description="a dfkt model file, a run folder (a distill run's student; see "
        "run_model), or any teacher 'dfkt distill --teacher' accepts",
    )
    model_weights: str | None = Field(
        None, description="state-dict file of a torchvision:NAME or module:function model"
    )
    model_info: DeclaredInfo = DeclaredInfo()
    run_model: Literal["student", "selected", "teacher"] = Field(
        "student",
        description="for a distill run folder: its last student, its label-free selected student, or its teacher",
    )
    data: DataConfig = DataConfig()
    out: str = Field("", description="the int8 ONNX file to write, e.g. model.int8.onnx")
    calibration: str = Field("bn-inversion", description="calibration source (see 'dfkt list calibration-sources')")
    calibration_images: int = Field(256, ge=1, description="images fed to the calibrator")
    check_images: int = Field(
        128,
        ge=1,
        description="held-out images of the same source on which int8 and fp32 "
        "top-1 predictions are compared before writing",
    )
    min_agreement: float = Field(
        0.9,
        ge=0,
        le=1,
        description="refuse to write when int8 agrees with fp32 on fewer held-out images than this share",
    )
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how ONNX Runtime sets the activation ranges from the calibration images"
    )
    percentile: float = Field(99.999, gt=0, le=100, description="percentile calibration: the activation range kept")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="activations: uint8 (with int8 weights, the fast U8S8 kernels on x86) or int8"
    )
    reduce_range: bool | None = Field(
        None,
        description="weights in 7 bits: x86 int8 kernels without VNNI add products in 16 bits, which saturate on "
        "full-range weights (ONNX Runtime's advice); unset: on when this x86 CPU lacks AVX512-VNNI and AVX-VNNI",
    )
    params: dict[str, Any] = {}
    seed: int = Field(1, description="seed of the calibration images")
    threads: int | None = Field(None, ge=1, description="CPU threads for synthesis; unset: torch's default")
    progress: bool | None = Field(None, description="progress bar on synthesis; unset: shown on a terminal")
