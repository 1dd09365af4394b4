"""Complex arithmetic rewritten as real arithmetic on (real, imaginary) pairs, for ONNX export.

Some models rotate queries and keys in complex numbers (DeepSeek-V2, Llama 4: ``view_as_complex``,
a complex product with ``polar(1, θ)``, ``view_as_real``). ONNX Runtime has no complex kernels, and
the torch.onnx exporter translates only some complex ops. So before export every complex value in
the graph becomes a real tensor with one more trailing dimension of 2 (the layout ``view_as_real``
gives), and each op on it the real computation it stands for:

* ``view_as_complex`` / ``view_as_real`` disappear (they are that layout change);
* ``polar(r, θ)`` → ``stack([r cos θ, r sin θ], -1)``, ``complex(a, b)`` → ``stack([a, b], -1)``;
* a complex product → ``(ac − bd, ad + bc)``; by a real tensor or number → both parts scaled;
* shape and layout ops (view, unsqueeze, transpose, slice, cat, ...) act on the leading dims:
  a size list gains the trailing 2, a negative dim moves one to the left.

A complex op outside this set raises :class:`graphprune.ExportError` naming it; so does a graph
whose inputs or outputs are complex. The computation is the same up to float rounding.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .analysis.walk import fetch_attr
from .errors import ExportError

aten = torch.ops.aten

_REAL_OF = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}

# Ops that act on the leading dims only: argument positions holding a dim (negative ones shift left).
_DIM_ARGS = {
    aten.unsqueeze.default: (1,), aten.squeeze.dim: (1,), aten.select.int: (1,), aten.slice.Tensor: (1,),
    aten.narrow.default: (1,), aten.transpose.int: (1, 2), aten.cat.default: (1,), aten.stack.default: (1,),
    aten.split.Tensor: (2,), aten.split_with_sizes.default: (2,), aten.sym_size.int: (1,),
}
# Ops whose second argument is a full size list: it gains the trailing 2.
_SIZE_ARG = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
_PASS_THROUGH = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                 aten.lift_fresh_copy.default, aten.resolve_conj.default, aten.resolve_neg.default}
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.prim_dtype}
_ASSERTS = {aten._assert_tensor_metadata.default}


def is_complex(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def has_complex(gm: fx.GraphModule) -> bool:
    return any(is_complex(n) for n in gm.graph.nodes)


def lower_complex(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that no value in it is complex (see the module docstring)."""
    graph = gm.graph
    pairs: dict[fx.Node, fx.Node] = {}  # complex node -> its real form, [..., 2]
    replaced: list[fx.Node] = []
    for node in list(graph.nodes):
        touches = is_complex(node) or any(a in pairs for a in node.all_input_nodes)
        if not touches:
            continue
        if node.op == "placeholder" or node.op == "output":
            what = "input" if node.op == "placeholder" else "output"
            raise ExportError(f"ONNX export: the graph has a complex {what} ({node.name}); ONNX Runtime has no complex tensors")
        with graph.inserting_before(node):
            new = _get_attr(gm, node) if node.op == "get_attr" else _lower(graph, node, pairs)
        if node.target in _ASSERTS:
            replaced.append(node)
            continue
        if is_complex(node):
            pairs[node] = new
        else:
            node.replace_all_uses_with(new)
        replaced.append(node)
    for node in reversed(replaced):
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _get_attr(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A complex buffer or constant: stored again as its real view."""
    value = fetch_attr(gm, node.target)
    name = f"{node.target.replace('.', '_')}_as_real"
    gm.register_buffer(name, torch.view_as_real(value.detach()).clone(), persistent=False)
    return gm.graph.get_attr(name)


def _lower(graph: fx.Graph, node: fx.Node, pairs: dict) -> fx.Node | None:
    target, args, kwargs = node.target, node.args, node.kwargs
    call = graph.call_function

    def real(x):  # the real form of an argument (lists too)
        if isinstance(x, (list, tuple)):
            return type(x)(real(v) for v in x)
        return pairs.get(x, x)

    def part(x, i):
        return call(aten.select.int, (x, -1, i))

    if target in _ASSERTS:
        return None
    if target == aten.view_as_complex.default:
        return args[0]
    if target == aten.view_as_real.default:
        return real(args[0])
    if target == aten.polar.default:
        r, theta = args
        return call(aten.stack.default, ([call(aten.mul.Tensor, (r, call(aten.cos.default, (theta,)))),
                                          call(aten.mul.Tensor, (r, call(aten.sin.default, (theta,))))], -1))
    if target == aten.complex.default:
        return call(aten.stack.default, (list(args), -1))
    if target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        return _product(graph, node, pairs, part)
    if target in (aten.add.Tensor, aten.sub.Tensor) and all(is_complex(a) for a in args[:2]):
        return call(target, real(args), dict(kwargs))
    if target == aten.neg.default:
        return call(target, (real(args[0]),))
    if target in (aten.conj.default, aten._conj.default, aten.conj_physical.default):
        x = real(args[0])
        return call(aten.stack.default, ([part(x, 0), call(aten.neg.default, (part(x, 1),))], -1))
    if target == aten.real.default:
        return part(real(args[0]), 0)
    if target == aten.imag.default:
        return part(real(args[0]), 1)
    if target in _PASS_THROUGH:
        return call(target, (real(args[0]), *args[1:]), dict(kwargs))
    if target in _CASTS:
        return _cast(graph, node, real(args[0]), part)
    if target in _SIZE_ARG:
        return call(target, (real(args[0]), [*args[1], 2], *args[2:]), dict(kwargs))
    if target == aten.permute.default:
        rank = node.args[0].meta["val"].dim()
        return call(target, (real(args[0]), [d % rank for d in args[1]] + [rank]))
    if target in _DIM_ARGS:
        new = list(real(args))
        for i in _DIM_ARGS[target]:
            if i < len(new) and isinstance(new[i], int) and new[i] < 0:
                new[i] -= 1
        if "dim" in kwargs and isinstance(kwargs["dim"], int) and kwargs["dim"] < 0:
            kwargs = {**kwargs, "dim": kwargs["dim"] - 1}
        return call(target, tuple(new), dict(kwargs))
    if target is operator.getitem:  # an item of a split's result
        return call(target, (real(args[0]), args[1]))
    raise ExportError(f"ONNX export: no real-valued form of {target} on complex values (node {node.name}); "
                      "ONNX Runtime has no complex tensors")


def _product(graph: fx.Graph, node: fx.Node, pairs: dict, part) -> fx.Node:
    """Complex × complex, complex × real, complex ÷ real (tensor or number)."""
    call = graph.call_function
    a, b = node.args[:2]
    mul = node.target in (aten.mul.Tensor, aten.mul.Scalar)
    if isinstance(b, complex) or isinstance(a, complex):
        raise ExportError(f"ONNX export: a complex constant in {node.target} (node {node.name}) has no real-valued form here")
    if is_complex(a) and is_complex(b):
        if not mul:
            raise ExportError(f"ONNX export: no real-valued form of complex division (node {node.name})")
        x, y = pairs[a], pairs[b]
        xr, xi, yr, yi = part(x, 0), part(x, 1), part(y, 0), part(y, 1)
        re = call(aten.sub.Tensor, (call(aten.mul.Tensor, (xr, yr)), call(aten.mul.Tensor, (xi, yi))))
        im = call(aten.add.Tensor, (call(aten.mul.Tensor, (xr, yi)), call(aten.mul.Tensor, (xi, yr))))
        return call(aten.stack.default, ([re, im], -1))
    if not is_complex(a):  # real × complex: the product commutes
        if not mul:
            raise ExportError(f"ONNX export: no real-valued form of division by a complex value (node {node.name})")
        a, b = b, a
    scale = call(aten.unsqueeze.default, (b, -1)) if isinstance(b, fx.Node) else b
    return call(aten.mul.Tensor if mul else aten.div.Tensor, (pairs[a], scale))


def _cast(graph: fx.Graph, node: fx.Node, x: fx.Node, part) -> fx.Node:
    """``.to(dtype)``: complex → complex changes the parts' dtype; complex → real keeps the real part."""
    dtype = node.kwargs.get("dtype")
    if dtype is None and len(node.args) > 1 and isinstance(node.args[1], torch.dtype):
        dtype = node.args[1]
    if dtype is None:
        return x
    if not is_complex(node.args[0]):  # real -> complex: a zero imaginary part
        x = graph.call_function(aten._to_copy.default, (x,), {"dtype": _REAL_OF[dtype]})
        return graph.call_function(aten.stack.default, ([x, graph.call_function(aten.zeros_like.default, (x,))], -1))
    if dtype in _REAL_OF:
        return graph.call_function(aten._to_copy.default, (x,), {"dtype": _REAL_OF[dtype]})
    return graph.call_function(aten._to_copy.default, (part(x, 0),), {"dtype": dtype})
