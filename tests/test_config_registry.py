import pytest

from dfkt.config import DistillConfig, apply_overrides, parse_override, validate
from dfkt.errors import ConfigError, UnknownNameError
from dfkt.registry import METHODS, Registry


def test_override_parses_yaml_types_and_nests():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    raw = apply_overrides({"engine": {"seed": 1}}, ["engine.seed=7", "params.nz=64", "preset=paper"])
    cfg = validate(DistillConfig, raw)
    assert cfg.engine.seed == 7 and cfg.params == {"nz": 64} and cfg.preset == "paper"


def test_unknown_key_is_an_error_naming_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'engine.sed'.*seed"):
        validate(DistillConfig, {"engine": {"sed": 1}})


def test_bad_value_is_one_line():
    with pytest.raises(ConfigError) as err:
        validate(DistillConfig, {"eval_every": 0})
    assert "\n" not in str(err.value) and "eval_every" in str(err.value)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("engine.seed")


def test_registry_rejects_duplicates_and_lists_valid_names():
    reg = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)
    with pytest.raises(UnknownNameError, match="valid things: a"):
        reg.get("b")


def test_rdskd_is_registered():
    assert "rdskd" in METHODS.names()
