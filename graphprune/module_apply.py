"""Apply a pruning plan at module level: a smaller copy of the original ``nn.Module``.

peft and ``save_pretrained`` want real ``nn.Linear`` modules, which a traced graph does not have.
For models whose code infers its shapes from its weights (most Hugging Face models when heads and
MLP channels are pruned), a copy of the module with every parameter sliced is the pruned model.
The copy takes its tensors from the pruned graph (so weight updates made by a pass come along),
then makes the module's code compute what the graph computes:

* size attributes of ``nn.Linear``/``Conv1D``/``nn.Embedding``/norm modules follow the weights,
  and so does any int attribute of another module equal to a sliced dim of its own weights (an
  MoE router's ``hidden_dim``);
* counts and widths stored on the module a group is named after (head counts, ``head_dim``,
  ``split_size``, ...) are scaled by kept/total (where a name means different things in
  different models, both readings are tried), and a module that reads sizes from its ``config``
  at run time gets a :class:`LayerConfig`, a view of the config with its own widths;
* a norm whose weight was sliced is rescaled so that it still divides by the original width,
  as the graph does (``rsqrt(S/n + eps) = sqrt(n/n') * rsqrt(S/n' + eps*n/n')``); the rescaling
  is chosen by a probe against the dense norm and kept only where it matches;
* the Hugging Face config follows when every layer kept the same width, and a mixture-of-experts
  model keeps a batched experts kernel when its expert widths are not 16-byte aligned (the
  ``grouped_mm`` kernel rejects them).

The copy is then **checked equal to the pruned graph** on random inputs. Where the model's code
takes a size from somewhere else (a reshape by a width it computes itself, a LayerNorm whose mean
over the kept channels differs from the graph's mean over all), the check fails and
:class:`ModuleApplyError` says so: use the graph instead.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.utils._pytree as pytree

from .analysis.walk import fetch_attr
from .errors import GraphpruneError
from .rewrite import _set_tensor as _set
from .trace import is_hf_model

# Attributes of the module a group "<path>:<kind>" is named after that count units of that kind.
# "multiple": a multiple of the group's unit count (query heads per KV head, heads x head_dim),
# scaled by kept/total; "equal": exactly the unit count (a "channels" group of an attention module
# whose heads the analysis could not see, e.g. eager ALiBi attention: its units are a head's channels);
# "maybe": a multiple whose meaning differs between models: ``embed_dim`` is the query width that
# GPT-BigCode splits its fused projection by, and the model width that CodeGen divides into a fixed
# number of chunks. The weights cannot tell; the check against the graph can (both are tried).
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTHS = ("split_size", "all_head_size", "inner_dim")  # heads x head_dim, used by forward code to split
_HEAD_DIMS = ("head_dim", "head_size")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "n_group", "num_group")
SCALED_ATTRIBUTES = {
    "heads": {"multiple": _HEAD_COUNTS + _WIDTHS, "maybe": ("embed_dim",)},
    "query_heads": {"multiple": ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_groups") + _WIDTHS,
                    "maybe": ("embed_dim",)},
    "head_dim": {"multiple": _HEAD_DIMS + _WIDTHS, "maybe": ("embed_dim",)},
    "channels": {"multiple": ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size", "intermediate_dim"),
                 "equal": _HEAD_DIMS + ("kv_lora_rank", "q_lora_rank")},  # (multi-head latent attention's ranks)
    # a unit is one expert, or one group of experts under group-limited routing (DeepSeek's n_group)
    "experts": {"multiple": _EXPERT_COUNTS},
}
SUBTREE_KINDS = ("experts",)  # the router and the experts are submodules of the block the group is named after
# Hugging Face config fields per kind, updated when every group of the kind kept the same count
CONFIG_FIELDS = {
    "heads": ("num_key_value_heads", "num_attention_heads", "n_head", "num_heads", "n_kv_heads", "num_kv_heads"),
    "query_heads": ("num_attention_heads", "n_head", "num_heads"),
    "head_dim": ("head_dim",),
    "channels": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "experts": _EXPERT_COUNTS,  # (a name the config lacks is skipped; aliases scale their field once)
}
# Counts a model keeps beside its config, per kind (MixtralForCausalLM.num_experts, for its router loss)
MODEL_COUNTS = {"experts": _EXPERT_COUNTS}
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")  # a norm's epsilon, scaled with its width
GROUPED_MM_ALIGN = 8  # elements: 16-byte strides in 2-byte dtypes, which the grouped_mm kernels require


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

    pruned_graph, dynamic_shapes = None, None
    if compiled is not None:
        dynamic_shapes = compiled.dynamic_shapes
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

    kept = _kept_positions(dg, plan)
    errors = []
    for scale_maybe in (True, False):
        small = copy.deepcopy(model)
        try:
            _copy_tensors(small, pruned_graph, dg)
            _fix_module_sizes(small)
            _fix_own_widths(small, model)
            ambiguous = _fix_unit_attributes(small, plan, scale_maybe=scale_maybe, dense=model)
            _fix_config(small, plan)
            unmatched = _rescale_norms(small, model, kept)
            _keep_batched_experts(small)
        except GraphpruneError:
            raise
        except Exception as exc:  # the model's own code or config refused a width (a per-layer config field)
            raise ModuleApplyError(
                f"the plan cannot be applied to {type(model).__name__}'s modules ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}). Fine-tune the pruned graph instead.") from exc
        if not check:
            return small
        try:
            check_equal(small, pruned_graph, example_kwargs, trials=trials, tolerance=tolerance, dynamic_shapes=dynamic_shapes)
            return small
        except ModuleApplyError as exc:
            errors.append(_norm_error(small, unmatched, exc) if unmatched else exc)
        del small
        if not ambiguous:
            break
    if any(g.kind == "head_dim" and len(g.keep) != g.size for g in plan.groups):
        raise ModuleApplyError(f"{errors[0]} Pruned head_dim gives queries/keys and values their own head sizes "
                               "(rotary pairs decide the first), which an attention class with one head_dim cannot hold.") from errors[0]
    raise errors[0]


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


def _fix_own_widths(small: torch.nn.Module, dense: torch.nn.Module) -> None:
    """A module's int attribute equal to the dense size of a sliced dim of its own parameters is that
    dim's width (an MoE router's ``hidden_dim`` it reshapes by, experts' ``intermediate_dim``): it
    takes the kept size. A size that two dims share with different kept sizes (or that one keeps
    whole) is left alone, and so are torch's own layers (``_fix_module_sizes``) and indices."""
    for name, module in small.named_modules():
        if not module._parameters or type(module).__module__.startswith("torch."):
            continue
        try:
            original = dense.get_submodule(name)
        except AttributeError:
            continue
        new_size: dict[int, set[int]] = {}
        for pname, p in module._parameters.items():
            old = original._parameters.get(pname)
            if p is None or old is None or p.dim() != old.dim():
                continue
            for before, after in zip(old.shape, p.shape):
                new_size.setdefault(before, set()).add(after)  # unchanged dims too: 64 -> {32, 64} is ambiguous
        for attr, value in list(vars(module).items()):
            if type(value) is not int or attr.startswith("_") or attr.endswith(("_idx", "_id", "_index")):
                continue
            targets = new_size.get(value, ())
            if len(targets) == 1 and value not in targets:
                setattr(module, attr, next(iter(targets)))


