"""The KV-cache variant of a pruned model, for incremental decoding.

A pruned graph is traced with ``use_cache=False``: it has no cache inputs. For decoding, the dense
model is traced a second time through a view whose forward takes ``input_ids`` plus each layer's
past key and value tensors (``[batch, kv_heads, past, head_dim]``, past length dynamic, 0 allowed)
and returns the logits plus each layer's present key and value (past + new tokens). That graph is
analysed with the cache tensors as *open* boundaries (their head axes follow the layer's KV-head
group instead of being frozen), the compiled model's plan is applied to it by group name, and the
rewrite gives every layer's cache its pruned head count. The weights are then taken from the
compiled model's pruned graph, so both graphs compute the same function.

Works for Hugging Face decoders whose forward takes a transformers ``Cache`` (every decoder family
in the test zoo). Other modules raise :class:`graphprune.ExportError`; export them without a cache
(``generate`` then recomputes the whole sequence at each step).
"""
from __future__ import annotations

import copy
import inspect
import os
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from .analysis.depgraph import DependencyGraph
from .analysis.groups import find_groups
from .analysis.walk import Walk, fetch_attr
from .errors import ExportError
from .rewrite import AxisMasks, rewrite
from .inline_blocks import inline_grad_blocks
from .trace import _unproven_guard, export_graph, is_hf_model, traceable_experts

# Example sizes of the cached trace: all different, so torch.export relates none of them.
_BATCH, _SEQ, _PAST = 2, 3, 5


@dataclass
class CacheLayout:
    """Per layer: the static (pruned) sizes of the key and value cache tensors."""

    key_shapes: list[tuple[int, int]]  # (kv_heads, head_dim) per layer
    value_shapes: list[tuple[int, int]]

    @property
    def num_layers(self) -> int:
        return len(self.key_shapes)

    def empty(self, batch: int, dtype=torch.float32, device="cpu") -> list[list[torch.Tensor]]:
        """A past of length 0 (what prefill takes)."""
        return [[torch.zeros(batch, h, 0, d, dtype=dtype, device=device) for h, d in (k, v)]
                for k, v in zip(self.key_shapes, self.value_shapes)]

    def input_names(self) -> list[str]:
        return ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


