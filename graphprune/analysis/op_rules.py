"""The op-rule table: for each ATen op, how channels flow through it and how to shrink it.

Each entry is an :class:`OpRule` with two small functions:

* ``propagate(walk, node)`` gives the axes of the node's output(s) and declares which input axes
  are equal, refined (split into heads, concatenated parts) or frozen;
* ``rewrite(ctx, node)`` (optional) updates the node in the pruned graph: size constants in its
  arguments, slice bounds, a reduction's divisor.

Two flags say what an op does with integer tensors holding indices along an axis (the choices of a
mixture-of-experts router): ``keeps_values`` ops only move such values (view, transpose, ...), and
``reads_values`` ops use them as indices themselves (advanced indexing). Any other op that meets
them freezes the axis they index.

Adding support for an op is adding a row (:func:`register_op_rule`). An op with no row freezes
every channel it touches, and the analysis report names it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from .axes import CAT, PROD
from .walk import Walk, is_tensor_node, tensor_meta

aten = torch.ops.aten


@dataclass(frozen=True)
class OpRule:
    propagate: Callable[[Walk, fx.Node], object]
    rewrite: Callable[[object, fx.Node], None] | None = None
    keeps_values: bool = False  # index values in its first input come out unchanged (only moved)
    reads_values: bool = False  # its propagate handles index values itself (Walk.pick)
    joins_values: bool = False  # index values of one axis in all its inputs come out together (cat)


RULES: dict[str, OpRule] = {}


def register_op_rule(names: str | list[str], propagate, rewrite=None, *, keeps_values: bool = False,
                     reads_values: bool = False, joins_values: bool = False) -> OpRule:
    """Register a rule for ops named like ``"aten.add"`` (every overload) or ``"aten.add.Tensor"``."""
    rule = OpRule(propagate, rewrite, keeps_values, reads_values, joins_values)
    for name in [names] if isinstance(names, str) else names:
        RULES[name] = rule
    return rule


def rule_for(target) -> OpRule | None:
    rule = RULES.get(str(target))
    if rule is None and hasattr(target, "overloadpacket"):
        rule = RULES.get(str(target.overloadpacket))
    return rule


def arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _ndim(node: fx.Node) -> int:
    return tensor_meta(node).dim()


# =============================================================== propagation rules
def ignore(w: Walk, node: fx.Node):
    """Asserts and shape queries: no tensor comes out."""
    return None


def identity(w: Walk, node: fx.Node):
    return w.of(node.args[0])


def elementwise(w: Walk, node: fx.Node):
    """Broadcasting ops: equal-sized dimensions aligned from the right are the same channels."""
    oshape = w.shape(node)
    inputs = [a for a in _tensor_args(node)]
    same = next((a for a in inputs if w.shape(a) == oshape), None)
    out = list(w.of(same)) if same is not None else w.fresh(node)
    for a in inputs:
        ax, sh = w.of(a), w.shape(a)
        for i in range(1, min(len(ax), len(out)) + 1):
            if sh[-i] == oshape[-i] and sh[-i] != 1:
                w.union(out[-i], ax[-i], node)
    return out


def _tensor_args(node: fx.Node):
    for a in list(node.args) + list(node.kwargs.values()):
        if is_tensor_node(a):
            yield a


def linear(w: Walk, node: fx.Node):
    x, weight = w.of(node.args[0]), w.of(node.args[1])
    bias = arg(node, 2, "bias")
    w.union(x[-1], weight[1], node)
    if is_tensor_node(bias):
        w.union(w.of(bias)[0], weight[0], node)
    return list(x[:-1]) + [weight[0]]


def mm(w: Walk, node: fx.Node):
    a, b = w.of(node.args[0]), w.of(node.args[1])
    w.union(a[1], b[0], node)
    return [a[0], b[1]]


def addmm(w: Walk, node: fx.Node):
    """``bias + m1 @ m2`` — GPT-2's Conv1D is an addmm with the weight stored as (in, out)."""
    bias, m1, m2 = node.args[:3]
    out = mm_like(w, node, m1, m2)
    _broadcast_into(w, node, bias, out)
    return out


def mm_like(w: Walk, node: fx.Node, left: fx.Node, right: fx.Node):
    """matmul semantics: broadcast batch dims, contract left[-1] with right[-2]."""
    a, b = w.of(left), w.of(right)
    if len(a) < 2 or len(b) < 2:
        w.freeze(list(a) + list(b), node, "vector matmul")
        return w.fresh(node)
    w.union(a[-1], b[-2], node)
    out = w.fresh(node)
    for src in (a, b):
        sh = w.shape(left if src is a else right)
        for i in range(3, len(src) + 1):
            if i <= len(out) and sh[-i] == w.shape(node)[-i] and sh[-i] != 1:
                w.union(out[-i], src[-i], node)
    w.union(out[-2], a[-2], node)
    w.union(out[-1], b[-1], node)
    if len(out) >= 4:  # batched matmul over (batch, heads): attention written out as q@k^T, p@v
        for i in range(3, len(out)):
            if w.is_static(node, -i) and w.shape(node)[-i] > 1:
                w.table.tag(out[-i], "heads")
        contracted = w.is_static(left, -1)
        w.table.tag(a[-1] if contracted else out[-1], "head_dim")
    return out


