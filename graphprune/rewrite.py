"""Rewrite: emit a new, physically smaller ``GraphModule`` from a plan.

Parameters and buffers are sliced along every pruned dimension; then every node whose op rule
has a ``rewrite`` updates its size constants (view/expand/split sizes, slice bounds, a mean's
divisor, ...). The input graph module and the caller's model are never modified: the output
owns fresh copies of all tensors.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from .analysis import DependencyGraph
from .analysis.op_rules import rule_for
from .analysis.walk import fetch_attr
from .errors import GraphpruneError, RewriteError

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
        self.dropped: set[str] = set()  # parameters removed with whole blocks

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
        if name in getattr(ctx, "dropped", ()):
            continue  # went with a removed block
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


# ================================================================ whole-block removal
# A contraction over a removed axis is the block's write: with all its inputs zero it is its bias.
EXIT_BIAS_ARG = {"aten.linear.default": 2, "aten.addmm.default": 0, "aten.baddbmm.default": 0, "aten.mm.default": None,
                 "aten.bmm.default": None, "aten.matmul.default": None, "aten.sum.dim_IntList": None, "aten.mean.dim": None}


@dataclass
class BlockRemoval:
    """What removing some leaf axes whole (a block) does to the graph."""

    exits: dict[str, int | None]  # node -> index of its bias argument: replaced by zeros (+ bias)
    dead: set[str]  # nodes erased: every value that became empty, and what only fed them
    dropped_params: set[str]  # canonical parameter names no node uses any more


def _is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and not node.users and node.is_impure()


def block_removal(dg: DependencyGraph, removed: frozenset[int]) -> BlockRemoval:
    """Nodes and parameters that go when every unit of the leaves ``removed`` is removed.

    A value with an axis of kept size 0 is empty and goes; a contraction that reads an empty value
    but is not empty itself becomes zeros plus its bias; then whatever fed only removed nodes goes
    too (a block's input norm, Qwen3's q/k norms). Plan counting and the rewrite both use this.
    """
    cache = dg.__dict__.setdefault("_block_removal_cache", {})
    if removed in cache:
        return cache[removed]
    kept, memo, by_name = {leaf: 0 for leaf in removed}, {}, dg.axes_by_name()

    def empty(axes) -> bool:
        if not axes:
            return False
        if isinstance(axes[0], list):
            return all(empty(a) for a in axes)
        return any(dg.kept_size(a, kept, memo) == 0 < dg.table.size[dg.table.find(a)] for a in axes)  # (not empty slices)

    nodes = list(dg.gm.graph.nodes)
    dead = {n.name for n in nodes if n.op in ("call_function", "get_attr") and empty(by_name.get(n.name))}
    empties = frozenset(dead)
    exits: dict[str, int | None] = {}
    for n in nodes:
        if n.name in dead or n.op != "call_function" or not any(a.name in dead for a in n.all_input_nodes):
            continue
        if str(n.target) in EXIT_BIAS_ARG and isinstance(n.meta.get("val"), torch.Tensor):
            exits[n.name] = EXIT_BIAS_ARG[str(n.target)]
        elif _is_assert(n) or not isinstance(n.meta.get("val"), (torch.Tensor, list, tuple)):
            dead.add(n.name)  # asserts and shape queries on removed values
        elif n.target is not operator.getitem:
            raise RewriteError(f"cannot remove a whole block: node {n.name} ({n.target}) reads it and is not a contraction")

    def bias_of(user: fx.Node) -> fx.Node | None:
        i = exits[user.name]
        return user.args[i] if i is not None and i < len(user.args) else None

    for n in reversed(nodes):
        if n.name in dead or n.name in exits or n.op in ("placeholder", "output") or _is_assert(n) or n.is_impure():
            continue
        users = [u for u in n.users if not _is_assert(u)]
        if users and all(u.name in dead or (u.name in exits and bias_of(u) is not n) for u in users):
            dead.add(n.name)
    dead -= _size_sources(nodes, exits, dead, empties)
    dead |= {n.name for n in nodes if _is_assert(n) and any(a.name in dead for a in n.all_input_nodes)}
    used = {dg.walk.aliases.get(n.target, n.target) for n in nodes if n.op == "get_attr" and n.name not in dead}
    dropped = {name for name in dg.params if name not in used}
    cache[removed] = result = BlockRemoval(exits, dead, dropped)
    return result


def _size_sources(nodes: list[fx.Node], exits: dict, dead: set[str], empties: frozenset[str]) -> set[str]:
    """Removed nodes to keep after all: those computing a data-dependent size of an exit's zeros (the tokens
    routed to one expert, ``u4``: JetMoE's MLP experts), which no input's size can give."""
    from_inputs = {str(s.node.expr) for n in nodes if n.op == "placeholder" and isinstance(v := n.meta.get("val"), torch.Tensor)
                   for s in v.shape if isinstance(s, torch.SymInt)}
    by_name = {n.name: n for n in nodes}
    keep: set[str] = set()
    for name in exits:
        for size in by_name[name].meta["val"].shape:
            for sym in (size.node.expr.free_symbols if isinstance(size, torch.SymInt) else ()):
                if str(sym) in from_inputs:
                    continue
                source = next((n for n in nodes if isinstance(v := n.meta.get("val"), torch.Tensor)
                               and any(isinstance(d, torch.SymInt) and d.node.expr == sym for d in v.shape)), None)
                stack = [source] if source is not None else []
                while stack:
                    n = stack.pop()
                    if n.name in keep or n.name not in dead:
                        continue
                    if n.name in empties:
                        raise RewriteError(f"cannot remove a whole block: the size {sym} of {name} is computed from the removed values")
                    keep.add(n.name)
                    stack.extend(n.all_input_nodes)
    return keep


def _sym_size(graph: fx.Graph, size, symbol) -> object:
    """An int, or a node computing a symbolic size; ``symbol(name)`` gives a node holding that symbol."""
    if isinstance(size, int):
        return size
    expr = size.node.expr if isinstance(size, torch.SymInt) else size

    def build(e):
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            found = symbol(str(e))
            if found is None:
                raise RewriteError(f"cannot express size {expr} from the model inputs")
            return found
        op = {sympy.Mul: operator.mul, sympy.Add: operator.add}.get(type(e))
        if op is None:
            raise RewriteError(f"cannot express size {expr} from the model inputs")
        args = [build(a) for a in e.args]
        out = args[0]
        for a in args[1:]:
            out = graph.call_function(op, (out, a))
        return out

    return build(expr)


def _size_source(graph: fx.Graph, before: fx.Node, dead: set[str]):
    """``symbol(name)`` for :func:`_sym_size`: the size of an input, or else of a value computed before
    ``before`` that stays (a data-dependent size, such as the tokens routed to one expert: ``u4``)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    made: dict[str, fx.Node] = {}

    def symbol(name: str):
        if name not in made:
            for n in graph.nodes:
                if order[n] >= order[before]:
                    break
                val = n.meta.get("val")
                if n.name in dead or not isinstance(val, torch.Tensor):
                    continue
                d = next((d for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and str(s.node.expr) == name), None)
                if d is not None:
                    made[name] = graph.call_function(aten.sym_size.int, (n, d))
                    break
        return made.get(name)

    return symbol


