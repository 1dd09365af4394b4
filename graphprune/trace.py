"""Trace a model into an ATen graph with ``torch.export`` (dynamic batch and sequence length)."""
from __future__ import annotations

import inspect
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram

from .errors import TraceError
from .inline_blocks import inline_grad_blocks


@dataclass
class Traced:
    """A traced model: the call-compatible graph plus what is needed to call and re-trace it."""

    module: fx.GraphModule  # ``ep.module()``: called like the original model, original parameter names
    program: ExportedProgram
    example_kwargs: dict
    dynamic_shapes: dict | None
    model_class: str
    config: dict | None = None  # the Hugging Face config as a dict, when there is one
    input_names: list[str] = field(default_factory=list)

    def example_call(self):
        return self.module(**self.example_kwargs)


def is_hf_model(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "vocab_size") and hasattr(config, "to_dict")


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def hf_example_kwargs(model: torch.nn.Module, batch: int = 2, seq: int = 16) -> dict:
    """A synthetic input for a Hugging Face model: random token ids, no KV cache."""
    config = model.config
    seq = min(seq, getattr(config, "max_position_embeddings", seq) or seq)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(_device(model))
    kwargs = {"input_ids": ids}
    if _accepts_use_cache(model):
        kwargs["use_cache"] = False
    return kwargs


def _dynamic_shapes(model: torch.nn.Module, kwargs: dict) -> dict:
    return dynamic_shapes_for(kwargs, model.config.to_dict() if is_hf_model(model) else None)


POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")  # (MPT: max_seq_len)


def position_limit(config: dict | None) -> int | None:
    """The longest sequence the model's config allows, if it says."""
    limit = next((config[k] for k in POSITION_LIMIT_KEYS if (config or {}).get(k)), None)
    return limit if isinstance(limit, int) and limit > 2 else None


def dynamic_shapes_for(example_kwargs: dict, config: dict | None, below_limit: bool = False,
                       limit: int | None = None) -> dict:
    """Dims 0 (batch) and 1 (sequence, up to ``limit`` or else the model's position limit, or one less
    with ``below_limit``) of every tensor input are dynamic."""
    limit = limit or position_limit(config)
    batch, seq = Dim("batch"), (Dim("seq", max=limit - below_limit) if limit else Dim("seq"))
    shapes = {}
    for name, value in example_kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            shapes[name] = {0: batch, 1: seq}
        elif isinstance(value, torch.Tensor) and value.dim() == 1:
            shapes[name] = {0: batch}
        else:
            shapes[name] = None
    return shapes


def _pins_sequence(exc: Exception) -> bool:
    """torch.export's verdict that the dim we marked as the sequence cannot vary."""
    text = str(exc)  # a guard such as seq > 4 (shape-dependent control flow) is no reason to fix the length
    return "Constraints violated (seq)" in text and "specialized it to be a constant" in text


def _bounded_at_limit(exc: Exception, limit: int | None) -> bool:
    """torch.export's verdict that the sequence range we declared (up to the position limit) is one too long."""
    if limit is None:
        return False
    text = str(exc)
    guards = (f"!= {limit}", f"<= {limit - 1}", f"< {limit}")  # the guard torch.export generated, as it prints it
    return "Constraints violated (seq)" in text and any(g in text for g in guards)


def _sequence_bound(exc: Exception) -> int | None:
    """The longest sequence torch.export found the code can take, from its suggested fix
    (``seq = Dim('seq', max=64)``: code that slices a buffer of 64 positions)."""
    text = str(exc)
    found = re.search(r"seq = Dim\('seq'(?:, min=\d+)?, max=(\d+)\)", text)
    return int(found.group(1)) if "Constraints violated (seq)" in text and found else None


def export_graph(module: torch.nn.Module, kwargs: dict, dynamic_shapes) -> ExportedProgram:
    """Re-export a graph graphprune traced (a pruned one, a rewritten one): a guard torch.export could not
    prove when tracing the model became a runtime check then, so it does here too."""
    return torch.export.export(module, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False,
                               prefer_deferred_runtime_asserts_over_guards=True)


def _unproven_guard(exc: Exception) -> str | None:
    """The guard torch.export generated and could not prove over the declared range, if that is why it failed."""
    found = re.search(r"satisfy the generated guard (.+?)\.?$", str(exc), re.MULTILINE)
    return found.group(1).strip() if "Constraints violated" in str(exc) and found else None


def batch_only(shapes: dict) -> dict:
    """The same dynamic shapes with every dim but the batch (dim 0) static."""
    return {name: ({0: dims[0]} if dims and 0 in dims else dims) for name, dims in shapes.items()}


def _accepts_use_cache(model: torch.nn.Module) -> bool:
    # wrappers (peft's PeftModel) forward **kwargs to the model they wrap
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "use_cache" in inspect.signature(inner.forward).parameters


TRACEABLE_EXPERTS = "batched_mm"


