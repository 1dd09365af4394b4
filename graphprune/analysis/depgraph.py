"""``analyze``: build the dependency graph of a traced model and find its groups."""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from ..trace import Traced
from .axes import CAT, PROD
from .groups import Group, coupling_graph, find_groups
from .walk import Walk, fetch_attr


@dataclass
class DependencyGraph:
    """The result of the analysis: axes of every value, the groups, and what was frozen."""

    gm: fx.GraphModule
    walk: Walk
    groups: list[Group]
    frozen: dict[int, str]  # frozen leaf axes that reach parameters -> reason
    param_shapes: dict[str, tuple[int, ...]]

    # ------------------------------------------------------------ lookups
    @property
    def table(self):
        return self.walk.table

    @property
    def graph(self) -> nx.MultiGraph:
        """The full networkx dependency graph (equalities and prod/cat refinements)."""
        return self.table.graph

    def coupling_graph(self) -> nx.Graph:
        return coupling_graph(self.table)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def params(self) -> dict[str, list[int]]:
        return self.walk.params

    def axes_by_name(self) -> dict[str, object]:
        return {n.name: a for n, a in self.walk.axes.items()}

    # ------------------------------------------------------------ counting
    def kept_size(self, axis: int, kept: dict[int, int], memo: dict | None = None) -> int:
        """Size of ``axis`` when each leaf in ``kept`` keeps that many units."""
        memo = {} if memo is None else memo
        root = self.table.find(axis)
        if root in memo:
            return memo[root]
        ref = self.table.refinement.get(root)
        if ref is None:
            n = kept.get(root, self.table.size[root])
        else:
            sizes = [self.kept_size(p, kept, memo) for p in ref.parts]
            n = sum(sizes) if ref.kind == CAT else math.prod(sizes)
        memo[root] = n
        return n

    def param_count(self, kept: dict[int, int] | None = None, names=None) -> int:
        kept = kept or {}
        memo: dict = {}
        total = 0
        for name, axes in self.params.items():
            if names is not None and name not in names:
                continue
            if not isinstance(fetch_attr(self.gm, name), torch.nn.Parameter):
                continue
            total += math.prod(self.kept_size(a, kept, memo) for a in axes)
        return total

    def block_params(self) -> set[str]:
        """Parameters inside transformer blocks (a numeric index in their name); all if none are."""
        from .groups import block_of

        names = {n for n in self.params if isinstance(fetch_attr(self.gm, n), torch.nn.Parameter)}
        inside = {n for n in names if block_of(n)}
        return inside or names

    # ------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A hash of the model's structure: parameter names and shapes, and the groups found."""
        data = {
            "params": sorted((n, list(s)) for n, s in self.param_shapes.items()),
            "groups": [(g.name, g.kind, g.size, [(m.param, m.dim) for m in g.members]) for g in self.groups],
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------ report
    def frozen_report(self) -> list[tuple[str, str]]:
        """(what, why) for each frozen axis that touches parameters, deduplicated by reason."""
        out = []
        for leaf, reason in self.frozen.items():
            params = sorted({n for n, axes in self.params.items() for a in axes if leaf in self.table.leaves(a)})
            if params:
                shown = ", ".join(params[:3]) + (f" (+{len(params) - 3} more)" if len(params) > 3 else "")
                out.append((f"{self.table.size[leaf]} channels of {shown}", reason))
        return out

    def summary(self) -> str:
        lines = [f"{len(self.groups)} groups; {sum(self.walk.unsupported.values())} nodes without a rule"]
        kinds = Counter(g.kind for g in self.groups)
        lines.append("kinds: " + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items())))
        width = max((len(g.name) for g in self.groups), default=10)
        lines.append(f"{'group':<{width}}  {'kind':<11}  {'units':>6}  members")
        for g in self.groups:
            lines.append(f"{g.name:<{width}}  {g.kind:<11}  {g.size:>6}  {len(g.members)}")
        if self.walk.unsupported:
            lines.append("ops without a rule (their channels are frozen): " + ", ".join(f"{k} x{v}" for k, v in self.walk.unsupported.items()))
        return "\n".join(lines)


def analyze(model_or_traced, strict: bool = False, **trace_kwargs) -> DependencyGraph:
    """Find the coupled channel groups of a model (an ``nn.Module``, a :class:`Traced`, or a graph).

    ``strict=True`` raises :class:`graphprune.UnsupportedOpError` on an op without a rule instead of
    freezing the channels it touches.
    """
    from ..trace import trace

    if isinstance(model_or_traced, Traced):
        gm = model_or_traced.module
    elif isinstance(model_or_traced, fx.GraphModule):
        gm = model_or_traced
    else:
        gm = trace(model_or_traced, **trace_kwargs).module
    walk = Walk(gm, strict=strict).run()
    shapes = {n: tuple(fetch_attr(gm, n).shape) for n in walk.params}
    trainable = {n for n in walk.params if isinstance(fetch_attr(gm, n), torch.nn.Parameter)}
    groups, frozen = find_groups(walk.table, walk.params, shapes, trainable)
    return DependencyGraph(gm=gm, walk=walk, groups=groups, frozen=frozen, param_shapes=shapes)


__all__ = ["DependencyGraph", "analyze", "PROD", "CAT"]