def _fix_unit_attributes(small: torch.nn.Module, plan, scale_maybe: bool = False, dense: torch.nn.Module | None = None) -> int:
    """Head counts and widths stored on the module a group is named after, scaled by kept/total (one
    group after another: heads and head_dim both scale a ``split_size``), and for experts those on its
    submodules too (the router's and the experts' counts), scaled from the ``dense`` model's values
    since ``_fix_own_widths`` may have set them already; a module holding a config (read at run time,
    e.g. Phi-3's ``config.num_attention_heads``) gets a :class:`LayerConfig` with its own widths,
    since layers may differ. Returns how many "maybe" attributes it found (scaled only with ``scale_maybe``)."""
    ambiguous = 0
    matched = set()  # (module, attribute) an "equal" rule already set: a later group of that size must not set it again
    for g in plan.groups:
        path, kind = g.name.rpartition(":")[0], g.kind  # (a module's second group of a kind is named "...:channels#2")
        if kind == "hidden" and len(g.keep) != g.size:
            ambiguous += _fix_residual_widths(small, dense or small, g, scale_maybe)
            continue
        rules = SCALED_ATTRIBUTES.get(kind)
        if not rules or not path or len(g.keep) == g.size:
            continue
        try:
            module = small.get_submodule(path)
        except AttributeError:
            continue
        targets = [(module, module)]
        if kind in SUBTREE_KINDS:
            origin = dense.get_submodule(path) if dense is not None else module
            targets += [(m, origin.get_submodule(n)) for n, m in module.named_modules() if n]
        for target, source in targets:
            for rule, names in rules.items():
                for attr in names:
                    value = getattr(source, attr, None)
                    if not isinstance(value, int) or isinstance(value, bool):
                        continue
                    if rule == "equal" and (value != g.size or (id(target), attr) in matched) or value % g.size:
                        continue
                    if rule == "equal":  # (MLA's q_lora_rank and kv_lora_rank: one group each, told apart by size)
                        matched.add((id(target), attr))
                    ambiguous += rule == "maybe"
                    if rule != "maybe" or scale_maybe:
                        setattr(target, attr, value // g.size * len(g.keep))
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and kind in CONFIG_FIELDS:
            if not isinstance(config, LayerConfig):
                config = module.config = LayerConfig(config)
            config.scale(kind, len(g.keep), g.size)
    return ambiguous


# Module attributes that may hold the residual stream's width (an MoE block's ``hidden_dim`` it
# reshapes the tokens by, Llama 4): "maybe", since some attention modules keep heads x head_dim
# under the same name, which hidden pruning leaves whole; the check against the graph decides.
_RESIDUAL_WIDTHS = ("hidden_size", "hidden_dim", "n_embd", "d_model")


def _fix_residual_widths(small: torch.nn.Module, dense: torch.nn.Module, group, scale_maybe: bool) -> int:
    """Set every module's residual-width attribute equal to the dense hidden size to the kept size
    (with ``scale_maybe``); returns how many it found."""
    found = 0
    for name, module in small.named_modules():
        if type(module).__module__.startswith("torch."):
            continue
        try:
            source = dense.get_submodule(name)
        except AttributeError:
            continue
        for attr in _RESIDUAL_WIDTHS:
            value = vars(source).get(attr)
            if type(value) is int and value == group.size:
                found += 1
                if scale_maybe:
                    setattr(module, attr, len(group.keep))
    return found


class LayerConfig:
    """One module's view of the model's config: its own widths (``overrides``), everything else read
    from, and written to, the model's config, so that e.g. ``set_attn_implementation`` still reaches
    the module."""

    def __init__(self, base, overrides: dict | None = None):
        self.__dict__.update(_base=base, _overrides=dict(overrides or {}))

    def scale(self, kind: str, kept: int, total: int) -> None:
        """``_scale_config`` on a scratch copy; the fields it changed become overrides."""
        scratch = copy.deepcopy(self._base)
        for name, value in self._overrides.items():
            setattr(scratch, name, value)
        _scale_config(scratch, kind, kept, total)
        for name in (*CONFIG_FIELDS.get(kind, ()), "head_dim"):
            value = getattr(scratch, name, None)
            if value != getattr(self._base, name, None):
                self._overrides[name] = value

    def __getattr__(self, name):  # only for names not in __dict__
        state = self.__dict__
        if "_overrides" not in state:  # half-built (unpickling)
            raise AttributeError(name)
        return state["_overrides"][name] if name in state["_overrides"] else getattr(state["_base"], name)

    def __setattr__(self, name, value):
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self._base).__name__}, overrides={self._overrides})"


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
        if kept != total:
            _scale_config(config, kind, kept, total)
            for module in small.modules():
                if is_hf_model(module):  # the model classes themselves; their layers are _fix_unit_attributes'
                    for attr in MODEL_COUNTS.get(kind, ()):
                        if type(getattr(module, attr, None)) is int and getattr(module, attr) == total:
                            setattr(module, attr, kept)


