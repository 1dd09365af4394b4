"""A graph pass that gives weights of a traced GraphModule low-rank (LoRA) adapters.

``add_lora(gm)`` returns a :class:`LoraGraph`: a copy of ``gm`` in which each targeted weight
``W0`` acts as ``W0 + s·B·A`` (``s = alpha / r``). Only ``A`` and ``B`` are trainable; the base
weights are detached, frozen tensors that *share storage* with ``gm``'s (no copy, and the
caller's tensors keep their own ``requires_grad``). No gradient of a base weight is ever formed.

Adapters are defined in the weight's own layout: for a weight of shape ``[*batch, d0, d1]``,
``A`` is ``[*batch, r, d1]`` and ``B`` is ``[*batch, d0, r]``, so ``B @ A`` has the weight's
shape whatever op consumes it. Two forms are emitted:

* **branch** (``aten.linear`` consuming the weight, the usual LoRA):
  ``linear(x, W0, b) + s · linear(linear(x, A), B)`` — no weight-sized tensor is created;
* **merged** (any other consumer: GPT-2's ``addmm`` Conv1D, Falcon's ``x @ W.T``, stacked MoE
  experts gathered by ``index``): the consumer reads ``W0 + s · (B @ A)`` computed in the graph.

Initialisation follows peft: ``A`` Kaiming-uniform (seeded), ``B`` zero, so a fresh LoraGraph
computes exactly what ``gm`` computes. ``merged_weights`` gives ``W0 + s·B·A`` for folding the
adapters back into the weights (e.g. with ``ScoringContext.update_weight`` or
``rewrite(..., weights=...)``). Reused by LoRAPrune and by LoRA recovery fine-tuning.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from .analysis.groups import as_names, block_of
from .analysis.walk import fetch_attr
from .errors import GraphpruneError

aten = torch.ops.aten


@dataclass
class LoraGraph:
    """A GraphModule with LoRA adapters, and where they are."""

    module: fx.GraphModule
    adapters: dict[str, tuple[str, str]]  # weight name -> (A name, B name), all attributes of ``module``
    scale: float  # s = alpha / r
    r: int
    alpha: float

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors: every ``A`` and ``B`` (in adapter order)."""
        return [fetch_attr(self.module, n) for pair in self.adapters.values() for n in pair]

    def factors(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.adapters[weight]
        return fetch_attr(self.module, a), fetch_attr(self.module, b)

    def base(self, weight: str) -> torch.Tensor:
        return fetch_attr(self.module, weight)


def frozen_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (graph and modules) whose parameters share storage with ``gm``'s but are
    new, detached ``requires_grad=False`` tensors; buffers are shared as they are."""
    memo = {}
    for _, p in gm.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=False)
    for _, b in gm.named_buffers(remove_duplicate=False):
        memo[id(b)] = b
    with warnings.catch_warnings():  # torch's own deprecation notice from copying the input spec
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm, memo)


def _matmul_like(node: fx.Node, weight: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (aten.linear.default,) and len(node.args) > 1 and node.args[1] is weight


def default_targets(gm: fx.GraphModule) -> list[str]:
    """Weights (2-D or more) inside transformer blocks; every such weight when there are no blocks."""
    weights = [n for n, p in gm.named_parameters() if p.dim() >= 2 and p.is_floating_point() and "lora_" not in n]
    inside = [n for n in weights if block_of(n)]
    return inside or weights


def matches(name: str, pattern: str) -> bool:
    """``pattern`` is ``name``, a dotted suffix of it (peft's rule: ``"q_proj"``) or an fnmatch pattern."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatch(name, pattern)


def unmatched_targets(names: list[str], patterns: list[str], what: str, shown: list[str] | None = None) -> str | None:
    """An error message when a pattern matches none of ``names`` (a typo must not be ignored silently),
    naming what exists (the last parts of ``shown``, default ``names``); else None."""
    missing = [pat for pat in patterns if not any(matches(n, pat) for n in names)]
    if not missing:
        return None
    shown = names if shown is None else shown
    leaves = sorted({n.rsplit(".", 1)[-1] for n in shown})
    example = next((n for n in shown if block_of(n + ".x")), shown[0] if shown else None)
    return f"targets {missing} match no {what}; they are named like {leaves[:12]}" + (f" (in full, e.g. {example!r})" if example else "")


def _select(gm: fx.GraphModule, targets) -> list[str]:
    if targets is None:
        return default_targets(gm)
    names = [n for n, p in gm.named_parameters() if p.dim() >= 2]
    patterns = list(as_names(targets))
    owners = [n.rsplit(".", 1)[0] for n in names]  # a pattern names the weight or its module
    problem = unmatched_targets(owners + names, patterns, "weight of at least 2 dimensions", shown=owners)
    if problem:
        raise GraphpruneError(f"add_lora: {problem}")
    return [n for n, owner in zip(names, owners) if any(matches(n, pat) or matches(owner, pat) for pat in patterns)]


def _adapter_names(weight: str) -> tuple[str, str]:
    owner, _, leaf = weight.rpartition(".")
    stem = f"{owner}." if owner else ""
    tag = "" if leaf == "weight" else f"{leaf}_"
    return f"{stem}{tag}lora_A", f"{stem}{tag}lora_B"


def _register(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if hasattr(module, leaf):
        raise GraphpruneError(f"add_lora: {name!r} already exists (adapters added twice?)")
    module.register_parameter(leaf, torch.nn.Parameter(value))


def add_lora(gm: fx.GraphModule, targets=None, r: int = 8, alpha: float = 16, seed: int = 0) -> LoraGraph:
    """Copy ``gm`` and give each targeted weight a LoRA adapter (see the module docstring).

    ``targets``: parameter-name patterns (fnmatch, on the full name or its module path, e.g.
    ``"*.q_proj"``); default: every weight of two or more dimensions inside transformer blocks.
    ``gm`` is not modified; its parameters' storage is shared, never written.
    """
    if not isinstance(r, int) or r < 1:
        raise GraphpruneError(f"add_lora: the rank r must be a positive integer, got {r!r}")
    out = frozen_copy(gm)
    graph = out.graph
    names = _select(out, targets)
    scale = float(alpha) / r
    gen = torch.Generator().manual_seed(seed)
    getters: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in names:
            getters.setdefault(node.target, []).append(node)
    adapters: dict[str, tuple[str, str]] = {}
    for name in names:
        if name not in getters:
            continue  # a parameter the graph never reads
        w = fetch_attr(out, name)
        *batch, d0, d1 = w.shape
        bound = 1.0 / math.sqrt(d1)  # kaiming_uniform(a=sqrt(5)), as nn.Linear and peft initialise A
        a = (torch.rand((*batch, r, d1), generator=gen, dtype=torch.float64) * 2 - 1) * bound
        a_name, b_name = _adapter_names(name)
        _register(out, a_name, a.to(dtype=w.dtype, device=w.device))
        _register(out, b_name, torch.zeros((*batch, d0, r), dtype=w.dtype, device=w.device))
        adapters[name] = (a_name, b_name)
        for getter in getters[name]:
            _rewire(graph, getter, a_name, b_name, scale)
    graph.lint()
    out.recompile()
    return LoraGraph(out, adapters, scale, r, float(alpha))


def _rewire(graph: fx.Graph, getter: fx.Node, a_name: str, b_name: str, scale: float) -> None:
    """Make every reader of ``getter`` (a base weight) see ``W0 + s·B·A``."""
    merged = None
    for user in list(getter.users):
        if _matmul_like(user, getter):  # branch form: y + s · (x Aᵀ) Bᵀ
            with graph.inserting_before(user.next):  # in order, right after the linear
                a = graph.get_attr(a_name)
                b = graph.get_attr(b_name)
                low = graph.call_function(aten.linear.default, (user.args[0], a))
                up = graph.call_function(aten.linear.default, (low, b))
                scaled = graph.call_function(aten.mul.Tensor, (up, scale))
                total = graph.call_function(aten.add.Tensor, (user, scaled))
            mine = {a, b, low, up, scaled, total}
            user.replace_all_uses_with(total, delete_user_cb=lambda u, mine=mine: u not in mine)
            continue
        if merged is None:  # merged form, built once per getter: W0 + s · (B @ A)
            with graph.inserting_before(getter.next):
                a = graph.get_attr(a_name)
                b = graph.get_attr(b_name)
                prod = graph.call_function(aten.matmul.default, (b, a))
                scaled = graph.call_function(aten.mul.Tensor, (prod, scale))
                merged = graph.call_function(aten.add.Tensor, (getter, scaled))
        user.replace_input_with(getter, merged)


def merged_weight(lora: LoraGraph, name: str) -> torch.Tensor:
    """``W0 + s·B·A`` for the adapted weight ``name`` (detached, in the weight's dtype)."""
    with torch.no_grad():
        a, b = lora.factors(name)
        base = lora.base(name)
        return (base.float() + lora.scale * torch.matmul(b.float(), a.float())).to(base.dtype)


def merged_weights(lora: LoraGraph) -> dict[str, torch.Tensor]:
    """``{weight name: W0 + s·B·A}`` for every adapted weight."""
    return {name: merged_weight(lora, name) for name in lora.adapters}
