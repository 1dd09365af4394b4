"""``score``: run a scoring pass over the groups of a dependency graph."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # new values set by the pass


    @property
    def module(self):
        return self.dg.gm

    def param(self, name: str) -> torch.Tensor:
        """A weight as the pass sees it: its updated value when the pass has set one."""
        return self.weights[name] if name in self.weights else fetch_attr(self.dg.gm, name)

    def update_weight(self, name: str, value: torch.Tensor) -> None:
        """Give parameter ``name`` a new value (e.g. merged LoRA); the rewrite starts from it."""
        if name not in self.dg.params:
            raise GraphpruneError(f"update_weight: {name!r} is not a parameter of the traced graph")
        old = fetch_attr(self.dg.gm, name)
        if tuple(value.shape) != tuple(old.shape):
            raise GraphpruneError(f"update_weight: {name!r} has shape {tuple(old.shape)}, not {tuple(value.shape)}")
        self.weights[name] = value.detach().to(dtype=old.dtype, device=old.device)

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


class Scores(dict):
    """``{group name: 1-D importance per unit}``; ``weights`` holds weights the pass changed."""

    def __init__(self, scores=(), weights=None):
        super().__init__(scores)
        self.weights: dict[str, torch.Tensor] = dict(weights or {})


def score(
    dg: DependencyGraph,
    method: str | ScoringPass = "magnitude",
    *,
    kinds=DEFAULT_KINDS,
    ignore=(),
    calib=None,
    progress: bool = False,
    **config,
) -> Scores:
    """Importance of every unit of every selected group: ``{group name: 1-D tensor}`` (a :class:`Scores`)."""
    scorer = method if isinstance(method, ScoringPass) else get_pass(method)(**config)
    if scorer.needs_calibration and calib is None:
        raise GraphpruneError(f"method {scorer.name!r} needs calibration data: pass calib=...")
    if any(p.is_meta for p in dg.gm.parameters()):
        raise GraphpruneError(
            "the model's weights are on the meta device, so nothing can be scored: load real weights, "
            "or pass a saved plan (compile(model, plan=...)) to prune structure only"
        )
    ctx = ScoringContext(dg, select_groups(dg.groups, kinds, ignore), calib, progress)
    scores = scorer.score(ctx)
    for g in ctx.groups:
        s = scores.get(g.name)
        if s is None or tuple(s.shape) != (g.size,):
            raise GraphpruneError(f"pass {scorer.name!r} returned no or wrongly shaped scores for {g.name!r}")
    return Scores(scores, ctx.weights)
