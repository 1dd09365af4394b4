"""The masking pass: a copy of the graph where every group has a mask vector over its units.

After every value whose dimension contains a masked group, a ``mul`` by that group's mask
(gathered onto the dimension's positions and broadcast) is inserted. With 0/1 masks this is
the "masked dense model" that a pruned model must equal exactly; with soft or sampled masks it
is what learned-mask methods train. Masks live in buffers ``_graphprune_mask_<i>`` (one per
group, float, shape ``[units]``) that callers can overwrite between calls.

Experts are masked where the router chooses too: a removed expert is one the router never picks,
so the scores entering the first softmax/top-k over the experts also get ``+ log(mask)`` (``-inf``
for a 0: never chosen; a soft mask scales that expert's share before the shares are renormalised).
Zeroing its router row alone would still let it take tokens' places.

An in-place op (``h.add_(1)``, ``k[..., :n].copy_(x)``) is followed by zeroing its target's removed
units in place, since later readers read the target; a view written in place is not itself masked
(a masked copy would take the write instead of the tensor it views).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .analysis import DependencyGraph, Group
from .analysis.walk import tensor_meta

aten = torch.ops.aten


@dataclass
class MaskedModel:
    """A masked copy of a traced graph and the names of its mask buffers."""

    module: fx.GraphModule
    groups: list[Group]
    buffer_names: dict[str, str]  # group name -> buffer name

    def mask(self, group: str) -> torch.Tensor:
        return getattr(self.module, self.buffer_names[group])

    def set_mask(self, group: str, values: torch.Tensor) -> None:
        self.mask(group).copy_(values)

    def set_keep(self, keep: dict[str, torch.Tensor]) -> None:
        """0/1 masks from kept indices per group name (groups not named keep everything)."""
        for g in self.groups:
            m = torch.zeros(g.size) if g.name in keep else torch.ones(g.size)
            if g.name in keep:
                m[torch.as_tensor(keep[g.name], dtype=torch.long)] = 1.0
            self.set_mask(g.name, m)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def insert_masks(dg: DependencyGraph, groups: list[Group] | None = None, weights: dict[str, torch.Tensor] | None = None) -> MaskedModel:
    """Copy ``dg.gm`` and multiply every value carrying one of ``groups`` by that group's mask.

    ``weights`` replaces parameters of the copy first (as in :func:`graphprune.rewrite`). The
    copy shares the other weights' storage with ``dg.gm``, read-only (``requires_grad=False``):
    the masks are what callers change or train, and a model-sized copy per search would not fit
    large models.
    """
    from .lora import frozen_copy
    from .rewrite import set_weights

    groups = dg.groups if groups is None else groups
    gm = frozen_copy(dg.gm)
    set_weights(gm, dg, weights)
    graph, table = gm.graph, dg.table
    buffers: dict[str, str] = {}
    first = next(iter(graph.nodes))  # mask-building nodes go before everything else
    unit_masks: dict[int, fx.Node] = {}  # leaf -> its mask over units
    for i, g in enumerate(groups):
        name = f"_graphprune_mask_{i}"
        gm.register_buffer(name, torch.ones(g.size, device=_device(gm)))
        buffers[g.name] = name
        with graph.inserting_before(first):
            if g.units is None:
                leaf = table.find(g.axis)
                unit_masks[leaf] = _mul_first(graph, first, unit_masks[leaf], graph.get_attr(name)) if leaf in unit_masks else graph.get_attr(name)
                continue
            for u, parts in enumerate(g.units):  # a block's unit scales every unit of its leaves
                factor = graph.call_function(aten.select.int, (graph.get_attr(name), 0, u))
                for leaf in (table.find(p) for p in parts):
                    spread = graph.call_function(aten.expand.default, (graph.call_function(aten.view.default, (factor, [1])), [table.size[leaf]]))
                    unit_masks[leaf] = _mul_first(graph, first, unit_masks[leaf], spread) if leaf in unit_masks else spread
    leaves = set(unit_masks)
    padded: dict[int, fx.Node] = {}  # leaf -> its mask with a trailing 1 (for "not here")
    for leaf, m in unit_masks.items():
        with graph.inserting_before(first):
            ones = graph.call_function(aten.ones.default, ([1],), {"device": _device(gm)})
            padded[leaf] = graph.call_function(aten.cat.default, ([m, ones],))
    routed = {leaf for r in dg.walk.routes for leaf in table.leaves(r.axis)} & leaves
    axis_mask_cache: dict[tuple[int, bool], fx.Node] = {}
    n_const = 0

    def axis_mask(axis: int, at_route: bool = False) -> fx.Node | None:
        """The mask over the positions of ``axis``: of all its masked leaves, or (``at_route``) of its routed ones."""
        nonlocal n_const
        root = table.find(axis)
        if (root, at_route) in axis_mask_cache:
            return axis_mask_cache[root, at_route]
        mine = [leaf for leaf in table.leaves(root) if leaf in leaves and (leaf in routed or not at_route)]
        node = None
        for leaf in mine:
            coords = table.coordinate(root, leaf)
            coords = torch.where(coords < 0, torch.full_like(coords, table.size[leaf]), coords)
            cname = f"_graphprune_coords_{n_const}"
            n_const += 1
            gm.register_buffer(cname, coords.to(_device(gm)))
            with graph.inserting_before(first):
                picked = graph.call_function(aten.index_select.default, (padded[leaf], 0, graph.get_attr(cname)))
            node = picked if node is None else _mul_first(graph, first, node, picked)
        axis_mask_cache[root, at_route] = node
        return node

    nodes = {n.name: n for n in graph.nodes}
    for r in dg.walk.routes:
        m = axis_mask(r.axis, at_route=True) if r.gate else None
        if m is not None:
            _gate_scores(graph, nodes[r.node], r.dim, m)

    by_name = dg.axes_by_name()
    views_written = _views_written(graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(tensor_meta(node), torch.Tensor) or node in views_written:
            continue
        if not tensor_meta(node).is_floating_point():
            continue  # flags and indices (a router's group mask as bools): the numbers they select are masked
        axes = by_name.get(node.name)
        if not axes or not isinstance(axes[0], int):
            continue
        factors = []
        for d, a in enumerate(axes):
            m = axis_mask(a)
            if m is not None:
                factors.append((d, m))
        if not factors:
            continue
        if _alias(node, write=True):
            _zero_removed_in_place(graph, node, factors)
            continue
        ndim, out, inserted = len(axes), node, set()
        for d, m in factors:
            with graph.inserting_after(out):
                view = graph.call_function(aten.view.default, (m, _on_dim(ndim, d)))
            with graph.inserting_after(view):
                typed = graph.call_function(aten.type_as.default, (view, node))
            with graph.inserting_after(typed):
                scaled = graph.call_function(aten.mul.Tensor, (out, typed))
            # where(): a removed unit is exactly 0 even where the dense value is inf (0 * inf = nan)
            with graph.inserting_after(scaled):
                live = graph.call_function(aten.ne.Scalar, (typed, 0))
            with graph.inserting_after(live):
                out = graph.call_function(aten.where.ScalarOther, (live, scaled, 0.0))
            inserted |= {view, typed, scaled, live, out}
        node.replace_all_uses_with(out, delete_user_cb=lambda user, mine=inserted: user not in mine)
    graph.lint()
    gm.recompile()
    return MaskedModel(gm, list(groups), buffers)


def _zero_removed_in_place(graph: fx.Graph, node: fx.Node, factors) -> None:
    """After an in-place op (``h.add_(1)``, ``k[..., :8].copy_(x)``), its target's removed units are
    zeroed in place too: later readers of the target (or of the tensor it views) read it, not ``node``."""
    target, ndim, last = node.args[0], tensor_meta(node).dim(), node

    def then(op, *args):
        nonlocal last
        with graph.inserting_after(last):
            last = graph.call_function(op, args)
        return last

    for d, m in factors:
        removed = then(aten.eq.Scalar, then(aten.view.default, m, _on_dim(ndim, d)), 0)
        then(aten.masked_fill_.Scalar, target, removed, 0.0)


def _views_written(graph: fx.Graph) -> set[fx.Node]:
    """Every view on the way from an in-place op back to the tensor it writes into
    (``h.unsqueeze(0)[0].mul_(2)``): a masked copy of any of them would take the write."""
    out = set()
    for node in graph.nodes:
        if not _alias(node, write=True):
            continue
        view = node.args[0]
        while isinstance(view, fx.Node) and _alias(view, write=False) and view not in out:
            out.add(view)
            view = view.args[0]
    return out


def _alias(node: fx.Node, write: bool) -> bool:
    """Whether ``node``'s result aliases its first input: written in place (``copy_``) or a view (``slice``)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.returns:
        return False
    info = schema.returns[0].alias_info
    return info is not None and info.is_write == write


