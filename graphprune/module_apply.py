"""Apply a pruning plan at module level: a smaller copy of the original ``nn.Module``.

peft and ``save_pretrained`` want real ``nn.Linear`` modules, which a traced graph does not have.
For models whose code infers its shapes from its weights (most Llama-style Hugging Face models
when heads and MLP channels are pruned), a copy of the module with every parameter sliced is the
pruned model. The copy takes its tensors from the pruned graph (so weight updates made by a
pass come along), fixes the size attributes of ``nn.Linear``/``Conv1D``/``nn.Embedding``/norm
modules and the head counts of attention modules, updates the Hugging Face config when every
layer kept the same width, and is then **checked equal to the pruned graph** on random inputs.
Where the model's code takes a size from somewhere else (a norm over a pruned hidden size that
divides by the new width, a reshape by a head size stored in the config), the check fails and
:class:`ModuleApplyError` says so: use the graph instead.
"""
from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree

from .analysis.walk import fetch_attr
from .errors import GraphpruneError
from .rewrite import _set_tensor as _set

# attributes of a module named "<path>:<kind>" that count units of that kind (scaled by kept/total)
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTHS = ("split_size", "all_head_size", "inner_dim")  # heads x head_dim, used by forward code to split
SCALED_ATTRIBUTES = {
    "heads": _HEAD_COUNTS + _WIDTHS,
    "query_heads": ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_groups") + _WIDTHS,
    "head_dim": ("head_dim", "head_size") + _WIDTHS,
    "channels": ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size"),
}
# Hugging Face config fields per kind, updated when every group of the kind kept the same count
CONFIG_FIELDS = {
    "heads": ("num_key_value_heads", "num_attention_heads", "n_head", "num_heads", "n_kv_heads", "num_kv_heads"),
    "query_heads": ("num_attention_heads", "n_head", "num_heads"),
    "head_dim": ("head_dim",),
    "channels": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
}


class ModuleApplyError(GraphpruneError):
    """A plan cannot be applied at module level (the model's code does not follow its weights)."""


def apply_plan_to_module(
    model: torch.nn.Module,
    compiled=None,
    *,
    plan=None,
    dg=None,
    example_kwargs: dict | None = None,
    check: bool = True,
    trials: int = 2,
    tolerance: float = 1e-4,
) -> torch.nn.Module:
    """A pruned copy of ``model`` (``model`` itself is not modified).

    Pass the ``CompiledModel`` that ``graphprune.compile(model, ...)`` returned, or a ``plan`` (and
    optionally the dense model's ``dg``; it is traced and analysed otherwise). With ``check`` the
    copy is compared with the pruned graph on ``trials`` random inputs (relative ``tolerance``),
    shaped like ``example_kwargs`` (default: the compiled model's, or a Hugging Face model's own).
    """
    from .analysis import analyze
    from .rewrite import rewrite
    from .trace import hf_example_kwargs, is_hf_model, trace

    pruned_graph = None
    if compiled is not None:
        plan = plan or compiled.plan
        dg = dg or compiled.dg
        pruned_graph, example_kwargs = compiled.module, example_kwargs or compiled.example_kwargs
    if example_kwargs is None and dg is not None and is_hf_model(model):
        example_kwargs = hf_example_kwargs(model)
    if plan is None:
        raise ModuleApplyError("apply_plan_to_module needs a CompiledModel or a plan=")
    if dg is None:
        traced = trace(model, example_kwargs=example_kwargs)
        dg, example_kwargs = analyze(traced), traced.example_kwargs
    if example_kwargs is None:
        raise ModuleApplyError("no example inputs to check the module against the graph: pass the CompiledModel")
    if pruned_graph is None:
        pruned_graph = rewrite(dg, plan.leaf_keep(dg))
    else:
        plan.check(dg)

    small = copy.deepcopy(model)
    _copy_tensors(small, pruned_graph, dg)
    _fix_module_sizes(small)
    _fix_unit_attributes(small, plan)
    _fix_config(small, plan)
    if check:
        check_equal(small, pruned_graph, example_kwargs, trials=trials, tolerance=tolerance)
    return small