def _scale_config(config, kind: str, kept: int, total: int) -> None:
    """Scale the config fields counting units of ``kind``. A config that derives the head size
    (hidden / heads) gets it written down when heads are pruned, so that it stays the same."""
    derived = _derived_head_dim(config) if getattr(config, "head_dim", None) is None else None
    aliases = getattr(config, "attribute_map", {}) or {}
    done = set()  # two names of one field (num_local_experts -> n_routed_experts) scale it once
    for field in CONFIG_FIELDS.get(kind, ()):
        real = aliases.get(field, field)
        if real in done:
            continue
        done.add(real)
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value % total == 0:
            _try_setattr(config, field, value // total * kept)
    if derived is None:
        return
    if kind == "head_dim" and derived == total:
        _try_setattr(config, "head_dim", kept)
    elif kind in ("heads", "query_heads") and _derived_head_dim(config) != derived:
        _try_setattr(config, "head_dim", derived)


def _derived_head_dim(config) -> int | None:
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads and hidden % heads == 0:
        return hidden // heads
    return None


def _try_setattr(config, field: str, value: int) -> None:
    try:
        setattr(config, field, value)
    except (AttributeError, TypeError, ValueError):
        pass  # a derived (read-only) field: it follows the ones it is computed from


def _kept_positions(dg, plan) -> dict[str, list[torch.Tensor | None]]:
    """Per analysed parameter, per dim: the kept positions (None: not pruned)."""
    from .rewrite import AxisMasks

    masks = AxisMasks(dg, plan.leaf_keep(dg))
    return {name: [masks.mask(a).nonzero().flatten() if masks.pruned(a) else None for a in axes]
            for name, axes in dg.params.items()}


def _rescale_norms(small: torch.nn.Module, dense: torch.nn.Module, kept: dict, tolerance: float = 1e-5) -> list[str]:
    """Norms whose 1-D weight was sliced (n -> n' channels) divide by n' at module level, the graph
    by n. For an RMS-type norm ``x * rsqrt(S/n + eps) * g(w)`` that is exact with eps*n/n' and
    g(w') = sqrt(n/n') g(w); g is w or 1 + w (Gemma). Each candidate is checked on a probe against
    the dense norm fed zeros in the removed channels; where none matches (LayerNorm: its mean over
    the kept channels is another number), the module is left alone; their names are returned.
    ``small._graphprune_rescaled`` maps each rescaled weight to (scale, shift) for :func:`graph_weights`."""
    unmatched, rescaled = [], {}
    for name, module in small.named_modules():
        weight = module._parameters.get("weight")
        positions = kept.get(f"{name}.weight" if name else "weight")
        if weight is None or weight.dim() != 1 or not positions or positions[0] is None:
            continue
        try:
            original = dense.get_submodule(name)
        except AttributeError:
            continue
        target = _probe_dense(original, module, positions[0])
        if target is None:
            continue
        n, n_kept = original.weight.shape[0], weight.shape[0]
        c, w = math.sqrt(n / n_kept), weight.detach().double()
        eps_name = next((e for e in _EPS_NAMES if isinstance(getattr(module, e, None), float)), None)
        for scale, shift, eps_factor in ((1.0, 0.0, 1.0), (c, 0.0, n / n_kept), (c, c - 1, n / n_kept)):
            values = scale * w + shift  # the last is c * (1 + w) - 1
            if _matches(module, values, eps_name, eps_factor, *target, tolerance):
                with torch.no_grad():
                    weight.copy_(values.to(weight.dtype))
                if eps_name:
                    setattr(module, eps_name, getattr(module, eps_name) * eps_factor)
                if scale != 1.0:
                    rescaled[f"{name}.weight" if name else "weight"] = (scale, shift)
                break
        else:
            unmatched.append(name)
    small._graphprune_rescaled = rescaled
    return unmatched


def graph_weights(small: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` of the module-level copy (e.g. after fine-tuning it) as the pruned graph holds
    them: rescaled norm weights are mapped back."""
    out = dict(weights)
    for name, (scale, shift) in getattr(small, "_graphprune_rescaled", {}).items():
        if name in out:
            out[name] = (out[name] - shift) / scale
    return out


def _norm_error(small: torch.nn.Module, unmatched: list[str], exc: ModuleApplyError) -> ModuleApplyError:
    more = f" and {len(unmatched) - 2} more" if len(unmatched) > 2 else ""
    error = ModuleApplyError(
        f"the pruned {type(small).__name__} cannot be built at module level: its norms {', '.join(unmatched[:2])}{more} "
        "normalise over pruned channels, and no smaller norm of the same code computes what the graph computes "
        "(a LayerNorm takes its mean over the kept channels, the graph over all of them; an RMSNorm can be "
        f"rescaled, a LayerNorm cannot) [{str(exc).split(':')[0]}]. Fine-tune the pruned graph instead.")
    error.__cause__ = exc
    return error


def _probe_dense(original: torch.nn.Module, module: torch.nn.Module, positions: torch.Tensor) -> tuple | None:
    """(probe, what the graph computes on it), in float64: the dense norm, with the kept weights in
    place, fed the probe in the kept channels and zeros elsewhere, read at the kept channels."""
    n_kept = module.weight.shape[0]
    probe = torch.randn(2, 3, n_kept, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = torch.zeros(2, 3, original.weight.shape[0], dtype=torch.float64)
    full[..., positions] = probe
    try:
        reference = copy.deepcopy(original).double()
        with torch.no_grad():
            for pname, p in module._parameters.items():  # the weight, and e.g. a bias sliced the same way
                if p is not None and p.dim() == 1 and p.shape[0] == n_kept:
                    reference._parameters[pname][positions] = p.detach().double()
            return probe, reference(full)[..., positions]
    except Exception:
        return None  # not a module over the last dim of one tensor: nothing to probe


def _matches(module, weight: torch.Tensor, eps_name, eps_factor: float, probe, expected, tolerance: float) -> bool:
    """Whether ``module`` with this weight (and epsilon scaled by ``eps_factor``) computes ``expected``."""
    trial = copy.deepcopy(module).double()
    with torch.no_grad():
        trial.weight.copy_(weight)
    if eps_name:
        setattr(trial, eps_name, getattr(module, eps_name) * eps_factor)
    try:
        with torch.no_grad():
            got = trial(probe)
    except Exception:
        return False
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    scale = max(expected.abs().max().item(), 1e-12)
    return (got.double() - expected).abs().max().item() / scale <= tolerance


def _keep_batched_experts(small: torch.nn.Module) -> None:
    """Expert weights (3-D parameters) whose widths are not 16-byte aligned in a 2-byte dtype fail
    in the grouped_mm kernel that transformers picks by default. Such a model keeps (or gets) the
    batched_mm kernel, and its config says so, so that a checkpoint reloads with it."""
    config = getattr(small, "config", None)
    if config is None or not callable(getattr(small, "set_experts_implementation", None)):
        return
    if not any(p.dim() == 3 and (p.shape[-1] % GROUPED_MM_ALIGN or p.shape[-2] % GROUPED_MM_ALIGN) for p in small.parameters()):
        return
    current = getattr(config, "_experts_implementation", None)
    if current in (None, "grouped_mm"):
        try:
            small.set_experts_implementation("batched_mm")
        except Exception:
            return  # the class cannot switch: check_equal reports the kernel's error
        current = "batched_mm"
    config.experts_implementation = current  # serialised into config.json; from_pretrained honours it


def _why_not_run(exc: Exception) -> str:
    if "stride divisible by 2" in str(exc):  # view_as_complex on a slice of a projection (DeepSeek-V2's rotary key)
        return ("its code views a slice of a pruned projection as complex numbers, which needs the projection's "
                "kept width to be even (the graph copies the slice first): compile with round_to=2 for a module-level copy.")
    return "its code takes a size from somewhere other than its weights (an attribute or the config)."


def check_equal(small: torch.nn.Module, graph, example_kwargs: dict, trials: int = 2, tolerance: float = 1e-4, seed: int = 0,
                dynamic_shapes: dict | None = None) -> float:
    """Largest relative output difference between ``small`` and the pruned graph; raises above ``tolerance``.
    Inputs vary only in the dims the graph was traced with dynamic (``dynamic_shapes``; default: batch and sequence).

    With 16-bit weights the tolerance is at least two units of their rounding: a rescaled norm
    weight is rounded once more than the graph's."""
    from .api import random_inputs

    dtype = next((p.dtype for p in small.parameters() if p.is_floating_point()), torch.float32)
    if torch.finfo(dtype).bits <= 16:
        tolerance = max(tolerance, 2 * torch.finfo(dtype).eps)
    config = getattr(small, "config", None)
    vocab = getattr(config, "vocab_size", None)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    was_training = small.training
    small.eval()
    try:
        for t in range(trials):
            kwargs = random_inputs(example_kwargs, 2 + t, 5 + 3 * t, gen, vocab, dynamic_shapes)
            with torch.no_grad():
                expected = _tensors(graph(**kwargs))
                try:
                    got = _tensors(small(**kwargs))
                except Exception as exc:
                    raise ModuleApplyError(
                        f"the pruned {type(small).__name__} cannot run at module level ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300]}): {_why_not_run(exc)} Fine-tune the pruned graph instead."
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
            "(e.g. a LayerNorm over pruned channels takes its mean over the kept ones, while the graph "
            "keeps the mean over all of them). Fine-tune the pruned graph instead."
        )
    return worst


def _tensors(out) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