@contextmanager
def traceable_experts(model: torch.nn.Module):
    """Run mixture-of-experts layers through transformers' ``batched_mm`` kernel while tracing.

    The other kernels do not give a graph the analysis can read: ``grouped_mm`` (the default) is one
    opaque custom op, which freezes the experts and the hidden size around it, and ``eager`` loops
    over the experts that routing picked (data-dependent control flow). ``batched_mm`` computes the
    same function with an index by the router's choice and a batched matmul. The setting of every
    (sub)model is restored afterwards, so the caller's model is unchanged.
    """
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if not callable(can_set) or not can_set() or getattr(model.config, "_experts_implementation", None) == TRACEABLE_EXPERTS:
        yield
        return
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_dict")}
    saved = [(c, c.__dict__.get("_experts_implementation_internal")) for c in configs.values()]
    try:
        model.set_experts_implementation(TRACEABLE_EXPERTS)
        yield
    finally:
        for config, value in saved:
            config._experts_implementation_internal = value


def trace(
    model: torch.nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    dynamic_shapes: dict | None = None,
) -> Traced:
    """Trace ``model`` with ``torch.export`` into an ATen graph.

    Hugging Face causal LMs need no example input (one is made from ``model.config``); any other
    module needs ``example_inputs`` (positional) or ``example_kwargs``. Batch and sequence length
    (dims 0 and 1 of each input) are dynamic; for a module that is not a Hugging Face model and does
    not trace so (its dim 1 is features, or a fixed length), only the batch is. The model is not
    modified (its train/eval mode is restored).
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "get_base_model"):  # peft wrapper: trace the model holding the LoRA layers
        model = model.get_base_model()
    kwargs = dict(example_kwargs or {})
    if example_inputs is not None:
        names = [p for p in inspect.signature(model.forward).parameters if p not in ("self",)]
        example_inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        kwargs.update(dict(zip(names, example_inputs)))
    if kwargs and is_hf_model(model) and _accepts_use_cache(model):
        kwargs.setdefault("use_cache", False)  # no KV cache in the traced graph
    if not kwargs:
        if not is_hf_model(model):
            raise TraceError(
                f"{type(model).__name__} is not a Hugging Face model, so graphprune cannot invent its input: "
                "pass example_inputs=(tensor, ...) or example_kwargs={...}"
            )
        kwargs = hf_example_kwargs(model)
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] < 2:
            raise TraceError(f"example input {name!r} has batch size {value.shape[0]}: use at least 2 so the batch dim stays dynamic")
    shapes = dynamic_shapes if dynamic_shapes is not None else _dynamic_shapes(model, kwargs)
    was_training = model.training
    model.eval()
    try:
        with traceable_experts(model):
            try:
                program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
            except Exception as exc:
                # dim 1 of a module we know nothing about may be features, not a sequence (an MLP over
                # [batch, features]): torch.export then finds it fixed, and only the batch can vary
                config = model.config.to_dict() if is_hf_model(model) else None
                if dynamic_shapes is None and config is not None and _bounded_at_limit(exc, position_limit(config)):
                    # code that slices a position-sized buffer (GPT-Neo's causal mask) makes torch.export
                    # guard seq != limit: one token less is what such a model can be traced for
                    shapes = dynamic_shapes_for(kwargs, config, below_limit=True)
                    program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
                    warnings.warn(f"graphprune: {type(model).__name__} traces only below its position limit: the "
                                  f"graph takes sequences of up to {position_limit(config) - 1} tokens", stacklevel=2)
                elif dynamic_shapes is None and config is None and (bound := _sequence_bound(exc)):
                    # a module without a config whose code has a position limit of its own (a buffer of
                    # precomputed rotary angles or positions): traced up to that limit
                    shapes = dynamic_shapes_for(kwargs, None, limit=bound)
                    program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
                    warnings.warn(f"graphprune: {type(model).__name__} takes sequences of up to {bound} tokens (a limit "
                                  "torch.export found in its code): the graph is traced for those", stacklevel=2)
                elif _unproven_guard(exc) and not _pins_sequence(exc):
                    # a guard torch.export cannot prove for every length, though it holds (Aria's experts:
                    # s * min(64, 64 s) == 64 s): checked when the graph runs instead
                    program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False,
                                                  prefer_deferred_runtime_asserts_over_guards=True)
                    warnings.warn(f"graphprune: {type(model).__name__}: torch.export could not prove {_unproven_guard(exc)} "
                                  "for every input size; the graph checks it when it runs", stacklevel=2)
                elif (dynamic_shapes is not None or is_hf_model(model) or shapes == batch_only(shapes)
                        or not _pins_sequence(exc)):
                    raise
                else:
                    shapes = batch_only(shapes)
                    program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
                    fixed = {n: tuple(v.shape[1:]) for n, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() >= 2}
                    warnings.warn(f"graphprune: {type(model).__name__} fixes dim 1 of its inputs ({fixed}): traced with "
                                  "only the batch dynamic, so other lengths there will not run", stacklevel=2)
    except Exception as exc:  # torch.export raises many types; all mean "not traceable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {first[:500]}. "
            "Check for data-dependent Python control flow or unsupported inputs, and pass example_kwargs "
            "(or example_inputs) matching forward()."
        ) from exc
    finally:
        model.train(was_training)
    config = model.config.to_dict() if is_hf_model(model) else None
    return Traced(
        module=inline_grad_blocks(program.module()),
        program=program,
        example_kwargs=kwargs,
        dynamic_shapes=shapes,
        model_class=type(model).__name__,
        config=config,
        input_names=list(kwargs),
    )
