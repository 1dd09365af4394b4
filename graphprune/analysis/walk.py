"""The walk over a traced graph: gives every tensor dimension an axis and applies the op rules.

The walker knows nothing about particular ops; it asks the rule table
(:mod:`graphprune.analysis.op_rules`) for each ``call_function`` node. Shapes come from the
``FakeTensor`` that ``torch.export`` stores in ``node.meta["val"]``.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedOpError
from .axes import AxisTable

# Distinct large primes stand in for symbolic sizes (batch, sequence) so that products of
# symbolic dimensions can be compared with integer arithmetic when matching reshapes.
_PRIMES = [1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099, 1_000_117, 1_000_121]


@dataclass
class Frozen:
    """One reason an axis must keep all its indices, for the report."""

    node: str
    op: str
    reason: str


def fetch_attr(root: torch.nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def tensor_meta(node: fx.Node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor_node(x) -> bool:
    return isinstance(x, fx.Node) and isinstance(tensor_meta(x), torch.Tensor)


@dataclass
class RoutePoint:
    """A softmax or top-k over an axis whose indices choose weights (mixture-of-experts routing).

    Removing index ``u`` of such an axis means "never choose ``u``": the masked dense model gives
    it a score of ``-inf`` at the first of these ops on the way (see :mod:`graphprune.masking`).
    """

    node: str
    dim: int
    axis: int
    gate: bool  # the first routing op on its path: the masked model applies the mask here
    picks: int = 0  # how many indices it chooses (top-k: k, a max: 1, a softmax: none)
    top1: bool = False  # a max: successive ones on one axis choose distinct indices (PhiMoE's sparse mixer)


@dataclass
class Walk:
    """State of one analysis: the axis table and the axes of every value in the graph."""

    gm: fx.GraphModule
    strict: bool = False
    table: AxisTable = field(default_factory=AxisTable)
    axes: dict[fx.Node, object] = field(default_factory=dict)  # list[int] or list[list[int]]
    params: dict[str, list[int]] = field(default_factory=dict)  # canonical name -> axes
    aliases: dict[str, str] = field(default_factory=dict)  # attribute target -> canonical name
    frozen_by: list[Frozen] = field(default_factory=list)
    unsupported: dict[str, int] = field(default_factory=dict)
    # names of input/output nodes whose static axes stay prunable (KV-cache tensors); others are frozen
    open_nodes: frozenset[str] = frozenset()
    # integer tensors whose values are indices along an axis (top-k choices): node -> axis, or a
    # list of axis-or-None for a node with several outputs
    values: dict[fx.Node, object] = field(default_factory=dict)
    routes: list[RoutePoint] = field(default_factory=list)
    _gated: set[fx.Node] = field(default_factory=set)  # values already masked by a routing op upstream
    _picked: set[fx.Node] = field(default_factory=set)  # index inputs the current node used as indices
    _symbols: dict[str, int] = field(default_factory=dict)
    _hints: dict = field(default_factory=dict)  # sympy expression -> its integer stand-in
    _by_tensor: dict[int, str] = field(default_factory=dict)  # id(tensor) -> canonical name (ties)

    # ------------------------------------------------------------ shapes
    def size_hint(self, size) -> int:
        if isinstance(size, int):
            return size
        expr = size.node.expr
        hint = self._hints.get(expr)
        if hint is None:  # sympy substitution is slow and the same few expressions recur on every layer
            subs = {}
            for sym in expr.free_symbols:
                if str(sym) not in self._symbols:
                    self._symbols[str(sym)] = _PRIMES[len(self._symbols) % len(_PRIMES)] + 1000 * (len(self._symbols) // len(_PRIMES))
                subs[sym] = self._symbols[str(sym)]
            hint = self._hints[expr] = int(expr.subs(subs))
        return hint

    def shape(self, node: fx.Node) -> list[int]:
        return [self.size_hint(s) for s in tensor_meta(node).shape]

    @staticmethod
    def is_static(node: fx.Node, dim: int) -> bool:
        return isinstance(tensor_meta(node).shape[dim], int)

    # ------------------------------------------------------------ axes
    def fresh(self, node: fx.Node, meta=None) -> list[int]:
        """New axes for a tensor value; dynamic (symbolic) dimensions are frozen at once."""
        meta = tensor_meta(node) if meta is None else meta
        out = []
        for d, s in enumerate(meta.shape):
            axis = self.table.new(self.size_hint(s), f"{node.name}:{d}")
            if not isinstance(s, int):
                self.table.freeze(axis, "dynamic dimension (batch or sequence)")
            out.append(axis)
        return out

    def of(self, node: fx.Node) -> list[int]:
        return self.axes[node]

    def union(self, a: int, b: int, node: fx.Node) -> None:
        self.table.union(a, b, f"{node.target}")

    def freeze(self, axes: Iterable[int], node: fx.Node, reason: str) -> None:
        for a in axes:
            if self.table.find(a) not in self.table.frozen:
                self.frozen_by.append(Frozen(node.name, str(node.target), reason))
            self.table.freeze(a, f"{node.target} ({node.name}): {reason}")

    # ------------------------------------------------------------ routing
    def route(self, node: fx.Node, dim: int, axis: int, picks: int = 0, top1: bool = False) -> None:
        """``node`` mixes values along ``axis`` as routing does, choosing ``picks`` indices. The axis
        stays prunable only if the routing's choices pick weights along it (:meth:`pick`); otherwise
        it is frozen when the walk ends."""
        source = node.args[0]
        self.routes.append(RoutePoint(node.name, dim, axis, gate=source not in self._gated, picks=picks, top1=top1))
        self._gated.add(node)

    def pick(self, index: fx.Node, axis: int, node: fx.Node) -> bool:
        """``index`` selects positions of ``axis``: when its values are routing choices, couple the
        axis they index with ``axis`` (one expert = one router row = one slice of each expert weight)."""
        chosen = self.values.get(index)
        if not isinstance(chosen, int):
            return False
        self._picked.add(index)
        self.union(axis, chosen, node)
        self.table.tag(axis, "experts")
        return True

    def _settle_routes(self) -> None:
        """Routing axes whose choices never picked a weight are ordinary mixed axes: frozen."""
        nodes = {n.name: n for n in self.gm.graph.nodes} if self.routes else {}
        top_k: dict[int, int] = {}  # the largest k of a top-k over the axis
        top_1: dict[int, int] = {}  # how many max ops choose from it, one after another
        for r in self.routes:
            if "experts" not in self.table.tags_of(r.axis):
                self.freeze([r.axis], nodes[r.node], "mixes values along this dimension")
            root = self.table.find(r.axis)
            if r.top1:
                top_1[root] = top_1.get(root, 0) + 1
            else:
                top_k[root] = max(top_k.get(root, 0), r.picks)
        for root in top_k.keys() | top_1.keys():  # each choice needs an expert to choose
            self.table.require(root, max(top_k.get(root, 0), top_1.get(root, 0)))

    def _track_values(self, node: fx.Node, rule) -> None:
        """After ``node``'s rule ran: index values pass through ops that only move them (and through
        indexing, as the indexed source: ``choices[:, j]``); an index the rule picked by is used up;
        any other use freezes their axis (renumbering the kept indices would change what it computes)."""
        carried = [(a, self.values[a]) for a in _tensor_inputs(node) if a in self.values and a not in self._picked]
        moves = rule is not None and (rule.keeps_values or rule.reads_values)
        if moves and carried and carried[0][0] is node.args[0] and isinstance(carried[0][1], int) \
                and isinstance(node.meta.get("val"), torch.Tensor):
            self.values[node] = carried[0][1]
            carried = carried[1:]
        elif rule is not None and rule.joins_values and carried and len(carried) == len(_tensor_inputs(node)) \
                and len({c for _, c in carried}) == 1 and isinstance(carried[0][1], int):
            self.values[node] = carried[0][1]  # choices of the same experts, side by side (PhiMoE's top-2)
            carried = []
        if rule is not None and rule.keeps_values and node.args and node.args[0] in self._gated:
            self._gated.add(node)
        for _, chosen in carried:
            for axis in (chosen if isinstance(chosen, list) else [chosen]):
                if axis is not None:
                    self.freeze([axis], node, "the routing's choices are used as numbers here")

    # ------------------------------------------------------------ walking
    def run(self) -> "Walk":
        from .op_rules import rule_for

        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if is_tensor_node(node):
                    self.axes[node] = self.fresh(node)
                    if node.name not in self.open_nodes:
                        self.freeze(self.axes[node], node, "model input")
            elif node.op == "get_attr":
                self._attr(node)
            elif node.op == "output":
                for leaf in _flatten(node.args):
                    if leaf.name in self.open_nodes:
                        continue
                    if isinstance(self.values.get(leaf), int):
                        self.freeze([self.values[leaf]], node, "the routing's choices are a model output")
                    if leaf in self.axes and isinstance(self.axes[leaf][0] if self.axes[leaf] else 0, int):
                        self.freeze(self.axes[leaf], node, "model output")
            elif node.op == "call_function":
                self._call(node, rule_for(node.target))
        self._settle_routes()
        return self

    def _attr(self, node: fx.Node) -> None:
        value = fetch_attr(self.gm, node.target)
        if not isinstance(value, torch.Tensor):
            return
        # Tied weights are one tensor reached by two names: they share their axes.
        name = self._by_tensor.get(id(value))
        if name is not None:
            self.aliases[node.target] = name
            self.axes[node] = self.params[name]
            return
        self._by_tensor[id(value)] = node.target
        self.aliases[node.target] = node.target
        axes = [self.table.new(s, f"{node.target}:{d}") for d, s in enumerate(value.shape)]
        self.params[node.target] = axes
        self.axes[node] = axes

    def _call(self, node: fx.Node, rule) -> None:
        val = node.meta.get("val")
        if node.target is operator.getitem:
            src = self.axes.get(node.args[0])
            if isinstance(src, list) and src and isinstance(src[0], list):
                self.axes[node] = src[node.args[1]]
            elif is_tensor_node(node):
                self.axes[node] = self.fresh(node)
            chosen = self.values.get(node.args[0])
            if isinstance(chosen, list) and chosen[node.args[1]] is not None:
                self.values[node] = chosen[node.args[1]]
            return
        self._picked.clear()
        try:
            self._call_rule(node, rule, val)
        finally:
            self._track_values(node, rule)

    def _call_rule(self, node: fx.Node, rule, val) -> None:
        has_tensor_out = isinstance(val, torch.Tensor) or (
            isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)
        )
        if rule is None:
            if not has_tensor_out and not _tensor_inputs(node):
                return  # symbolic-int arithmetic, asserts: nothing to propagate
            self.unsupported[str(node.target)] = self.unsupported.get(str(node.target), 0) + 1
            if self.strict:
                raise UnsupportedOpError(
                    f"no channel rule for op {node.target} (node {node.name}); add one with "
                    f"graphprune.register_op_rule, or use strict=False to freeze the channels it touches"
                )
            for arg in _tensor_inputs(node):
                self.freeze(self.axes.get(arg, []), node, "op without a rule")
            if has_tensor_out:
                self.axes[node] = self._fresh_any(node, val)
                for axes in (self.axes[node] if isinstance(val, (list, tuple)) else [self.axes[node]]):
                    self.freeze(axes, node, "op without a rule")
            return
        out = rule.propagate(self, node)
        if out is not None:
            self.axes[node] = out

    def _fresh_any(self, node, val):
        if isinstance(val, torch.Tensor):
            return self.fresh(node)
        return [self.fresh(node, v) if isinstance(v, torch.Tensor) else [] for v in val]


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    elif isinstance(x, fx.Node):
        yield x


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in _flatten((node.args, node.kwargs)) if is_tensor_node(a)]
