"""Devices, precision, seeding, checkpoints, metrics and progress: see engine.py."""

from dfkt.engine.engine import CHECKPOINT, Engine, RunResult, Stage

__all__ = ["CHECKPOINT", "Engine", "RunResult", "Stage"]
