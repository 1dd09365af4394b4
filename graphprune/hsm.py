"""Hybrid Sparsification Modules (PAT): a graph pass over every write into the residual stream.

A *residual write* is found from the analysis, not from model classes: a node whose output
carries the ``hidden`` group's axis and that produces it from a weight —

* an ``aten.embedding`` whose table has the hidden axis on its columns (the token embedding), or
* an ``aten.linear`` whose weight has the hidden axis on its rows (attention output and MLP down
  projections; the other linears read the hidden axis on their columns).

``insert_hsms`` copies the graph (weights shared, frozen) and puts one HSM on each write's output:

    HSM(x) = σ ⊙ m ⊙ (x + L1 L0 x),    L0: d→r (rows orthonormal at init), L1: r→d (zero at init),

with ``σ`` a per-HSM vector (init 1) and ``m`` ONE mask shared by every HSM (a buffer the caller
sets, soft or binary). Every write into the stream is masked, so masked channels are zero in the
residual stream everywhere. A write whose weight is also read elsewhere (a tied embedding that is
also the LM head) gets a *mask-only* site ``x ⊙ m``: folding an operator into a shared weight
would change its other reader, while a binary mask only zeroes columns the rewrite removes anyway.

``merged_weights`` folds the HSMs into the writers' weights: with ``M = I + L1 L0`` and
``g = σ ⊙ m``, a linear becomes ``W' = diag(g) M W`` (bias ``b' = g ⊙ M b``) and the embedding
``E' = E Mᵀ diag(g)``; readers of the stream are unchanged (the rewrite column-slices them). With a
binary ``m`` the dense graph with the merged weights computes what the HSM graph computes.

The HSM sits on the projection's output, so with "sandwich" norms (Gemma2: o_proj → norm → add)
it comes before the post-norm; pruned channels are still zero in the stream, and the merge stays
exact because the merged weights feed the same norm.

Only models whose normalisations of the stream are RMS-style are supported (:func:`check_supported`):
LayerNorm subtracts the mean and adds a bias, so masked channels become non-zero after the norm
and removing them would change the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .analysis.walk import fetch_attr
from .errors import GraphpruneError
from .lora import frozen_copy

aten = torch.ops.aten
MASK_BUFFER = "_pat_mask"
_LAYER_NORMS = (aten.layer_norm.default, aten.native_layer_norm.default)


@dataclass
class Writer:
    """One write into the residual stream."""

    node: str  # the embedding / linear node's name in the analysed graph
    kind: str  # "embedding" or "linear"
    weight: str
    bias: str | None = None


@dataclass
class HsmSite:
    writer: Writer
    operator: bool  # False: mask-only (the weight has other readers)
    l0: str | None = None  # attribute names in HsmGraph.module
    l1: str | None = None
    sigma: str | None = None


@dataclass
class HsmGraph:
    """A GraphModule with HSMs on every residual write, and where they are."""

    module: fx.GraphModule
    sites: list[HsmSite]
    hidden: int
    rank: int

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def set_mask(self, mask: torch.Tensor) -> None:
        """The shared mask every HSM multiplies by (may carry autograd history: soft masks)."""
        setattr(self.module, MASK_BUFFER, mask)

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, MASK_BUFFER)

    @property
    def operator_sites(self) -> list[HsmSite]:
        return [s for s in self.sites if s.operator]

    def l0s(self) -> list[torch.Tensor]:
        return [fetch_attr(self.module, s.l0) for s in self.operator_sites]

    def hsm_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable HSM tensors: every L0, L1 and σ."""
        return [fetch_attr(self.module, n) for s in self.operator_sites for n in (s.l0, s.l1, s.sigma)]