def matmul(w: Walk, node: fx.Node):
    return mm_like(w, node, node.args[0], node.args[1])


def baddbmm(w: Walk, node: fx.Node):
    out = mm_like(w, node, node.args[1], node.args[2])
    _broadcast_into(w, node, node.args[0], out)
    return out


def _broadcast_into(w: Walk, node: fx.Node, src: fx.Node, out: list[int]) -> None:
    if not is_tensor_node(src):
        return
    ax, sh, osh = w.of(src), w.shape(src), w.shape(node)
    for i in range(1, min(len(ax), len(out)) + 1):
        if sh[-i] == osh[-i] and sh[-i] != 1:
            w.union(out[-i], ax[-i], node)


def embedding(w: Walk, node: fx.Node):
    weight, idx = w.of(node.args[0]), w.of(node.args[1])
    w.freeze([weight[0]], node, "embedding rows are indexed by token ids")
    w.table.tag(weight[1], "embedding")
    return list(idx) + [weight[1]]


def reshape(w: Walk, node: fx.Node):
    """view/reshape/(un)squeeze/flatten: match runs of equal products, then split or merge."""
    src = node.args[0]
    ia, ish, osh = w.of(src), w.shape(src), w.shape(node)
    out: list[int | None] = [None] * len(osh)
    ins = [d for d, n in enumerate(ish) if n != 1]
    outs = [d for d, n in enumerate(osh) if n != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        run_in, run_out = [ins[i]], [outs[j]]
        pi, po = ish[ins[i]], osh[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po and i < len(ins):
                pi *= ish[ins[i]]
                run_in.append(ins[i])
                i += 1
            elif po < pi and j < len(outs):
                po *= osh[outs[j]]
                run_out.append(outs[j])
                j += 1
            else:
                break
        if pi != po:
            w.freeze(ia, node, "reshape with unmatched sizes")
            break
        merged = w.table.compose(PROD, [ia[k] for k in run_in], str(node.target))
        parts = w.table.refine(merged, PROD, [osh[k] for k in run_out], str(node.target))
        if parts is None:
            w.freeze([merged], node, "reshape incompatible with known structure")
            continue
        for k, p in zip(run_out, parts):
            out[k] = p
    fresh = w.fresh(node)
    # an output dim left unmatched (its input run was frozen above) is carved from frozen input: frozen too
    w.freeze([fresh[k] for k, a in enumerate(out) if a is None and osh[k] != 1], node, "reshape across a frozen structure")
    return [fresh[k] if a is None else a for k, a in enumerate(out)]


def expand(w: Walk, node: fx.Node):
    src = node.args[0]
    ia, ish, osh = w.of(src), w.shape(src), w.shape(node)
    fresh = w.fresh(node)
    out = list(fresh)
    for i in range(1, len(ia) + 1):
        if ish[-i] == osh[-i]:
            out[-i] = ia[-i]
        else:
            w.table.tag(fresh[-i], "broadcast")
    return out


def transpose(w: Walk, node: fx.Node):
    ax = list(w.of(node.args[0]))
    if len(ax) < 2:
        return ax
    d0, d1 = (arg(node, 1, "dim0", 0) % len(ax), arg(node, 2, "dim1", 1) % len(ax)) if len(node.args) > 1 else (0, 1)
    ax[d0], ax[d1] = ax[d1], ax[d0]
    return ax


def numpy_t(w: Walk, node: fx.Node):
    return list(reversed(w.of(node.args[0])))


def permute(w: Walk, node: fx.Node):
    ax = w.of(node.args[0])
    return [ax[d % len(ax)] for d in node.args[1]]


def _norm_index(i, n):
    if i is None:
        return None
    return max(0, min(n, i + n if i < 0 else i))


def slice_(w: Walk, node: fx.Node):
    src = node.args[0]
    ax, sh = list(w.of(src)), w.shape(src)
    d = arg(node, 1, "dim", 0) % len(ax)
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    out = list(ax)
    if not w.is_static(src, d) or any(isinstance(v, fx.Node) for v in (start, end, step)):
        full = start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1
        if not full:
            out[d] = w.fresh(node)[d]
            w.freeze([ax[d], out[d]], node, "slice with dynamic bounds")
        return out
    n = sh[d]
    s, e = _norm_index(start, n) or 0, n if end is None else _norm_index(end, n)
    if step != 1:
        out[d] = w.fresh(node)[d]
        w.freeze([ax[d], out[d]], node, "strided slice")
    elif e <= s:  # empty slice: nothing flows through
        out[d] = w.fresh(node)[d]
    elif (s, e) != (0, n):
        sizes = [x for x in (s, e - s, n - e) if x > 0]
        parts = w.table.refine(ax[d], CAT, sizes, str(node.target))
        out[d] = parts[1 if s > 0 else 0] if parts else w.fresh(node)[d]
        if parts is None:
            w.freeze([out[d]], node, "slice incompatible with known structure")
    return out


def narrow(w: Walk, node: fx.Node):
    src, dim, start, length = node.args[:4]
    if isinstance(start, int) and isinstance(length, int):
        n = w.shape(src)[dim % _ndim(src)]
        start = _norm_index(start, n)
        fake = fx.Node(node.graph, node.name, "call_function", aten.slice.Tensor, (src, dim, start, start + length), {})
        fake.meta = node.meta
        return slice_(w, fake)
    out = list(w.of(src))
    dim %= len(out)
    fresh = w.fresh(node)[dim]
    w.freeze([out[dim], fresh], node, "narrow with dynamic bounds")
    out[dim] = fresh
    return out


def select(w: Walk, node: fx.Node):
    ax = list(w.of(node.args[0]))
    d = node.args[1] % len(ax)
    w.freeze([ax[d]], node, "select picks a single index")
    return ax[:d] + ax[d + 1 :]


def cat(w: Walk, node: fx.Node):
    # (legacy cat accepts empty 1-d tensors of any length: they take no part)
    tensors = [t for t in node.args[0] if is_tensor_node(t) and not (tensor_meta(t).dim() == 1 and tensor_meta(t).shape[0] == 0)]
    out = w.fresh(node)
    d = arg(node, 1, "dim", 0) % len(out)
    for t in tensors:
        for k, a in enumerate(w.of(t)):
            if k != d:
                w.union(out[k], a, node)
    if all(w.is_static(t, d) for t in tensors):
        joined = w.table.compose(CAT, [w.of(t)[d] for t in tensors if w.shape(t)[d] > 0], str(node.target))
        w.union(out[d], joined, node)
    else:
        w.freeze([w.of(t)[d] for t in tensors], node, "concatenation along a dynamic dimension")
    return out


def stack(w: Walk, node: fx.Node):
    out = w.fresh(node)
    d = arg(node, 1, "dim", 0) % len(out)
    rest = out[:d] + out[d + 1 :]
    for t in node.args[0]:
        for a, b in zip(w.of(t), rest):
            w.union(a, b, node)
    w.freeze([out[d]], node, "stack index")
    return out


def split(w: Walk, node: fx.Node):
    """split / split_with_sizes / chunk: the input axis becomes a concatenation of the pieces."""
    src = node.args[0]
    ax = list(w.of(src))
    d = arg(node, 2, "dim", 0) % len(ax)
    pieces = [v for v in node.meta["val"]]
    outs = [w.fresh(node, v) for v in pieces]
    for o in outs:  # every other dim passes through
        for k in range(len(ax)):
            if k != d:
                w.union(o[k], ax[k], node)
    if not w.is_static(src, d):
        w.freeze([ax[d], *(o[d] for o in outs)], node, "split along a dynamic dimension")
        return outs
    sizes = [int(v.shape[d]) for v in pieces]
    parts = w.table.refine(ax[d], CAT, [s for s in sizes if s > 0], str(node.target))
    if parts is None:  # the pieces cannot be tied to the input's units: none of them can be pruned
        w.freeze([ax[d], *(o[d] for o in outs)], node, "split incompatible with known structure")
        return outs
    parts_iter = iter(parts)
    for o, s in zip(outs, sizes):
        if s > 0:
            w.union(o[d], next(parts_iter), node)
    return outs


def unbind(w: Walk, node: fx.Node):
    ax = list(w.of(node.args[0]))
    d = arg(node, 1, "dim", 0) % len(ax)
    w.freeze([ax[d]], node, "unbind picks single indices")
    return [ax[:d] + ax[d + 1 :] for _ in node.meta["val"]]


def sdpa(w: Walk, node: fx.Node):
    """Attention: q/k/v heads coupled (GQA: each KV head with its group of query heads)."""
    q, k, v = (w.of(a) for a in node.args[:3])
    qs, ks = w.shape(node.args[0]), w.shape(node.args[1])
    w.union(q[-1], k[-1], node)
    w.union(k[-2], v[-2], node)
    w.union(k[-3], v[-3], node)
    for i in range(4, len(q) + 1):
        w.union(q[-i], k[-i], node)
        w.union(q[-i], v[-i], node)
    if qs[-3] == ks[-3]:
        w.union(q[-3], k[-3], node)
    else:
        parts = w.table.refine(q[-3], PROD, [ks[-3], qs[-3] // ks[-3]], str(node.target))
        if parts is None:
            w.freeze([q[-3], k[-3]], node, "query heads not a multiple of KV heads")
        else:
            w.union(parts[0], k[-3], node)
    w.table.tag(q[-3], "heads")
    w.table.tag(k[-3], "heads")
    w.table.tag(q[-1], "head_dim")
    w.table.tag(v[-1], "head_dim")
    out = list(q[:-1]) + [v[-1]]
    mask = arg(node, 3, "attn_mask")
    if is_tensor_node(mask):
        m, ms = w.of(mask), w.shape(mask)
        target = list(q[:-1]) + [k[-2]]
        tshape = list(qs[:-1]) + [ks[-2]]
        for i in range(1, min(len(m), len(target)) + 1):
            if ms[-i] == tshape[-i] and ms[-i] != 1:
                w.union(m[-i], target[-i], node)
    return out


def _reduced_dims(node: fx.Node, nd: int) -> tuple[set[int], bool]:
    dims = arg(node, 1, "dim")
    if dims is None or dims == [] or str(node.target).endswith(".default") and "dim" not in node.kwargs and len(node.args) < 2:
        dims = list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    keepdim = arg(node, 2, "keepdim", False)
    return {d % nd for d in dims}, bool(keepdim)


def _reduce(freeze: bool):
    def rule(w: Walk, node: fx.Node):
        ax = list(w.of(node.args[0]))
        dims, keep = _reduced_dims(node, len(ax))
        if freeze:
            w.freeze([ax[d] for d in dims], node, "reduction that pruned zeros would change")
        val = node.meta.get("val")
        tupled = isinstance(val, (tuple, list))  # max.dim / min.dim: (values, indices)
        if keep:  # the reduced dims stay, as size-1 axes of their own
            fresh = w.fresh(node, val[0] if tupled else None)
            out = [fresh[d] if d in dims else ax[d] for d in range(len(ax))]
        else:
            out = [ax[d] for d in range(len(ax)) if d not in dims]
        return [out, out] if tupled else out

    return rule


def along_dim(dim_index: int, default: int = -1):
    """Ops that mix values along one dimension (softmax, cumsum, sort): that axis is frozen."""

    def rule(w: Walk, node: fx.Node):
        ax = list(w.of(node.args[0]))
        d = arg(node, dim_index, "dim", default) % len(ax)
        w.freeze([ax[d]], node, "mixes values along this dimension")
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):  # topk / sort: (values, indices)
            outs = []
            for v in val:
                o = list(ax)
                if int(v.shape[d]) != w.shape(node.args[0])[d]:
                    o[d] = w.fresh(node, v)[d]
                outs.append(o)
            return outs
        return ax

    return rule


def routing(dim_index: int):
    """softmax / log_softmax / topk over a static axis: mixes values along it, like
    :func:`along_dim`, unless the result chooses weights by index (mixture-of-experts routing,
    :meth:`Walk.route`). ``topk``'s indices carry their axis as values; it needs k to choose from."""
    frozen = along_dim(dim_index)

    def rule(w: Walk, node: fx.Node):
        src = node.args[0]
        ax = list(w.of(src))
        d = arg(node, dim_index, "dim", -1) % len(ax)
        if not w.is_static(src, d) or arg(node, 3, "largest", True) is False:  # (a smallest-k would pick -inf)
            return frozen(w, node)
        val = node.meta.get("val")
        if not isinstance(val, (tuple, list)):
            w.route(node, d, ax[d])
            return ax
        k = int(val[0].shape[d])
        w.route(node, d, ax[d], picks=k)
        values, indices = list(ax), list(ax)
        values[d] = indices[d] = w.fresh(node, val[0])[d]
        w.values[node] = [None, ax[d]]
        return [values, indices]

    return rule


def routing_max(w: Walk, node: fx.Node):
    """max.dim / argmax over a static axis: a top-1 choice (PhiMoE's sparse mixer, switch routers). As
    for :func:`routing`, the axis stays prunable only if the index picks weights (a removed expert's
    -inf never wins a max); otherwise it is a reduction that pruned zeros would change, and frozen."""
    src = node.args[0]
    ax = list(w.of(src))
    dim = arg(node, 1, "dim")
    if dim is None or not w.is_static(src, dim % len(ax)):
        return _reduce(freeze=True)(w, node)
    d, keep = dim % len(ax), arg(node, 2, "keepdim", False)
    w.route(node, d, ax[d], picks=1, top1=True)
    val = node.meta.get("val")
    tupled = isinstance(val, (tuple, list))
    out = list(ax)
    if keep:
        out[d] = w.fresh(node, val[0] if tupled else val)[d]
    else:
        del out[d]
    w.values[node] = [None, ax[d]] if tupled else ax[d]
    return [out, list(out)] if tupled else out


def norm(n_weight_args: int):
    """layer_norm(x, shape, weight, bias, eps) / rms_norm(x, shape, weight, eps)."""

    def rule(w: Walk, node: fx.Node):
        ax = list(w.of(node.args[0]))
        k = len(node.args[1])
        for p in node.args[2 : 2 + n_weight_args]:
            if is_tensor_node(p):
                for a, b in zip(ax[-k:], w.of(p)):
                    w.union(a, b, node)
        return ax

    return rule


def creation(w: Walk, node: fx.Node):
    """full/zeros/ones/arange/...: new values; their shape follows whatever they meet."""
    return w.fresh(node)


def index_tensor(w: Walk, node: fx.Node):
    """Advanced indexing ``x[..., idx, ...]``: indexed axes are frozen, the others carry over.
    An axis indexed by routing choices is coupled to the axis they were chosen from instead."""
    src, indices = node.args[0], node.args[1]
    ax = list(w.of(src))
    used = [i for i, t in enumerate(indices) if t is not None]
    for i in used:
        if not w.pick(indices[i], ax[i], node):
            w.freeze([ax[i]], node, "indexed by a tensor")
    out = w.fresh(node)
    if not used:
        return out
    first, last = used[0], used[-1]
    tail = len(ax) - last - 1
    for i in range(1, tail + 1):
        w.union(out[-i], ax[-i], node)
    if used == list(range(first, last + 1)):
        for i in range(first):
            w.union(out[i], ax[i], node)
    return out


def index_select(w: Walk, node: fx.Node):
    ax = list(w.of(node.args[0]))
    d = node.args[1] % len(ax)
    out = list(ax)
    out[d] = w.fresh(node)[d]
    if not w.pick(node.args[2], ax[d], node):
        w.freeze([ax[d], out[d]], node, "indexed by a tensor")
    return out


def _index_along(w: Walk, node: fx.Node, x: fx.Node, dim: int, index: fx.Node):
    """gather/scatter on ``x`` along ``dim`` by ``index``: that axis is picked by routing choices (or
    frozen); outside ``dim``, index position i is tensor position i (over a shorter index, only the
    first ones: both frozen). Returns (x's axes, index's axes, dim)."""
    ax, ia = list(w.of(x)), list(w.of(index))
    d = dim % len(ax)
    if not w.pick(index, ax[d], node):
        w.freeze([ax[d]], node, "indexed by a tensor")
    shape, index_shape = w.shape(x), w.shape(index)
    for k in range(len(ax)):
        if k == d:
            continue
        if shape[k] == index_shape[k]:
            w.union(ax[k], ia[k], node)
        else:
            w.freeze([ax[k], ia[k]], node, "indexed over part of a dimension")
    return ax, ia, d


def gather(w: Walk, node: fx.Node):
    """``out[..., j, ...] = src[..., index[..., j, ...], ...]`` along ``dim``: the output has the
    index's axes; routing choices as the index pick along ``src``'s axis (a router's chosen scores)."""
    src, dim, index = node.args[:3]
    _, ia, _ = _index_along(w, node, src, dim, index)
    return ia  # (choices gathered are still choices: Walk passes them on)


def scatter(w: Walk, node: fx.Node):
    """``out = self`` with ``src`` (or a value) written at ``index`` along ``dim``: routing choices as
    the index write along ``self``'s axis (a mask of the chosen experts)."""
    x, dim, index = node.args[:3]
    ax, ia, _ = _index_along(w, node, x, dim, index)
    src = node.args[3] if len(node.args) > 3 else node.kwargs.get("src")
    if is_tensor_node(src):  # src position i goes with index position i; the rest of src is not read
        for a, b, n, m in zip(w.of(src), ia, w.shape(src), w.shape(index)):
            if n == m:
                w.union(a, b, node)
            else:
                w.freeze([a, b], node, "only part of this dimension is written")
    if isinstance(w.values.get(x), int):  # choices overwritten by other numbers
        w.freeze([w.values[x]], node, "the routing's choices are used as numbers here")
    return ax


def index_add(w: Walk, node: fx.Node):
    x, d, _, src = node.args[:4]
    ax, sa = list(w.of(x)), list(w.of(src))
    d %= len(ax)
    w.freeze([ax[d], sa[d]], node, "indexed by a tensor")
    for k in range(len(ax)):
        if k != d:
            w.union(ax[k], sa[k], node)
    return ax


def index_put(w: Walk, node: fx.Node):
    x, indices, values = node.args[:3]
    ax = list(w.of(x))
    used = [i for i, t in enumerate(indices) if t is not None]
    w.freeze([ax[i] for i in used], node, "indexed by a tensor")
    if is_tensor_node(values) and used:
        va = w.of(values)
        tail = len(ax) - used[-1] - 1
        for i in range(1, min(tail, len(va)) + 1):
            if w.shape(values)[-i] == w.shape(x)[-i] and w.shape(values)[-i] != 1:
                w.union(ax[-i], va[-i], node)
    return ax


def repeat(w: Walk, node: fx.Node):
    ax, reps = list(w.of(node.args[0])), list(node.args[1])
    fresh = w.fresh(node)
    out = list(fresh)
    offset = len(reps) - len(ax)
    for k, a in enumerate(ax):
        r = reps[offset + k]
        if r == 1:
            out[offset + k] = a
        elif isinstance(r, int):
            tile = w.table.new(r, "repeat")
            w.union(fresh[offset + k], w.table.compose(PROD, [tile, a], "repeat"), node)
    return out


def repeat_interleave(w: Walk, node: fx.Node):
    ax = list(w.of(node.args[0]))
    r, d = node.args[1], arg(node, 2, "dim")
    out = w.fresh(node)
    if not isinstance(r, int) or d is None:
        w.freeze(ax, node, "repeat_interleave with tensor repeats or no dim")
        return out
    d %= len(ax)
    for k, a in enumerate(ax):
        if k != d:
            w.union(out[k], a, node)
    if w.is_static(node.args[0], d):
        w.union(out[d], w.table.compose(PROD, [ax[d], w.table.new(r, "repeat")], "repeat_interleave"), node)
    return out


def pad(w: Walk, node: fx.Node):
    ax = list(w.of(node.args[0]))
    padding = node.args[1]
    padded = [len(ax) - 1 - i // 2 for i in range(len(padding)) if padding[i] != 0]
    out = list(ax)
    fresh = w.fresh(node)
    for d in padded:
        out[d] = fresh[d]
    w.freeze([ax[d] for d in padded] + [fresh[d] for d in padded], node, "padded dimension")
    return out


def view_as_complex(w: Walk, node: fx.Node):
    """[..., n, 2] real -> [..., n] complex (rotary embeddings in complex numbers: DeepSeek-V2, Llama 4):
    every dim but the last is the same; the last (real, imaginary) is consumed and cannot lose an index."""
    ax = list(w.of(node.args[0]))
    w.freeze([ax[-1]], node, "real and imaginary parts of a complex view")
    return ax[:-1]


def view_as_real(w: Walk, node: fx.Node):
    """[..., n] complex -> [..., n, 2] real: the inverse of :func:`view_as_complex`."""
    pair = w.fresh(node)[-1]
    w.freeze([pair], node, "real and imaginary parts of a complex view")
    return [*w.of(node.args[0]), pair]


# =============================================================== rewrite rules
def rw_size_list(index: int, name: str = "size"):
    """Size constants (view/reshape/expand/full/new_zeros): each static size follows its axis."""

    def rewrite(ctx, node: fx.Node):
        sizes = arg(node, index, name)
        if not isinstance(sizes, (list, tuple)):
            return
        ax = ctx.axes(node)
        new = list(sizes)
        for i, s in enumerate(sizes):
            if isinstance(s, int) and s != -1 and ctx.pruned(ax[i]):
                new[i] = ctx.kept(ax[i])
        if new != list(sizes):
            set_arg(node, index, name, new)

    return rewrite


def rw_slice(ctx, node: fx.Node):
    src = node.args[0]
    ax = ctx.axes(src)
    d = arg(node, 1, "dim", 0) % len(ax)
    if not ctx.pruned(ax[d]):
        return
    mask = ctx.mask(ax[d])
    n = len(mask)
    start, end = arg(node, 2, "start"), arg(node, 3, "end")
    s = _norm_index(start, n) or 0
    e = n if end is None else _norm_index(end, n)
    set_arg(node, 2, "start", int(mask[:s].sum()))
    set_arg(node, 3, "end", int(mask[:e].sum()))


def rw_narrow(ctx, node: fx.Node):
    src, dim, start, length = node.args[:4]
    ax = ctx.axes(src)
    d = dim % len(ax)
    if not ctx.pruned(ax[d]):
        return
    mask = ctx.mask(ax[d])
    s = _norm_index(start, len(mask))
    node.args = (src, dim, int(mask[:s].sum()), int(mask[s : s + length].sum()))


def rw_split(ctx, node: fx.Node):
    src = node.args[0]
    ax = ctx.axes(src)
    d = arg(node, 2, "dim", 0) % len(ax)
    if not ctx.pruned(ax[d]):
        return
    sizes = [ctx.kept(piece[d]) for piece in ctx.axes(node)]
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (src, sizes, d), {}


def rw_mean(ctx, node: fx.Node):
    """A mean over pruned channels keeps its original divisor (zeros of pruned channels count)."""
    ax = ctx.axes(node.args[0])
    dims, _ = _reduced_dims(node, len(ax))
    factor = 1.0
    for d in dims:
        if ctx.pruned(ax[d]):
            factor *= ctx.kept(ax[d]) / ctx.size(ax[d])
    if factor != 1.0:
        ctx.scale_output(node, factor)


def rw_layer_norm(ctx, node: fx.Node):
    """LayerNorm over pruned channels: statistics over the original width (pruned = zeros)."""
    x, shape = node.args[0], node.args[1]
    weight, bias = arg(node, 2, "weight"), arg(node, 3, "bias")
    eps = arg(node, 4, "eps", 1e-5)
    ax = ctx.axes(x)[-len(shape) :]
    if not any(ctx.pruned(a) for a in ax):
        return
    n_old = math.prod(ctx.size(a) for a in ax)
    n_new = math.prod(ctx.kept(a) for a in ax)
    dims = list(range(-len(shape), 0))
    g = node.graph
    with g.inserting_before(node):
        mu = g.call_function(aten.div.Tensor, (g.call_function(aten.sum.dim_IntList, (x, dims, True)), n_old))
        xc = g.call_function(aten.sub.Tensor, (x, mu))
        ss = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.mul.Tensor, (xc, xc)), dims, True))
        missing = g.call_function(aten.mul.Tensor, (g.call_function(aten.mul.Tensor, (mu, mu)), n_old - n_new))
        var = g.call_function(aten.div.Tensor, (g.call_function(aten.add.Tensor, (ss, missing)), n_old))
        y = g.call_function(aten.mul.Tensor, (xc, g.call_function(aten.rsqrt.default, (g.call_function(aten.add.Tensor, (var, eps)),))))
        if weight is not None:
            y = g.call_function(aten.mul.Tensor, (y, weight))
        if bias is not None:
            y = g.call_function(aten.add.Tensor, (y, bias))
    ctx.replace(node, y)
    g.erase_node(node)


def rw_rms_norm(ctx, node: fx.Node):
    x, shape, weight = node.args[0], node.args[1], arg(node, 2, "weight")
    eps = arg(node, 3, "eps") or torch.finfo(tensor_meta(x).dtype).eps
    ax = ctx.axes(x)[-len(shape) :]
    if not any(ctx.pruned(a) for a in ax):
        return
    n_old = math.prod(ctx.size(a) for a in ax)
    dims = list(range(-len(shape), 0))
    g = node.graph
    with g.inserting_before(node):
        ss = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.mul.Tensor, (x, x)), dims, True))
        ms = g.call_function(aten.div.Tensor, (ss, n_old))
        y = g.call_function(aten.mul.Tensor, (x, g.call_function(aten.rsqrt.default, (g.call_function(aten.add.Tensor, (ms, eps)),))))
        if weight is not None:
            y = g.call_function(aten.mul.Tensor, (y, weight))
    ctx.replace(node, y)
    g.erase_node(node)


