"""Teachers from outside dfkt: a torchvision architecture, a TorchScript file, or a Python builder.

A teacher is named by one string:

- ``torchvision:resnet18`` plus a weights file (a state dict, ``.safetensors`` or ``.pt``/``.pth``);
- ``path/to/model.pt`` holding a TorchScript module (``torch.jit.save``);
- ``package.module:function`` plus a weights file: the function is called with no arguments and
  returns the ``nn.Module`` the state dict belongs to;
- anything else is a dfkt model file (``dfkt train-teacher``), see ``dfkt.models.files``.

Foreign files carry no metadata, so the image size and channels come from the evaluation dataset
unless declared, the class count from the weights (or one forward pass), and the normalisation
from the dataset unless declared; all of it is checked against the data before training.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from dfkt.config import DeclaredInfo
from dfkt.data.base import ImageData
from dfkt.errors import ConfigError, ModelFileError
from dfkt.models.files import ModelInfo

TORCHVISION = "torchvision:"
CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def foreign_kind(spec: str) -> str | None:
    """'torchvision', 'torchscript' or 'callable' for a foreign teacher, None for a dfkt model file."""
    if spec.startswith(TORCHVISION):
        return "torchvision"
    path = Path(spec)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return "torchscript"
    if not path.exists() and CALLABLE.fullmatch(spec):
        return "callable"
    return None


class ForeignClassifier(nn.Module):
    """A foreign network behind dfkt's classifier interface (``forward_features``, ``classify``,
    ``feature_dim``): the features are the input of its last ``nn.Linear``, caught by a hook.
    ``backbone`` is the network itself, so block-level hooks (ZSKT) see its layers."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net = net
        self.kind = kind
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        self.linear = linears[-1] if linears else None
        self._caught: Tensor | None = None
        self._catching = False
        if self.linear is not None:
            self.linear.register_forward_hook(self._catch)

    @property
    def backbone(self) -> nn.Module:
        return self.net

    @property
    def feature_dim(self) -> int:
        return self.require_features().in_features

    def _catch(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._catching:  # only inside forward_features: a plain forward keeps no reference
            self._caught = inputs[0]

    def require_features(self) -> nn.Linear:
        if self.linear is None:
            why = (
                "a TorchScript teacher hides its layers"
                if self.kind == "torchscript"
                else "this teacher has no nn.Linear layer to take them from"
            )
            raise ConfigError(
                f"this method needs the teacher's penultimate features and {why}; use a method that "
                "needs only its outputs (rdskd, dfad, zskt, zskd, deepinversion with "
                "--set params.w_bn=0), or load the teacher as torchvision:NAME or module:function"
            )
        return self.linear

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward_features(self, x: Tensor) -> Tensor:
        self.require_features()
        self._catching = True
        try:
            self.net(x)
        finally:
            self._catching = False
        features, self._caught = self._caught, None
        return features

    def classify(self, features: Tensor) -> Tensor:
        return self.require_features()(features)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or from a ``torch.save`` file (never unpickling code);
    a checkpoint wrapping it under 'state_dict' or 'model', and DDP's 'module.' prefixes, are undone."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"weights file {path} does not exist; pass the teacher's state dict with --teacher-weights"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (each loader has its own error types)
        raise ModelFileError(
            f"weights file {path} could not be read as a state dict ({exc.__class__.__name__}); "
            "save it with torch.save(model.state_dict(), FILE) or safetensors"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFileError(
            f"weights file {path} does not hold a state dict of tensors; "
            "save it with torch.save(model.state_dict(), FILE)"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classes_in(state: dict[str, Tensor]) -> int | None:
    """The output size of the last 2-D weight: the classifier's, in every torchvision classifier."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _torchvision_net(name: str, num_classes: int | None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError(f"unknown torchvision classifier {name!r}; known: {', '.join(known)}")
    return torchvision.models.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))


def _callable_net(spec: str) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"cannot import {spec!r} ({exc}); the module must be importable (on PYTHONPATH) and define the function"
        ) from None
    net = target()
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{spec}() returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _load_weights(net: nn.Module, state: dict[str, Tensor], spec: str, weights: str) -> None:
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists them after a header line; show the first
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelFileError(f"{weights} does not fit {spec}: {(lines[1:] or lines)[0]}") from None
    if missing or unexpected:
        raise ModelFileError(
            f"{weights} does not fit {spec}: {len(missing)} missing keys (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


def load_foreign(spec: str, kind: str, weights: str | None, declared: DeclaredInfo) -> nn.Module:
    """The foreign network in eval mode, with its weights."""
    if kind == "torchscript":
        if weights:
            raise ConfigError("a TorchScript file holds its own weights; drop --teacher-weights")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in torch; users with such files still count
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(spec, map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"TorchScript file {spec} could not be loaded ({exc.__class__.__name__})") from None
    if not weights:
        raise ConfigError(
            f"{spec} needs its weights: pass --teacher-weights FILE (a state dict); "
            "random weights make a useless teacher"
        )
    state = read_state_dict(weights)
    if kind == "torchvision":
        net = _torchvision_net(spec.removeprefix(TORCHVISION), declared.num_classes or _classes_in(state))
    else:
        net = _callable_net(spec)
    _load_weights(net, state, spec, weights)
    return net.eval()


def infer_info(net: nn.Module, spec: str, declared: DeclaredInfo, data: ImageData) -> ModelInfo:
    """The teacher's ModelInfo: declared values first, then the dataset's shape and normalisation,
    the class count from one forward pass."""
    channels = declared.in_channels or data.channels
    size = declared.image_size or data.image_size
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, channels, size, size))
    except Exception as exc:  # noqa: BLE001  (whatever the network raises on a wrong shape)
        raise ModelFileError(
            f"{spec} fails on {channels}×{size}×{size} images ({exc.__class__.__name__}); "
            "declare its input with --set teacher_info.in_channels=C teacher_info.image_size=S "
            "and pick data of that shape"
        ) from None
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ModelFileError(f"{spec} returns {getattr(out, 'shape', type(out).__name__)}, not N×classes logits")
    classes = int(out.shape[1])
    if declared.num_classes and declared.num_classes != classes:
        raise ModelFileError(
            f"{spec} outputs {classes} classes, not the declared teacher_info.num_classes {declared.num_classes}"
        )
    mean, std = tuple(declared.mean or data.mean), tuple(declared.std or data.std)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"teacher_info.mean and .std need {channels} values (one per channel)")
    return ModelInfo(spec, classes, channels, size, mean, std, data.name)


def foreign_sha256(spec: str, weights: str | None) -> str:
    """The identity of a foreign teacher for resume checks: its name and its files' bytes."""
    digest = hashlib.sha256(spec.encode())
    for path in (p for p in (spec, weights) if p and Path(p).is_file()):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def own_network(model: nn.Module) -> nn.Module:
    """The network whose tensors a student is sliced from or matched against: a model brought in from
    outside is wrapped, and its tensor names are those of the network inside (a dfkt architecture keeps
    its names)."""
    return model.net if isinstance(model, ForeignClassifier) else model
