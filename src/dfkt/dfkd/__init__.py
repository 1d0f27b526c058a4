"""Data-free knowledge distillation methods; importing this package registers them."""

from dfkt.dfkd import cmi, dafl, deepinversion, dfad, fast, mskd, rdskd, zskd, zskt  # noqa: F401