def _param_name(dg, arg) -> str | None:
    """The canonical parameter name a ``get_attr`` argument reads (tied weights have one name)."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    return dg.walk.aliases.get(arg.target, arg.target)


def hidden_group(dg):
    found = [g for g in dg.groups if g.kind == "hidden"]
    if not found:
        raise GraphpruneError("PAT prunes the hidden size, but the analysis found no 'hidden' group in this model")
    if len(found) > 1:
        raise GraphpruneError(f"PAT needs one residual stream; the analysis found {len(found)} hidden groups")
    return found[0]


def residual_writers(dg, group=None) -> list[Writer]:
    """The nodes writing into the residual stream of ``group`` (default: the hidden group)."""
    group = group or hidden_group(dg)
    member_dims = {(m.param, m.dim) for m in group.members}
    out = []
    for node in dg.gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.embedding.default:
            w = _param_name(dg, node.args[0])
            if (w, 1) in member_dims:
                out.append(Writer(node.name, "embedding", w))
        elif node.target == aten.linear.default:
            w = _param_name(dg, node.args[1])
            if (w, 0) in member_dims:
                bias = _param_name(dg, node.args[2]) if len(node.args) > 2 else None
                out.append(Writer(node.name, "linear", w, bias))
    if not out:
        raise GraphpruneError("PAT found no write into the residual stream (no embedding or linear producing the hidden axis)")
    return out


def check_supported(dg, group=None) -> None:
    """Raise when masking the residual writes would not equal removing the channels."""
    group = group or hidden_group(dg)
    for node in dg.gm.graph.nodes:
        if node.op == "call_function" and node.target in _LAYER_NORMS:
            raise GraphpruneError(
                f"PAT does not support LayerNorm models (node {node.name!r}): LayerNorm subtracts the mean and adds "
                "a bias, so channels masked at the residual writes are non-zero after the norm and removing them would "
                "change the model. PAT supports RMSNorm models (Llama family)."
            )
    residual_writers(dg, group)


def merge_error(dg, hsm: HsmGraph, keep: torch.Tensor, weights: dict[str, torch.Tensor], inputs: dict) -> float:
    """How far the masked dense graph with the merged ``weights`` (what the rewrite reproduces) is
    from the HSM graph under the binary mask ``keep``, relative to the largest output magnitude.

    Non-zero when some write into the stream was not found (e.g. an op other than embedding or
    linear produces it), since that write's pruned channels were never masked during training.
    """
    from .masking import insert_masks

    group = hidden_group(dg)
    masked = insert_masks(dg, [group], weights=weights)
    masked.set_keep({group.name: keep.nonzero().flatten()})
    old = hsm.mask
    hsm.set_mask(keep.to(device=old.device, dtype=torch.float32))
    try:
        with torch.no_grad():
            a = [t for t in torch.utils._pytree.tree_leaves(hsm(**inputs)) if isinstance(t, torch.Tensor)]
            b = [t for t in torch.utils._pytree.tree_leaves(masked(**inputs)) if isinstance(t, torch.Tensor)]
    finally:
        hsm.set_mask(old)
    worst = 0.0
    for x, y in zip(a, b):
        if x.is_floating_point():
            scale = float(x.abs().max()) or 1.0
            worst = max(worst, float((x.float() - y.float()).abs().max()) / scale)
    return worst


def default_rank(hidden: int) -> int:
    """The paper's r = 200 at d = 4096, scaled to ``hidden`` (at least 1)."""
    return max(1, round(hidden * 200 / 4096))


def insert_hsms(dg, rank: int | None = None, seed: int = 0, gm: fx.GraphModule | None = None) -> HsmGraph:
    """Copy ``gm`` (default ``dg.gm``; its weights are shared and frozen) and add an HSM on every
    residual write of ``dg``'s hidden group. Node names of ``gm`` must match ``dg.gm``'s."""
    group = hidden_group(dg)
    writers = residual_writers(dg, group)
    d = group.size
    r = default_rank(d) if rank is None else int(rank)
    if not 1 <= r <= d:
        raise GraphpruneError(f"PAT: the HSM rank must be in [1, {d}] (the hidden size), got {rank!r}")
    out = frozen_copy(gm if gm is not None else dg.gm)
    graph = out.graph
    nodes = {n.name: n for n in graph.nodes}
    readers: dict[str, int] = {}  # canonical parameter name -> nodes reading it
    for n in graph.nodes:
        if n.op == "get_attr":
            name = _param_name(dg, n)
            readers[name] = readers.get(name, 0) + len(n.users)
    some = fetch_attr(out, writers[0].weight)
    out.register_buffer(MASK_BUFFER, torch.ones(d, dtype=torch.float32, device=some.device))
    gen = torch.Generator().manual_seed(seed)
    sites = []
    for i, w in enumerate(writers):
        node = nodes.get(w.node)
        if node is None:
            raise GraphpruneError(f"insert_hsms: node {w.node!r} is not in the graph to modify")
        shared = readers.get(w.weight, 0) > 1 or (w.bias is not None and readers.get(w.bias, 0) > 1)
        site = HsmSite(w, operator=not shared)
        if site.operator:
            site.l0, site.l1, site.sigma = f"_pat_l0_{i}", f"_pat_l1_{i}", f"_pat_sigma_{i}"
            q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))
            _param(out, site.l0, q.T.contiguous(), some)
            _param(out, site.l1, torch.zeros(d, r), some)
            _param(out, site.sigma, torch.ones(d), some)
        _wire(graph, node, site)
        sites.append(site)
    graph.lint()
    out.recompile()
    return HsmGraph(out, sites, d, r)