def _copy_tensors(small: torch.nn.Module, graph, dg) -> None:
    """Every analysed parameter/buffer of ``small`` becomes the pruned graph's (tied names stay tied)."""
    targets_of: dict[str, list[str]] = {}
    for target, canonical in dg.walk.aliases.items():
        targets_of.setdefault(canonical, []).append(target)
    for name in dg.params:
        source = fetch_attr(graph, name)
        old = _get(small, name)
        if old is None:
            continue
        if isinstance(old, torch.nn.Parameter):
            new = torch.nn.Parameter(source.detach().clone().to(old.dtype), requires_grad=old.requires_grad)
        else:
            new = source.detach().clone().to(old.dtype)
        for target in targets_of.get(name, [name]):
            if _get(small, target) is not None:
                _set(small, target, new)


def _get(root: torch.nn.Module, target: str):
    *path, attr = target.split(".")
    try:
        owner = root.get_submodule(".".join(path)) if path else root
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, torch.Tensor) else None
def _fix_module_sizes(small: torch.nn.Module) -> None:
    """Size attributes of standard layers follow their (sliced) weights."""
    for module in small.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, torch.nn.Embedding):
            module.num_embeddings, module.embedding_dim = weight.shape
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)) and weight.dim() == 1:
            if hasattr(module, "normalized_shape"):
                module.normalized_shape = (weight.shape[0],)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style layer
            module.nx, module.nf = weight.shape


def _fix_unit_attributes(small: torch.nn.Module, plan) -> None:
    """Head counts and widths stored on the module a group is named after, scaled by kept/total."""
    for g in plan.groups:
        path, _, kind = g.name.rpartition(":")
        names = SCALED_ATTRIBUTES.get(kind)
        if not names or not path or len(g.keep) == g.size:
            continue
        try:
            module = small.get_submodule(path)
        except AttributeError:
            continue
        for attr in names:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value % g.size == 0:
                setattr(module, attr, value // g.size * len(g.keep))


def _fix_config(small: torch.nn.Module, plan) -> None:
    """Hugging Face config sizes, for each kind whose groups all kept the same number of units."""
    config = getattr(small, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    by_kind: dict[str, set[tuple[int, int]]] = {}
    for g in plan.groups:
        by_kind.setdefault(g.kind, set()).add((len(g.keep), g.size))
    for kind, pairs in by_kind.items():
        if len(pairs) != 1:
            continue  # widths differ per layer: a config cannot say that; the weights do
        kept, total = pairs.pop()
        if kept == total:
            continue
        for field in CONFIG_FIELDS.get(kind, ()):
            value = getattr(config, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value % total == 0:
                _try_setattr(config, field, value // total * kept)
        if kind == "head_dim" and getattr(config, "head_dim", None) is None:
            heads = getattr(config, "num_attention_heads", None)
            if heads and config.hidden_size // heads == total:
                _try_setattr(config, "head_dim", kept)


def _try_setattr(config, field: str, value: int) -> None:
    try:
        setattr(config, field, value)
    except (AttributeError, TypeError, ValueError):
        pass  # a derived (read-only) field: it follows the ones it is computed from


def check_equal(small: torch.nn.Module, graph, example_kwargs: dict, trials: int = 2, tolerance: float = 1e-4, seed: int = 0) -> float:
    """Largest relative output difference between ``small`` and the pruned graph; raises above ``tolerance``."""
    from .api import random_inputs

    config = getattr(small, "config", None)
    vocab = getattr(config, "vocab_size", None)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    was_training = small.training
    small.eval()
    try:
        for t in range(trials):
            kwargs = random_inputs(example_kwargs, 2 + t, 5 + 3 * t, gen, vocab)
            with torch.no_grad():
                expected = _tensors(graph(**kwargs))
                try:
                    got = _tensors(small(**kwargs))
                except Exception as exc:
                    raise ModuleApplyError(
                        f"the pruned {type(small).__name__} cannot run at module level ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300]}): its code takes a size from somewhere other than "
                        "its weights (an attribute or the config). Fine-tune the pruned graph instead."
                    ) from exc
            for a, b in zip(got, expected):
                if a.shape != b.shape:
                    raise ModuleApplyError(f"module-level output shape {tuple(a.shape)} differs from the graph's {tuple(b.shape)}")
                scale = max(b.double().abs().max().item(), 1e-12)
                worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    finally:
        small.train(was_training)
    if not worst <= tolerance:
        raise ModuleApplyError(
            f"the pruned {type(small).__name__} at module level differs from the pruned graph (max relative "
            f"difference {worst:.3g} > {tolerance:g}): its code does not compute what the graph computes "
            "(e.g. a norm over a pruned hidden size divides by the new width, while the graph keeps the "
            "original divisor). Fine-tune the pruned graph instead."
        )
    return worst


def _tensors(out) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
