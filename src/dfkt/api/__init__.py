"""The public functions. Every CLI subcommand is a thin shell over one of these."""

# Importing these registers the methods and calibration sources.
from dfkt import dfkd, sfda  # noqa: F401
from dfkt import quantize as _quantize_sources  # noqa: F401
from dfkt.api.adapt import adapt, target_halves, target_images
from dfkt.api.common import list_names, method_params
from dfkt.api.distill import DEFAULT_STUDENT, distill, resolve_distill_config
from dfkt.api.evaluate import evaluate
from dfkt.api.export import export
from dfkt.api.quantize import quantize
from dfkt.api.sweep import sweep
from dfkt.api.train import train_references, train_source, train_teacher
from dfkt.report.page import write_report as report

__all__ = [
    "DEFAULT_STUDENT",
    "adapt",
    "distill",
    "evaluate",
    "export",
    "list_names",
    "method_params",
    "quantize",
    "report",
    "resolve_distill_config",
    "sweep",
    "target_halves",
    "target_images",
    "train_references",
    "train_source",
    "train_teacher",
]
