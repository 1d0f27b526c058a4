"""Data-free int8 quantization: calibration sources (synthesizers) and the ONNX Runtime backend."""

from dfkt.quantize import sources  # noqa: F401  (importing registers the calibration sources)
