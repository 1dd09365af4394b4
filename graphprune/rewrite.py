"""Rewrite: emit a new, physically smaller ``GraphModule`` from a plan.

Parameters and buffers are sliced along every pruned dimension; then every node whose op rule
has a ``rewrite`` updates its size constants (view/expand/split sizes, slice bounds, a mean's
divisor, ...). The input graph module and the caller's model are never modified: the output
owns fresh copies of all tensors.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from .analysis import DependencyGraph
from .analysis.op_rules import rule_for
from .analysis.walk import fetch_attr
from .errors import RewriteError

aten = torch.ops.aten


class AxisMasks:
    """What survives on each axis, given a boolean keep-mask per group leaf."""

    def __init__(self, dg: DependencyGraph, leaf_keep: dict[int, torch.Tensor]):
        self.dg = dg
        self.keep = {dg.table.find(k): v for k, v in leaf_keep.items()}
        self.by_name = dg.axes_by_name()
        self._cache: dict[int, torch.Tensor] = {}

    def axes(self, node: fx.Node):
        return self.by_name[node.name]

    def mask(self, axis: int) -> torch.Tensor:
        root = self.dg.table.find(axis)
        if root not in self._cache:
            self._cache[root] = self.dg.table.keep_mask(root, self.keep)
        return self._cache[root]

    def pruned(self, axis: int) -> bool:
        # decided from the leaves, so that huge axes (batch x sequence) never get a mask tensor
        return any(leaf in self.keep and not bool(self.keep[leaf].all()) for leaf in self.dg.table.leaves(axis))

    def kept(self, axis: int) -> int:
        return int(self.mask(axis).sum()) if self.pruned(axis) else self.size(axis)

    def size(self, axis: int) -> int:
        return self.dg.table.size[self.dg.table.find(axis)]


class RewriteContext(AxisMasks):
    """AxisMasks plus the graph edits the op rules need."""

    def __init__(self, dg, leaf_keep, gm: fx.GraphModule):
        super().__init__(dg, leaf_keep)
        self.gm = gm
        self._n_consts = 0

    def constant(self, value: torch.Tensor, prefix: str = "_graphprune_const") -> fx.Node:
        name = f"{prefix}_{self._n_consts}"
        self._n_consts += 1
        self.gm.register_buffer(name, value)
        first = next(iter(self.gm.graph.nodes))
        with self.gm.graph.inserting_before(first):
            return self.gm.graph.get_attr(name)

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Route ``old``'s users to ``new`` (same channels), so later rules still find its axes."""
        self.by_name[new.name] = self.by_name[old.name]
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

    def scale_output(self, node: fx.Node, factor: float) -> None:
        with node.graph.inserting_after(node):
            scaled = node.graph.call_function(aten.mul.Tensor, (node, factor))
        self.replace(node, scaled)

    def select_output(self, node: fx.Node, dim: int, mask: torch.Tensor) -> None:
        index = self.constant(mask.nonzero().flatten())
        with node.graph.inserting_after(node):
            picked = node.graph.call_function(aten.index_select.default, (node, dim, index))
        self.replace(node, picked)


def _set_tensor(root: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, attr = target.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    if attr in owner._parameters:
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def slice_tensors(gm: fx.GraphModule, ctx: AxisMasks) -> None:
    """Replace every parameter/buffer of ``gm`` (a copy) by its kept slice (tied names stay tied)."""
    targets_of: dict[str, list[str]] = {}
    for target, canonical in ctx.dg.walk.aliases.items():
        targets_of.setdefault(canonical, []).append(target)
    for name, axes in ctx.dg.params.items():
        tensor = fetch_attr(gm, name)
        new = tensor
        for d, a in enumerate(axes):
            if ctx.pruned(a):
                new = new.index_select(d, ctx.mask(a).nonzero().flatten().to(tensor.device))
        if new is tensor:
            continue
        if isinstance(tensor, torch.nn.Parameter):
            new = torch.nn.Parameter(new.detach().contiguous(), requires_grad=tensor.requires_grad)
        for target in targets_of.get(name, [name]):
            _set_tensor(gm, target, new)


def set_weights(gm: fx.GraphModule, dg: DependencyGraph, weights: dict[str, torch.Tensor] | None) -> None:
    """Give the parameters of ``gm`` (a copy of ``dg.gm``) new values; tied names get the same one."""
    for name, value in (weights or {}).items():
        old = fetch_attr(gm, name)
        new = torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad) if isinstance(old, torch.nn.Parameter) else value
        for target in [t for t, c in dg.walk.aliases.items() if c == name] or [name]:
            _set_tensor(gm, target, new)


def rewrite(dg: DependencyGraph, leaf_keep: dict[int, torch.Tensor], weights: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """A physically smaller copy of ``dg.gm`` keeping, for each group leaf, the masked units.

    ``weights`` (parameter name -> tensor of the same shape) replaces weights before slicing: how
    passes that also train (LoRAPrune's merged LoRA, PAT's merged HSMs) hand over their result.
    """
    gm = copy.deepcopy(dg.gm)
    set_weights(gm, dg, weights)
    ctx = RewriteContext(dg, leaf_keep, gm)
    slice_tensors(gm, ctx)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.name not in ctx.by_name:
            continue
        rule = rule_for(node.target)
        if rule is not None and rule.rewrite is not None:
            try:
                rule.rewrite(ctx, node)
            except Exception as exc:
                raise RewriteError(f"could not rewrite node {node.name} ({node.target}): {exc}") from exc
    gm.graph.lint()
    gm.recompile()
    return gm
