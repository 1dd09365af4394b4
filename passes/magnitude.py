"""Magnitude: a unit is as important as the norm of all the weights it owns (no data needed)."""
from __future__ import annotations

from dataclasses import dataclass

from graphprune.registry import ScoringPass, register_pass


@register_pass("magnitude")
class Magnitude(ScoringPass):
    @dataclass(frozen=True)
    class Config:
        p: float = 2.0  # the norm: 1 (sum of |w|) or 2 (Euclidean)

    def score(self, ctx):
        p = self.config.p
        return {g.name: ctx.unit_reduce(g, lambda w, d: w.abs().pow(p)).pow(1 / p) for g in ctx.groups}
