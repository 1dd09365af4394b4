"""Inline the ``torch.no_grad()`` / ``torch.enable_grad()`` blocks of a traced graph.

torch.export turns a grad-mode block inside ``forward`` (PhiMoE's router runs its sparse mixer
under ``torch.no_grad()``) into one higher-order op, ``wrap_with_set_grad_enabled(mode, submodule,
*inputs)``, whose body is a graph of its own. The analysis walks one graph, and an op it cannot see
into freezes every channel it touches. So the body's nodes are copied into the enclosing graph in
its place; for a ``no_grad`` block, its outputs are detached, which is what the block did to
autograd (nothing computed inside it gets a gradient). The forward computation is unchanged.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

GRAD_BLOCK = "wrap_with_set_grad_enabled"


def _is_grad_block(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) == GRAD_BLOCK


def inline_grad_blocks(gm: fx.GraphModule) -> fx.GraphModule:
    """Inline every grad-mode block of ``gm`` (nested ones too) in place; returns ``gm``."""
    while blocks := [n for n in gm.graph.nodes if _is_grad_block(n)]:
        for node in blocks:
            _inline(gm, node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _inline(gm: fx.GraphModule, node: fx.Node) -> None:
    enabled, body_attr, *operands = node.args
    body: fx.GraphModule = getattr(gm, body_attr.target)
    env: dict[fx.Node, object] = {}
    inputs = iter(operands)
    results = None
    with gm.graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(inputs)
            elif inner.op == "get_attr":  # a tensor the body holds itself: moved onto the outer module
                name = _free_name(gm, f"{body_attr.target}_{inner.target}".replace(".", "_"))
                setattr(gm, name, getattr(body, inner.target))
                env[inner] = gm.graph.get_attr(name)
                env[inner].meta = dict(inner.meta)
            elif inner.op == "output":
                results = [_detached(gm.graph, env[v]) if not enabled and isinstance(v, fx.Node) else
                           (env[v] if isinstance(v, fx.Node) else v) for v in inner.args[0]]
            else:
                env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(results[user.args[1]])
            gm.graph.erase_node(user)
    if node.users:
        raise RuntimeError(f"{node.name}: a grad-mode block whose result is used whole")
    gm.graph.erase_node(node)
    if not any(n.op == "get_attr" and n.target == body_attr.target for n in gm.graph.nodes if n is not body_attr):
        if not body_attr.users:
            gm.graph.erase_node(body_attr)
            delattr(gm, body_attr.target)


def _detached(graph: fx.Graph, value: fx.Node) -> fx.Node:
    val = value.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return value  # indices and masks carry no gradient anyway
    out = graph.call_function(torch.ops.aten.detach.default, (value,))
    out.meta = dict(value.meta)
    return out


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
