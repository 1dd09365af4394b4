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

import dataclasses
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
