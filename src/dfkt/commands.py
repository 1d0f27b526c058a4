"""Each command's settings, declared once. A command's pydantic config says what a setting is (its type,
default and description); a ``Command`` says which Python keywords and CLI flags reach it. ``dfkt.api``
validates its functions' keyword arguments through here and ``dfkt.cli`` makes its flags from here,
so ``dfkt.distill(max_seconds=60)`` and ``dfkt distill --max-seconds 60`` build the same config.

A command's keywords are its config's top-level fields (a section, such as ``engine`` or ``params``,
given as a mapping) and the few settings inside sections that have a keyword of their own
(``data_root`` for ``data.root``). Every keyword but a section is also a flag: ``max_seconds`` is
``--max-seconds``. Settings resolve in layers, later ones winning: the config's defaults, a YAML file
(or dict), the keywords (flags), then ``key=value`` overrides (``--set``).
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from dfkt.config import (
    AdaptRunConfig,
    DistillConfig,
    QuantizeConfig,
    SourceConfig,
    TeacherConfig,
    apply_overrides,
    load_yaml,
    merge,
    validate,
)
from dfkt.errors import ArgumentError
from dfkt.sweep import SweepConfig


@dataclass(frozen=True)
class Inner:
    """A setting inside a section that has a keyword (and flag) of its own."""

    key: str  # dotted, e.g. "data.name"
    help: str | None = None  # what it means in this command; None: the field's own description


@dataclass(frozen=True)
class Value:
    """What a flag parses: one value of ``type`` (one of ``choices`` when given), or with ``many`` a list."""

    type: type
    choices: tuple | None = None
    many: bool = False
    switch: bool = False  # also a bare on/off flag: --x (true), --no-x (false), --x MODE


@dataclass(frozen=True)
class Setting:
    """One keyword of a command: where its value goes, and what the CLI shows for it."""

    key: str  # in the config, e.g. "max_seconds" or "data.name"
    value: Value | None  # None: a section, set by keyword (a mapping), --config or --set, not by a flag
    default: Any
    description: str


@dataclass(frozen=True)
class Command:
    name: str  # as the CLI spells it
    config: type[BaseModel]
    positional: tuple[str, ...] = ()  # the keywords the Python function also takes by position, in order
    inner: dict[str, Inner] = field(default_factory=dict)  # keyword -> setting inside a section
    argument: str | None = None  # the keyword the CLI takes as its positional argument instead of a flag
    by_hand: frozenset[str] = frozenset()  # fields the command's function and the CLI handle themselves
    where: str = "config"  # how validation errors name the config

    def settings(self) -> dict[str, Setting]:
        """Every keyword of the command: the positional ones first (what --help lists first), then the
        rest in the config's field order, then the inner ones."""
        out = {}
        for name, info in self.config.model_fields.items():
            if name in self.by_hand or name in self.inner:  # a section shadowed by an inner keyword (data)
                continue
            out[name] = Setting(
                name,
                _value(info.annotation),
                info.get_default(call_default_factory=True),
                _description(self.config, name),
            )
        for keyword, inner in self.inner.items():
            section, leaf = inner.key.split(".")
            parent = self.config.model_fields[section]
            model = parent.annotation
            default = getattr(parent.get_default(call_default_factory=True), leaf)
            out[keyword] = Setting(
                inner.key, _value(model.model_fields[leaf].annotation), default, inner.help or _description(model, leaf)
            )
        return {**{keyword: out[keyword] for keyword in self.positional}, **out}

    def layered(
        self, args: Sequence[Any], keywords: dict[str, Any], file: Any = None, overrides: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The raw config: ``file`` (a YAML path or a dict) <- ``args`` and ``keywords`` <- ``overrides``."""
        settings = self.settings()
        raw = load_yaml(file) if isinstance(file, (str, os.PathLike)) else dict(file or {})
        for keyword, value in self._bind(args, keywords, settings).items():
            node, _, leaf = settings[keyword].key.partition(".")
            raw = merge(raw, {node: {leaf: value}} if leaf else {node: value})
        return apply_overrides(raw, overrides)

    def resolve(
        self,
        args: Sequence[Any] = (),
        keywords: dict[str, Any] | None = None,
        file: Any = None,
        overrides: Sequence[str] = (),
    ) -> Any:
        """The validated config."""
        return validate(self.config, self.layered(args, keywords or {}, file, overrides), where=self.where)

    def _bind(self, args: Sequence[Any], keywords: dict[str, Any], settings: dict[str, Setting]) -> dict[str, Any]:
        """Positional and keyword arguments by keyword; None means "not given" (the layer below decides)."""
        if len(args) > len(self.positional):
            takes = f"at most {len(self.positional)} ({', '.join(self.positional)})" if self.positional else "none"
            raise ArgumentError(
                f"{self.name} takes settings by keyword; by position it takes {takes}, {len(args)} given"
            )
        given = dict(zip(self.positional, args))
        for keyword, value in keywords.items():
            if keyword not in settings:
                raise ArgumentError(f"unknown setting {keyword!r} for {self.name}; valid: {', '.join(settings)}")
            if keyword in given:
                raise ArgumentError(f"{self.name} got {keyword!r} both by position and by keyword")
            given[keyword] = value
        return {keyword: _plain(value) for keyword, value in given.items() if value is not None}


def _plain(value: Any) -> Any:
    """A value as a YAML file would hold it: paths as strings, models as mappings, tuples as lists."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value


def _description(model: type[BaseModel], name: str) -> str:
    """A field's description; a subclass that only changes a default (SourceConfig) keeps its base's."""
    for cls in model.__mro__:
        info = getattr(cls, "model_fields", {}).get(name)
        if info is not None and info.description:
            return info.description
    return ""


def _value(annotation: Any) -> Value | None:
    """What a flag for a setting of this type parses; None for a section (a model or a mapping)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _value(kinds[0])
        modes = [choice for kind in kinds if get_origin(kind) is Literal for choice in get_args(kind)]
        if bool in kinds and len(kinds) == 1 + sum(get_origin(kind) is Literal for kind in kinds):
            return Value(str, ("true", "false", *modes), switch=True)  # a switch with named modes, e.g. augment
    elif origin is Literal:
        return Value(type(args[0]), args)
    elif origin is list:
        item = _value(args[0])
        return None if item is None else Value(item.type, item.choices, many=True)
    elif origin is dict or isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return None
    elif annotation in (bool, int, float, str):
        return Value(annotation)
    raise TypeError(f"no flag for a setting of type {annotation!r}; declare how the CLI parses it in dfkt.commands")


ENGINE = {"devices": Inner("engine.devices"), "num_nodes": Inner("engine.num_nodes")}

DISTILL = Command(
    "distill",
    DistillConfig,
    positional=("method", "teacher", "student", "preset"),
    inner={
        "data": Inner(
            "data.name", "evaluation dataset (see 'dfkt list datasets'); default: the one the teacher was trained on"
        ),
        "data_root": Inner("data.root"),
        **ENGINE,
    },
)
ADAPT = Command(
    "adapt",
    AdaptRunConfig,
    positional=("method", "source", "target"),
    inner={
        "target": Inner(
            "target.name", "target dataset, e.g. fmnist-c:rotate:3 or digits-c:contrast:5, or a folder of images"
        ),
        "data_root": Inner("target.root"),
        **ENGINE,
    },
)
TRAIN_TEACHER, TRAIN_SOURCE = (
    Command(
        name,
        config,
        positional=("model", "data", "epochs"),
        inner={
            "data": Inner("data.name", "dataset (see 'dfkt list datasets')"),
            "data_root": Inner("data.root"),
            "download": Inner("data.download"),
            **ENGINE,
        },
    )
    for name, config in (("train-teacher", TeacherConfig), ("train-source", SourceConfig))
)
QUANTIZE = Command(
    "quantize",
    QuantizeConfig,
    positional=("model", "calibration", "out", "calibration_images"),
    inner={
        "data": Inner("data.name", "dataset: for the 'real' source, and for a foreign model's shape and normalisation"),
        "data_root": Inner("data.root"),
    },
    argument="model",
    where="quantize config",
)
# A sweep's overrides (--set) add to its file's list rather than replace it: dfkt.api.sweep joins them.
SWEEP = Command(
    "sweep",
    SweepConfig,
    positional=("method", "teacher", "preset", "seeds", "max_seconds"),
    by_hand=frozenset({"overrides"}),
    where="sweep",
)

COMMANDS = {c.name: c for c in (TRAIN_TEACHER, TRAIN_SOURCE, DISTILL, ADAPT, SWEEP, QUANTIZE)}
