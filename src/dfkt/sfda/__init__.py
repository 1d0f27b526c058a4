"""Source-free domain adaptation methods; importing this package registers them."""

from dfkt.sfda import offline, online  # noqa: F401
