"""Data-free knowledge distillation methods; importing this package registers them."""

from dfkt.dfkd import rdskd  # noqa: F401
