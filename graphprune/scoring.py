"""``score``: run a scoring pass over the groups of a dependency graph."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .analysis import DEFAULT_KINDS, DependencyGraph, Group
from .analysis.groups import select_groups
from .analysis.walk import fetch_attr
from .errors import GraphpruneError
from .registry import ScoringPass, get_pass


@dataclass
class ScoringContext:
    """What a pass sees: the graph, the groups to score, and calibration data when given."""

    dg: DependencyGraph
    groups: list[Group]
    calib: object = None
    progress: bool = False

    @property
    def module(self):
        return self.dg.gm

    def param(self, name: str) -> torch.Tensor:
        return fetch_attr(self.dg.gm, name)

    def unit_reduce(self, group: Group, per_param: Callable[[torch.Tensor, int], torch.Tensor], tensors=None) -> torch.Tensor:
        """Sum ``per_param(tensor, dim)`` (an element-wise map) over every unit of ``group``.

        ``tensors`` maps parameter names to the tensors to use instead of the weights (e.g.
        gradients, or weight * gradient); by default the weights themselves.
        """
        total = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            t = (tensors or {}).get(m.param) if tensors is not None else self.param(m.param)
            if t is None:
                continue
            values = per_param(t.detach(), m.dim).double()
            other = [d for d in range(values.dim()) if d != m.dim]
            per_pos = values.sum(dim=other) if other else values
            keep = m.coords >= 0
            total.index_add_(0, m.coords[keep].to(per_pos.device).cpu(), per_pos[keep.to(per_pos.device)].cpu())
        return total.float()


def score(
    dg: DependencyGraph,
    method: str | ScoringPass = "magnitude",
    *,
    kinds=DEFAULT_KINDS,
    ignore=(),
    calib=None,
    progress: bool = False,
    **config,
) -> dict[str, torch.Tensor]:
    """Importance of every unit of every selected group: ``{group name: 1-D tensor}``."""
    scorer = method if isinstance(method, ScoringPass) else get_pass(method)(**config)
    if scorer.needs_calibration and calib is None:
        raise GraphpruneError(f"method {scorer.name!r} needs calibration data: pass calib=...")
    ctx = ScoringContext(dg, select_groups(dg.groups, kinds, ignore), calib, progress)
    scores = scorer.score(ctx)
    for g in ctx.groups:
        s = scores.get(g.name)
        if s is None or tuple(s.shape) != (g.size,):
            raise GraphpruneError(f"pass {scorer.name!r} returned no or wrongly shaped scores for {g.name!r}")
    return scores