@dataclass
class CachedGraph:
    """A pruned graph called as ``module(input_ids=ids, past=[[k, v], ...]) -> (logits, [[k, v], ...])``."""

    module: fx.GraphModule
    layout: CacheLayout
    example_kwargs: dict
    dynamic_shapes: dict

    def __call__(self, input_ids: torch.Tensor, past=None):
        past = self.layout.empty(input_ids.shape[0], self.dtype, input_ids.device) if past is None else past
        return self.module(input_ids=input_ids, past=past)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def export_program(self) -> torch.export.ExportedProgram:
        try:
            with torch.no_grad():
                return export_graph(self.module, self.example_kwargs, self.dynamic_shapes)
        except Exception as exc:
            raise ExportError(f"could not re-export the pruned KV-cache graph: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


# ================================================================ tracing with a cache
def _cache_view(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``model`` (same parameters, same names) whose forward takes and returns KV tensors."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    base_forward = type(model).forward

    def forward(self, input_ids, past):
        cache = DynamicCache()  # plain full-length layers: sliding windows are applied by the mask
        for key, value in past:
            layer = DynamicLayer()
            layer.keys, layer.values, layer.device, layer.is_initialized = key, value, key.device, True
            cache.layers.append(layer)
        out = base_forward(self, input_ids=input_ids, use_cache=True, **{cache_kw: cache})
        new = _cache_of(out)
        return out.logits, [[layer.keys, layer.values] for layer in new.layers]

    view = copy.copy(model)  # shares modules and parameters; the caller's model is untouched
    view.forward = types.MethodType(forward, view)
    return view


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def probe_cache(model: torch.nn.Module) -> CacheLayout:
    """Per-layer key/value head counts and head sizes of ``model``'s KV cache, from one tiny eager call."""
    if not is_hf_model(model):
        raise ExportError(
            f"{type(model).__name__} is not a Hugging Face model, so graphprune cannot add a KV cache to it: "
            "export it without a cache (generate() then recomputes the whole sequence at each step)"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
    except Exception as exc:
        raise ExportError(f"{type(model).__name__} could not run with use_cache=True: {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        model.train(was_training)
    cache = _cache_of(out)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None or layer.keys.dim() != 4 for layer in layers):
        raise ExportError(
            f"{type(model).__name__} returned a {type(cache).__name__} cache; graphprune's cached export needs "
            "a transformers Cache with one [batch, heads, seq, head_dim] key and value tensor per layer"
        )
    return CacheLayout([(lay.keys.shape[1], lay.keys.shape[3]) for lay in layers],
                       [(lay.values.shape[1], lay.values.shape[3]) for lay in layers])


def _example(layout: CacheLayout, vocab: int, device, dtype) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (_BATCH, _SEQ), generator=gen).to(device)
    past = [[torch.randn(_BATCH, h, _PAST, d, generator=gen).to(device=device, dtype=dtype) for h, d in (k, v)]
            for k, v in zip(layout.key_shapes, layout.value_shapes)]
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    shapes = {"input_ids": {0: batch, 1: seq},
              "past": [[{0: batch, 2: past_len}, {0: batch, 2: past_len}] for _ in past]}
    return {"input_ids": ids, "past": past}, shapes


def trace_with_cache(model: torch.nn.Module) -> tuple[fx.GraphModule, CacheLayout, dict, dict]:
    """The dense model traced with per-layer KV tensors in and out (the caller's model is not modified)."""
    layout = probe_cache(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    kwargs, shapes = _example(layout, model.config.vocab_size, device, dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), traceable_experts(model):  # the kernel the plain trace used (its groups)
            try:
                program = torch.export.export(_cache_view(model), (), kwargs, dynamic_shapes=shapes, strict=False)
            except Exception as exc:  # a guard it cannot prove (see graphprune.trace): checked at run time
                if not _unproven_guard(exc):
                    raise
                program = export_graph(_cache_view(model), kwargs, shapes)
    except Exception as exc:
        raise ExportError(f"torch.export could not trace {type(model).__name__} with a KV cache: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from exc
    finally:
        model.train(was_training)
    return inline_grad_blocks(program.module()), layout, kwargs, shapes


def analyze_with_cache(gm: fx.GraphModule) -> DependencyGraph:
    """Analyse a cached graph with its KV inputs and outputs as prunable boundaries."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = [x for x in pytree.tree_leaves(output.args) if isinstance(x, fx.Node)]
    open_nodes = frozenset(n.name for n in inputs[1:] + outputs[1:])  # all but input_ids and logits
    walk = Walk(gm, open_nodes=open_nodes).run()
    shapes = {n: tuple(fetch_attr(gm, n).shape) for n in walk.params}
    trainable = {n for n in walk.params if isinstance(fetch_attr(gm, n), torch.nn.Parameter)}
    groups, frozen = find_groups(walk.table, walk.params, shapes, trainable)
    return DependencyGraph(gm=gm, walk=walk, groups=groups, frozen=frozen, param_shapes=shapes)


def _leaf_keep(plan, dg: DependencyGraph) -> dict[int, torch.Tensor]:
    """The plan's keep-masks on the cached graph's groups, matched by name, kind and size."""
    by_name = {g.name: g for g in dg.groups}
    out = {}
    for pg in plan.groups:
        g = by_name.get(pg.name)
        if g is None or g.size != pg.size or g.kind != pg.kind:
            found = f"found {g.kind} of {g.size} units" if g is not None else "no such group"
            raise ExportError(
                f"the KV-cache graph does not have the plan's group {pg.name!r} ({pg.kind}, {pg.size} units; {found}): "
                "the model traced with a cache is structured differently, so the plan cannot be replayed on it"
            )
        mask = torch.zeros(g.size, dtype=torch.bool)
        mask[torch.as_tensor(pg.keep, dtype=torch.long)] = True
        out[g.axis] = mask
    return out


def _copy_weights(target: fx.GraphModule, source: torch.nn.Module) -> None:
    """Take every parameter from the compiled model's pruned graph (it may carry updated weights)."""
    theirs = dict(source.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in target.named_parameters(remove_duplicate=False):
            q = theirs.get(name)
            if q is None:
                continue
            if q.shape != p.shape:
                raise ExportError(f"parameter {name} is {tuple(q.shape)} in the pruned model but {tuple(p.shape)} in its KV-cache graph")
            p.copy_(q)


def _drop_input_guards(gm: fx.GraphModule) -> None:
    """Remove ``torch.export``'s checks of the dense input shapes: the cache inputs now have fewer heads."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.validate_inputs = False  # the placeholders' recorded shapes are the dense ones
    gm.recompile()


def cached_graph(compiled, model: torch.nn.Module | None = None) -> CachedGraph:
    """The pruned model of ``compiled`` with per-layer KV-cache inputs and outputs.

    ``model`` is the dense model ``compiled`` was made from (by default the one ``compile`` was
    given). Raises :class:`graphprune.ExportError` for models that have no
    transformers KV cache, or whose cached trace does not have the plan's groups.
    """
    model = model if model is not None else getattr(compiled, "source", None)
    if model is None:
        raise ExportError("the KV-cache export needs the dense model the plan was made for: pass model=...")
    gm, layout, kwargs, shapes = trace_with_cache(model)
    dg = analyze_with_cache(gm)
    leaf_keep = _leaf_keep(compiled.plan, dg)
    pruned = rewrite(dg, leaf_keep)
    _drop_input_guards(pruned)
    _copy_weights(pruned, compiled.module)
    masks = AxisMasks(dg, leaf_keep)
    by_name = dg.axes_by_name()
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    kept = [tuple(masks.kept(by_name[n.name][d]) for d in (1, 3)) for n in inputs]
    pruned_layout = CacheLayout(kept[0::2], kept[1::2])
    dtype = next((p.dtype for p in pruned.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in pruned.parameters()), torch.device("cpu"))
    example, _ = _example(pruned_layout, model.config.vocab_size, device, dtype)
    return CachedGraph(pruned, pruned_layout, example, shapes)


def export_onnx_with_cache(compiled, path: str | os.PathLike, model: torch.nn.Module | None = None, *,
                           dtype="float32", external_data: bool | None = None, check: bool = True,
                           optimize: bool = False, progress: bool = True, metadata: dict | None = None) -> Path:
    """Export the KV-cache variant of ``compiled`` to ONNX (see :func:`graphprune.export_onnx`).

    Inputs: ``input_ids`` [batch, seq] and ``past_key_values.{i}.key/value`` [batch, heads_i, past,
    head_dim_i]; outputs: ``logits`` and ``present.{i}.key/value`` (past + seq positions). Prefill
    passes a past of length 0; each decoding step passes the previous step's presents. Dynamic dims
    are named ``batch``, ``sequence``, ``past_sequence`` and ``total_sequence`` (past + sequence).
    """
    from .evaluate.runner import onnx_metadata
    from .export import check_target, export_onnx, normalize_dtype

    normalize_dtype(dtype)  # fail before the (slow) tracing
    check_target(Path(path))
    graph = cached_graph(compiled, model)
    meta = {**onnx_metadata(compiled), **(metadata or {}),
            "graphprune.kv_cache": "1", "graphprune.num_layers": str(graph.layout.num_layers)}
    return export_onnx(graph.export_program(), path, example_kwargs=graph.example_kwargs,
                       dynamic_shapes=graph.dynamic_shapes, dtype=dtype, external_data=external_data,
                       check=check, input_names=graph.layout.input_names(),
                       output_names=graph.layout.output_names(), metadata=meta, optimize=optimize,
                       progress=progress)