def _gate_scores(graph: fx.Graph, node: fx.Node, dim: int, mask: fx.Node) -> None:
    """``node`` (a routing softmax/top-k) reads ``scores + log(mask)`` along ``dim``: ``-inf`` where 0."""
    scores = node.args[0]
    with graph.inserting_before(node):
        on_dim = graph.call_function(aten.view.default, (mask, _on_dim(tensor_meta(scores).dim(), dim)))
        m = graph.call_function(aten.type_as.default, (on_dim, scores))
        # clamp: log(0) would give an inf whose gradient through the unused where() branch is nan
        logm = graph.call_function(aten.log.default, (graph.call_function(aten.clamp_min.default, (m, 1e-30)),))
        live = graph.call_function(aten.ne.Scalar, (m, 0))
        gated = graph.call_function(aten.where.ScalarOther, (live, graph.call_function(aten.add.Tensor, (scores, logm)), float("-inf")))
    node.replace_input_with(scores, gated)


def _on_dim(ndim: int, dim: int) -> list[int]:
    """The view shape that lays a mask over positions along ``dim`` of an ``ndim``-d value."""
    shape = [1] * ndim
    shape[dim] = -1
    return shape


def _mul_first(graph: fx.Graph, first: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
    with graph.inserting_before(first):
        return graph.call_function(aten.mul.Tensor, (a, b))


def _device(gm: fx.GraphModule) -> torch.device:
    for p in gm.parameters():
        return p.device
    return torch.device("cpu")