def rw_sdpa(ctx, node: fx.Node):
    """If head_dim shrinks, the softmax scale must stay 1/sqrt(original head_dim)."""
    q_axes = ctx.axes(node.args[0])
    if ctx.pruned(q_axes[-1]) and arg(node, 6, "scale") is None:
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(ctx.size(q_axes[-1]))}


def rw_select_after(ctx, node: fx.Node):
    """Values that depend on their index (arange): compute in full, keep the surviving indices."""
    for d, a in enumerate(ctx.axes(node)):
        if ctx.pruned(a):
            ctx.select_output(node, d, ctx.mask(a))


def rw_contiguous_input(ctx, node: fx.Node):
    """Pruning a neighbour can leave a frozen slice with an odd stride (DeepSeek-V2: the rotary part of a
    projection whose other part lost channels), which view_as_complex refuses: copy it contiguous first."""
    x = node.args[0]
    with ctx.gm.graph.inserting_before(node):
        dense = ctx.gm.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    dense.meta = dict(x.meta)
    node.replace_input_with(x, dense)


def rw_repeat(ctx, node: fx.Node):
    ax = ctx.axes(node)
    src_ax = ctx.axes(node.args[0])
    reps = list(node.args[1])
    offset = len(reps) - len(src_ax)
    new = list(reps)
    for k, r in enumerate(reps):
        if isinstance(r, int) and r != 1 and ctx.pruned(ax[k]):
            base = ctx.kept(src_ax[k - offset]) if k >= offset else 1
            new[k] = ctx.kept(ax[k]) // max(base, 1)
    if new != reps:
        node.args = (node.args[0], new, *node.args[2:])


