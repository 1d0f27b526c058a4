"""The int8 backend: ONNX Runtime's static post-training quantization (QDQ format, per-channel weights).

No kernels of our own: the fp32 model is exported to ONNX, pre-processed (shape inference, graph
optimisation), calibrated on the given images by ONNX Runtime's MinMax, Entropy or Percentile
calibrator, and written with QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into int8
operators at load time.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from dfkt.engine.cpu import CPUINFO, cpu_flags

CALIBRATION_BATCH = 64  # images per calibration forward in ONNX Runtime
INPUT, OUTPUT = "image", "logits"


def image_reader(images: Tensor, batch: int = CALIBRATION_BATCH):
    """An ONNX Runtime ``CalibrationDataReader`` over a tensor of normalised images."""
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(
                [images[i : i + batch].float().contiguous().numpy() for i in range(0, len(images), batch)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {INPUT: chunk}

    return ImageReader()


def needs_reduced_range(cpuinfo: Path = CPUINFO) -> bool:
    """True on an x86 CPU without AVX512-VNNI or AVX-VNNI, whose int8 kernels add pairs of products in 16 bits
    (measured on an AVX2-only AMD EPYC: the digits teacher's int8 model agreed with fp32 on 81% of held-out
    synthetic images with 8-bit weights, above 90% with 7-bit ones). False elsewhere or when unknown."""
    flags = cpu_flags(cpuinfo)
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni"} & flags


def quantize_onnx(
    fp32: Path,
    out: Path,
    images: Tensor,
    method: str,
    percentile: float,
    per_channel: bool,
    activation_type: str,
    work: Path,
    reduce_range: bool | None = None,
) -> dict[str, Any]:
    """Write the int8 QDQ model of ``fp32`` to ``out``, calibrated on ``images``; ``reduce_range`` None: on for
    an x86 CPU without VNNI (:func:`needs_reduced_range`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    try:  # ONNX Runtime's recommended pre-processing: shape inference and fusions (e.g. Conv+BatchNorm)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        source = prepared
    except Exception:  # an unusual graph that its optimiser rejects is still quantizable as exported
        source = fp32
    reader = image_reader(images)
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    activation = QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8
    reduce_range = needs_reduced_range() if reduce_range is None else reduce_range
    with contextlib.redirect_stdout(io.StringIO()):  # the entropy calibrator prints its progress
        quantize_static(
            str(source),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=activation,
            weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
            calibrate_method=calibrate,
            extra_options=extra,
        )
    return {
        "format": "QDQ",
        "per_channel": per_channel,
        "activation_type": activation_type,
        "weight_type": "int8",
        "reduce_range": reduce_range,
        "calibrate_method": method,
        **({"percentile": percentile} if method == "percentile" else {}),
        "preprocessed": source == prepared,
    }


def session(path: Path, threads: int | None = None):
    """A CPU inference session using ``threads`` threads (default: as many as torch uses, so
    OMP_NUM_THREADS=1 or torch.set_num_threads(1) holds ONNX Runtime to one core too)."""
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess, images: Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate(
        [
            sess.run([OUTPUT], {INPUT: images[i : i + batch].float().contiguous().numpy()})[0]
            for i in range(0, len(images), batch)
        ]
    )


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    present = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        if key in present:
            present[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def quantization_metadata(record: dict[str, Any]) -> dict[str, str]:
    return {"dfkt_quantization": json.dumps(record, sort_keys=True)}
