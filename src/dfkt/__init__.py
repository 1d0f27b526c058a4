"""dfkt: data-free knowledge transfer. The public functions mirror the ``dfkt`` subcommands."""

from dfkt.api import adapt, distill, evaluate, export, list_names, quantize, report, sweep, train_source, train_teacher
from dfkt.demo import run_demo as demo

__all__ = [
    "adapt",
    "demo",
    "distill",
    "evaluate",
    "export",
    "list_names",
    "quantize",
    "report",
    "sweep",
    "train_source",
    "train_teacher",
]
__version__ = "0.1.0"