def remove_blocks(ctx: "RewriteContext", removal: BlockRemoval) -> None:
    """Apply a :class:`BlockRemoval` to ``ctx.gm`` (a copy of the dense graph)."""
    gm, graph = ctx.gm, ctx.gm.graph
    nodes = {n.name: n for n in graph.nodes}
    inputs = [n for n in graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    for name in removal.exits:
        node = nodes[name]
        val, bias = node.meta["val"], None
        if removal.exits[name] is not None and len(node.args) > removal.exits[name]:
            bias = node.args[removal.exits[name]]
        with graph.inserting_before(node):
            size = [_sym_size(graph, s, _size_source(graph, node, removal.dead)) for s in val.shape]
            ref = bias if isinstance(bias, fx.Node) else inputs[0]
            new = graph.call_function(aten.new_zeros.default, (ref, size), {"dtype": val.dtype})
            ctx.by_name[new.name] = ctx.by_name[name]  # its size constants follow other pruned axes
            if isinstance(bias, fx.Node):
                new = graph.call_function(aten.add.Tensor, (new, bias))
                ctx.by_name[new.name] = ctx.by_name[name]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if node.name in removal.dead:
            graph.erase_node(node)
    for target, canonical in ctx.dg.walk.aliases.items():
        if canonical in removal.dropped_params:
            *path, attr = target.split(".")
            owner = fetch_attr(gm, ".".join(path)) if path else gm
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)
    ctx.dropped = removal.dropped_params