def _param(gm: fx.GraphModule, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    dtype = like.dtype if like.is_floating_point() else torch.float32
    gm.register_parameter(name, torch.nn.Parameter(value.to(dtype=dtype, device=like.device)))


def _wire(graph: fx.Graph, node: fx.Node, site: HsmSite) -> None:
    """Insert ``site``'s HSM on ``node``'s output and make every other reader use it."""
    mine: set[fx.Node] = set()

    def emit(op, *args):
        new = graph.get_attr(args[0]) if op == "get_attr" else graph.call_function(op, args)
        mine.add(new)
        return new

    with graph.inserting_before(node.next):  # in order, right after the write
        mask = emit("get_attr", MASK_BUFFER)
        if site.operator:
            l0, l1, sigma = (emit("get_attr", n) for n in (site.l0, site.l1, site.sigma))
            low = emit(aten.linear.default, node, l0)
            up = emit(aten.linear.default, low, l1)
            mixed = emit(aten.add.Tensor, node, up)
            gate = emit(aten.mul.Tensor, sigma, mask)
            result = emit(aten.mul.Tensor, mixed, emit(aten.type_as.default, gate, mixed))
        else:
            result = emit(aten.mul.Tensor, node, emit(aten.type_as.default, mask, node))
    node.replace_all_uses_with(result, delete_user_cb=lambda u: u not in mine)


def identity_loss(l0s) -> torch.Tensor:
    """PAT's identity loss summed over HSMs: Σ MSE(L0 L0ᵀ, I_r) (zero iff every L0 has orthonormal rows)."""
    total = None
    for l0 in l0s:
        gram = l0.float() @ l0.float().T
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        term = (gram - eye).square().mean()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def merged_weights(hsm: HsmGraph, mask: torch.Tensor, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{weight name: folded value}`` for every writer's weight and bias (see the module docstring).

    ``base`` gives weights to start from instead of the graph's (e.g. merged LoRA weights).
    """
    base = base or {}
    out = {}
    with torch.no_grad():
        m = mask.detach().double().cpu()
        for s in hsm.sites:
            w = s.writer

            def value(name):
                t = base[name] if name in base else fetch_attr(hsm.module, name)
                return t.detach(), t.detach().double().cpu()

            if s.operator:
                l0 = fetch_attr(hsm.module, s.l0).detach().double().cpu()
                l1 = fetch_attr(hsm.module, s.l1).detach().double().cpu()
                g = fetch_attr(hsm.module, s.sigma).detach().double().cpu() * m
                mix = torch.eye(hsm.hidden, dtype=torch.float64) + l1 @ l0
            else:
                g, mix = m, None
            orig, wt = value(w.weight)
            if w.kind == "embedding":
                new = (wt @ mix.T if mix is not None else wt) * g[None, :]
            else:
                new = g[:, None] * (mix @ wt if mix is not None else wt)
            out[w.weight] = new.to(dtype=orig.dtype, device=orig.device)
            if w.bias is not None:
                orig, bt = value(w.bias)
                new = g * (mix @ bt if mix is not None else bt)
                out[w.bias] = new.to(dtype=orig.dtype, device=orig.device)
    return out


__all__ = [
    "HsmGraph", "HsmSite", "Writer", "MASK_BUFFER", "check_supported", "default_rank", "hidden_group",
    "identity_loss", "insert_hsms", "merge_error", "merged_weights", "residual_writers",
]