def rw_repeat_interleave(ctx, node: fx.Node):
    d = arg(node, 2, "dim") % len(ctx.axes(node))
    out_axis, src_axis = ctx.axes(node)[d], ctx.axes(node.args[0])[d]
    if ctx.pruned(out_axis):
        set_arg(node, 1, "repeats", ctx.kept(out_axis) // max(ctx.kept(src_axis), 1))


# =============================================================== the table
_ELEMENTWISE = """add sub rsub mul div true_divide floor_divide remainder pow neg abs exp exp2 expm1 log log1p
log2 sqrt rsqrt sin cos tan tanh sinh cosh asin acos atan atan2 sigmoid silu gelu relu relu6 leaky_relu elu selu
celu mish softplus hardtanh hardswish hardsigmoid logit erf erfc erfinv sign sgn clamp clamp_min clamp_max clip
minimum maximum fmin fmax where masked_fill lerp addcmul addcdiv reciprocal square floor ceil round trunc frac
eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor
__and__ __or__ __xor__ __invert__ isnan isinf isfinite nan_to_num copysign hypot heaviside threshold polar complex
gelu_ glu_like""".split()

_MOVING = """clone contiguous detach alias to _to_copy lift_fresh_copy _assert_tensor_metadata_passthrough""".split()
_IDENTITY = """type_as dropout feature_dropout alpha_dropout zeros_like ones_like empty_like full_like rand_like
randn_like bernoulli""".split()

_IGNORE = """_assert_tensor_metadata _assert_scalar _assert_async sym_constrain_range_for_size
sym_constrain_range sym_size sym_numel sym_stride sym_storage_offset _local_scalar_dense""".split()

_CREATION = """full zeros ones empty empty_strided scalar_tensor rand randn randint new_zeros new_ones new_full
new_empty tensor arange linspace""".split()

for _name in _ELEMENTWISE:
    register_op_rule([f"aten.{_name}", f"aten.{_name}_"], elementwise)  # in-place variants too
for _name in _MOVING:
    register_op_rule(f"aten.{_name}", identity, keeps_values=True)
for _name in _IDENTITY:
    register_op_rule(f"aten.{_name}", identity)
for _name in _IGNORE:
    register_op_rule(f"aten.{_name}", ignore)
register_op_rule(["aten.full", "aten.zeros", "aten.ones", "aten.empty", "aten.rand", "aten.randn"], creation, rw_size_list(0))
register_op_rule(["aten.new_zeros", "aten.new_ones", "aten.new_empty"], creation, rw_size_list(1))
register_op_rule("aten.new_full", creation, rw_size_list(1))
register_op_rule(["aten.arange", "aten.linspace", "aten.randint", "aten.scalar_tensor", "aten.empty_strided", "aten.tensor"], creation, rw_select_after)
register_op_rule(["aten.copy", "aten.copy_"], elementwise)  # x[..., a:b] = y: y's channels are that slice's
register_op_rule("aten.linear", linear)
register_op_rule("aten.mm", mm)
register_op_rule("aten.addmm", addmm)
register_op_rule(["aten.bmm", "aten.matmul"], matmul)
register_op_rule("aten.baddbmm", baddbmm)
register_op_rule("aten.embedding", embedding)
register_op_rule(["aten.view", "aten.reshape", "aten._unsafe_view", "aten.view_copy"], reshape, rw_size_list(1), keeps_values=True)
register_op_rule(["aten.unsqueeze", "aten.squeeze", "aten.flatten", "aten.unflatten"], reshape, keeps_values=True)
register_op_rule(["aten.expand", "aten.expand_copy", "aten.broadcast_to"], expand, rw_size_list(1), keeps_values=True)
register_op_rule(["aten.transpose", "aten.t", "aten.swapaxes"], transpose, keeps_values=True)
register_op_rule("aten.permute", permute, keeps_values=True)
register_op_rule("aten.numpy_T", numpy_t)
register_op_rule("aten.slice", slice_, rw_slice, keeps_values=True)
register_op_rule("aten.narrow", narrow, rw_narrow)
register_op_rule("aten.select", select, keeps_values=True)
register_op_rule(["aten.cat", "aten.concat", "aten.concatenate"], cat, joins_values=True)
register_op_rule("aten.stack", stack, joins_values=True)
register_op_rule(["aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split"], split, rw_split)
register_op_rule("aten.unbind", unbind)
register_op_rule("aten.view_as_complex", view_as_complex, rw_contiguous_input, keeps_values=True)
register_op_rule("aten.view_as_real", view_as_real, keeps_values=True)
register_op_rule("aten.scaled_dot_product_attention", sdpa, rw_sdpa)
register_op_rule(["aten.sum", "aten.any", "aten.nansum"], _reduce(freeze=False))
register_op_rule("aten.mean", _reduce(freeze=False), rw_mean)
register_op_rule(["aten.max.other", "aten.min.other"], elementwise)  # the binary overloads: maximum/minimum
register_op_rule(["aten.max.dim", "aten.argmax"], routing_max)
register_op_rule(["aten.amax", "aten.amin", "aten.min.dim", "aten.max.default", "aten.min.default", "aten.argmin",
                  "aten.var", "aten.std", "aten.var_mean", "aten.std_mean", "aten.logsumexp", "aten.all",
                  "aten.prod", "aten.linalg_vector_norm", "aten.norm"], _reduce(freeze=True))
register_op_rule(["aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"], routing(1))
register_op_rule(["aten.cumsum", "aten.cumprod", "aten.logcumsumexp", "aten.diff"], along_dim(1))
register_op_rule(["aten.topk"], routing(2))
register_op_rule(["aten.sort", "aten.argsort"], along_dim(1))
register_op_rule("aten.layer_norm", norm(2), rw_layer_norm)
register_op_rule("aten.rms_norm", norm(1), rw_rms_norm)
register_op_rule("aten.index.Tensor", index_tensor, reads_values=True)
register_op_rule("aten.index_select", index_select, reads_values=True)
register_op_rule("aten.index_add", index_add)
register_op_rule("aten.gather", gather, reads_values=True)
register_op_rule(["aten.scatter", "aten.scatter_", "aten.scatter_add", "aten.scatter_add_"], scatter, reads_values=True)
register_op_rule("aten.index_put", index_put)
register_op_rule("aten.repeat", repeat, rw_repeat)
register_op_rule("aten.repeat_interleave.self_int", repeat_interleave, rw_repeat_interleave)
register_op_rule(["aten.constant_pad_nd", "aten.pad"], pad)
