"""``dfkt export``: a trained model as ONNX (checked against PyTorch) or as a plain safetensors file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfkt.errors import ConfigError, DfktError
from dfkt.models.files import ModelInfo, load_model, model_path, save_model

CHECK_BATCH = 16  # random images compared between PyTorch and ONNX Runtime
TOLERANCE = 1e-4  # largest absolute logit difference accepted, relative to the logits' scale


def export(model: str | Path, out: str | Path, fmt: str = "onnx", seed: int = 0) -> dict[str, Any]:
    """Write ``model`` (a model file or a run folder) to ``out``. ONNX files take normalised
    N×C×H×W float images (the normalisation is in their metadata) with any batch size, and are
    checked on random inputs with ONNX Runtime; safetensors files keep dfkt's metadata."""
    path = model_path(model)
    net, info = load_model(path)
    net.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_model(net, info, out)
        return {"model": str(path), "file": str(out), "format": fmt}
    if fmt != "onnx":
        raise ConfigError(f"unknown export format {fmt!r}; choose onnx or safetensors")
    onnxruntime = require_onnx("ONNX export")
    export_onnx(net, info, out)
    images = torch.randn(
        CHECK_BATCH, info.in_channels, info.image_size, info.image_size, generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        expected = net(images).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": images.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    if difference > TOLERANCE * max(float(np.abs(expected).max()), 1.0):
        raise DfktError(
            f"the ONNX model's logits differ from PyTorch's by up to {difference:.2g} on random inputs; "
            f"{out} is kept for inspection but should not be deployed"
        )
    return {
        "model": str(path),
        "file": str(out),
        "format": fmt,
        "checked_inputs": CHECK_BATCH,
        "max_abs_logit_difference": difference,
    }


def require_onnx(what: str):
    """onnxruntime, or a one-line error naming the extra to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise ConfigError(
            f"{what} needs the onnx extra: pip install 'dfkt[onnx]' (onnx, onnxscript, onnxruntime)"
        ) from None
    return onnxruntime


def onnx_metadata(info: ModelInfo) -> dict[str, str]:
    """dfkt's metadata in an ONNX file: enough to feed the model and to evaluate it (``dfkt evaluate``)."""
    return {
        "dfkt_arch": info.arch,
        "dfkt_mean": json.dumps(list(info.mean)),
        "dfkt_std": json.dumps(list(info.std)),
        "dfkt_num_classes": str(info.num_classes),
        "dfkt_dataset": info.dataset,
        "dfkt_in_channels": str(info.in_channels),
        "dfkt_image_size": str(info.image_size),
    }


def export_onnx(net: torch.nn.Module, info: ModelInfo, out: str | Path, optimize: bool = True) -> Path:
    """Write ``net`` (in eval mode) as ONNX with a dynamic batch axis, input ``image``, output ``logits``,
    and dfkt's metadata. A model the exporter cannot handle is a one-line DfktError. ``optimize=False``
    skips the exporter's graph optimiser (ONNX Runtime optimises at load time anyway): on a busy 2-core
    machine it took 348 s of a WRN-16-2's 380 s export, against 31 s without it."""
    import onnx

    example = torch.randn(2, info.in_channels, info.image_size, info.image_size)
    try:
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
            optimize=optimize,
        )
        program.save(str(out))
    except Exception as exc:  # the exporter raises many kinds, with pages of detail
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split("Next steps")[0]
        first = (text.strip().splitlines() or [""])[0][:200]
        raise DfktError(
            f"the model ({info.arch}) cannot be exported to ONNX: {exc.__class__.__name__}: {first}"
        ) from None
    proto = onnx.load(str(out))
    for key, value in onnx_metadata(info).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    return Path(out)
