"""Scoring passes are registered by name, so a user's pass is written exactly like ours.

A pass is a class with a frozen ``Config`` dataclass and one method ``score(ctx) -> {group name:
1-D tensor of unit importances}`` (higher = more important)::

    @graphprune.register_pass("mine")
    class Mine(graphprune.ScoringPass):
        @dataclass(frozen=True)
        class Config:
            power: float = 1.0

        def score(self, ctx):
            return {g.name: ctx.unit_reduce(g, lambda w, d: w.abs().pow(self.config.power)) for g in ctx.groups}
"""
from __future__ import annotations

import collections.abc
import dataclasses
import numbers
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

from .errors import GraphpruneError

PASSES: dict[str, type["ScoringPass"]] = {}


class ScoringPass:
    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config=None, **overrides):
        check_options(type(self), overrides)
        if config is None:
            try:
                config = self.Config(**overrides)
            except TypeError as exc:
                valid = [f.name for f in dataclasses.fields(self.Config)]
                raise GraphpruneError(f"pass {self.name!r}: {exc}; its options are {valid}") from exc
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config

    def score(self, ctx) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def check_options(cls: type["ScoringPass"], values: dict) -> None:
    """Options a pass does not have, or of the wrong type: a clear error before any work."""
    name = cls.name or cls.__name__
    valid = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise GraphpruneError(f"pass {name!r} has no option {unknown[0]!r}; its options are {valid or 'none'}")
    check_option_types(name, cls.Config, values)


def check_option_types(pass_name: str, config_cls, values: dict) -> None:
    """A clear error for an option of the wrong type (``-O lr=abc`` from the command line) instead
    of a TypeError deep inside the pass; checked against the Config's annotations where they can
    be read (a user's pass with annotations this cannot resolve is not checked)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:
        return
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _fits(value, hint):
            raise GraphpruneError(f"pass {pass_name!r}: option {name}={value!r} should be {_type_text(hint)}, "
                                  f"not {type(value).__name__}")


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:  # NumPy scalars and one-element tensors too (a sweep over np.arange)
        return _number(value, numbers.Real)
    if hint is int:
        return _number(value, numbers.Integral)
    if origin in (tuple, list, collections.abc.Sequence) or hint in (tuple, list):
        return isinstance(value, (tuple, list))  # JSON (the command line) has no tuples
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return isinstance(value, dict)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this check does not understand: the pass's own checks decide


def _number(value, kind) -> bool:
    if isinstance(value, bool):
        return False
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:  # a tensor
        value = value.item()
    return isinstance(value, kind) and not isinstance(value, bool)


def _type_text(hint) -> str:
    if isinstance(hint, type):
        return "a number" if hint is float else hint.__name__
    return str(hint).replace("typing.", "")


def register_pass(name: str):
    """Class decorator: make a :class:`ScoringPass` available as ``method=name``."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, ScoringPass)):
            raise GraphpruneError(f"@register_pass({name!r}) needs a ScoringPass subclass, got {cls!r}")
        cls.name = name
        PASSES[name] = cls
        return cls

    return deco


def get_pass(name: str) -> type[ScoringPass]:
    _load_builtin_passes()
    if name not in PASSES:
        raise GraphpruneError(f"unknown scoring method {name!r}; available: {sorted(PASSES)}")
    return PASSES[name]


def available_passes() -> list[str]:
    _load_builtin_passes()
    return sorted(PASSES)


def _load_builtin_passes() -> None:
    from . import passes  # noqa: F401  (registers the built-in passes on import)
