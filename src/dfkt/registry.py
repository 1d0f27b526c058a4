"""One registry class for everything that is chosen by name: methods, models, datasets, calibration sources."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from dfkt.errors import UnknownNameError

T = TypeVar("T")


def import_package_modules(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (call from its ``__init__`` with ``__name__, __path__``), so a method
    registers itself by being a file in the package: adding one means adding a file, not an import line."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


class Registry(Generic[T]):
    """Maps names to objects. Duplicate names raise; unknown names list the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("lenet5")``."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


METHODS: Registry = Registry("method")
MODELS: Registry = Registry("model")
DATASETS: Registry = Registry("dataset")
GENERATORS: Registry = Registry("generator")
ADAPT_METHODS: Registry = Registry("adaptation method")
CALIBRATION_SOURCES: Registry = Registry("calibration source")