def removed_leaves(dg: DependencyGraph, leaf_keep: dict[int, torch.Tensor]) -> frozenset[int]:
    return frozenset(dg.table.find(leaf) for leaf, m in leaf_keep.items() if not bool(m.any()))


def rewrite(dg: DependencyGraph, leaf_keep: dict[int, torch.Tensor], weights: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """A physically smaller copy of ``dg.gm`` keeping, for each group leaf, the masked units.

    ``weights`` (parameter name -> tensor of the same shape) replaces weights before slicing: how
    passes that also train (LoRAPrune's merged LoRA, PAT's merged HSMs) hand over their result.
    """
    gm = copy.deepcopy(dg.gm)
    set_weights(gm, dg, weights)
    ctx = RewriteContext(dg, leaf_keep, gm)
    if removed := removed_leaves(dg, leaf_keep):
        remove_blocks(ctx, block_removal(dg, removed))
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
    views_as_reshapes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


_ALIASING = {"view", "_unsafe_view", "reshape", "slice", "select", "narrow", "transpose", "t", "permute", "unsqueeze",
             "squeeze", "expand", "alias", "as_strided", "unflatten", "flatten", "split", "chunk", "unbind", "view_as_real",
             "view_as_complex", "diagonal", "unfold", "movedim", "swapaxes", "getitem"}


def _mutated_through(node: fx.Node) -> bool:
    """Whether an in-place op writes to ``node``'s value, directly or through a view of it."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            schema = getattr(user.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                return True
            name = getattr(user.target, "__name__", str(user.target)).split(".")[0]
            if name in _ALIASING:
                stack.append(user)
    return False


def views_as_reshapes(gm: fx.GraphModule) -> None:
    """``view`` → ``reshape`` where nothing writes through the view. Pruning can change the memory
    layout an op returns: JetMoE views attention's transposed output, contiguous when the SDPA kernel
    writes [batch, seq, heads, dim], which it no longer does once values and queries differ in head
    size. ``reshape`` is that view wherever the strides allow, and a copy elsewhere."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.view.default and not _mutated_through(node):
            node.target = torch.ops.aten.reshape.default


def graph_inputs(gm: fx.GraphModule, kwargs: dict, given: str = "the inputs", context: str = "graphprune") -> list:
    """The graph's placeholders' values for keyword inputs (nested ones flattened as torch.export did);
    a ``GraphpruneError`` saying what does not fit (``given``: what the inputs are, for the message)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        try:
            return fx_pytree.tree_flatten_spec(((), kwargs), spec)
        except Exception as exc:
            raise GraphpruneError(f"{context}: {given} do not fit the graph's inputs ({exc})") from exc
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n for n in names if n not in kwargs]
    if missing:
        raise GraphpruneError(f"{context}: the graph takes inputs {missing} that {given} do not give")
    return [kwargs[n] for n in names]


class _ShapeRun(fx.Interpreter):
    """Runs a graph on fake tensors, remembering the node it is at (for the error message)."""

    at: fx.Node | None = None

    def run_node(self, n):
        self.at = n
        return super().run_node(n)


def shape_failure(gm: fx.GraphModule, example_kwargs: dict | None) -> str | None:
    """Where ``gm`` fails to run on ``example_kwargs`` (shapes only, on fake tensors: no arithmetic),
    as ``"node (op): error"``; None when it runs, or when the inputs cannot be fed to it here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        flat = graph_inputs(gm, dict(example_kwargs or {}))
    except GraphpruneError:
        return None
    run = _ShapeRun(gm)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a failing op's traceback before raising
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            run.run(*flat)
    except Exception as exc:  # noqa: BLE001 - any failure is the message
        at = run.at
        where = f"{at.name} ({at.target})" if at is not None else "the graph"
        return f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        quiet.setLevel(level)
    return None


def check_runs(pruned: fx.GraphModule, dense: fx.GraphModule, example_kwargs: dict | None) -> None:
    """Refuse a pruned graph that cannot run where the dense one can: a group the analysis let through
    that some op cannot follow (a graphprune bug), caught here instead of at the caller's first call."""
    failure = shape_failure(pruned, example_kwargs)
    if failure is not None and shape_failure(dense, example_kwargs) is None:
        raise RewriteError(
            f"the pruned graph does not run ({failure}): the analysis let an op's input be pruned that the op "
            "cannot follow. This is a graphprune bug; please report it with the model. Until then, leave that part "
            "whole: ignore= the modules around that node, or prune fewer kinds=.")
