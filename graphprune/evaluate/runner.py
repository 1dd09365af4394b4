"""One way to get logits from anything evaluation accepts.

``LogitsRunner(model)(input_ids) -> FloatTensor [batch, seq, vocab]`` for an ``nn.Module`` (a
Hugging Face model or any module taking token ids), a :class:`graphprune.CompiledModel`, a traced
``GraphModule`` (``ep.module()``, which wants the exact keyword inputs it was traced with), an
``onnxruntime.InferenceSession`` (an ``input_ids`` input, logits as first output) or an object
wrapping one (``graphprune.runtime.OnnxSession``: anything with ``.session`` or ``.run``).
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from ..errors import GraphpruneError
from ..train import logits_of


def _is_ort_session(obj) -> bool:
    return hasattr(obj, "get_inputs") and hasattr(obj, "run") and hasattr(obj, "get_outputs")


# what graphprune's ONNX export records about the model (an ONNX file has no config.json)
ONNX_FACTS = {"graphprune.max_positions": "max_position_embeddings", "graphprune.vocab_size": "vocab_size"}
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")  # how configs name the limit


def position_limit(config: dict) -> int | None:
    """The model's number of positions, under whichever name its config uses."""
    return next((v for v in (config.get(k) for k in POSITION_KEYS) if isinstance(v, int) and v > 0), None)


def onnx_metadata(model) -> dict[str, str]:
    """The entries an ONNX export of ``model`` records (position limit, vocabulary), from its config."""
    config = _model_config(model)
    values = {**config, "max_position_embeddings": position_limit(config)}  # the limit under any config name
    return {name: str(values[key]) for name, key in ONNX_FACTS.items() if isinstance(values.get(key), int) and values[key] > 0}


def onnx_facts(session) -> dict:
    """The config entries an exported model carries in its metadata (position limit, vocabulary)."""
    try:
        meta = session.get_modelmeta().custom_metadata_map
    except Exception:  # not an onnxruntime session, or one without metadata
        return {}
    return {key: int(meta[name]) for name, key in ONNX_FACTS.items() if str(meta.get(name, "")).isdigit()}


def _model_config(model) -> dict:
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        return config
    if config is not None and hasattr(config, "to_dict"):
        return config.to_dict()
    return {}


class LogitsRunner:
    """Call ``model`` on a batch of token ids and return float logits on the CPU."""

    def __init__(self, model):
        self.model = model
        self._call = None
        self.config: dict = {}
        self.device = torch.device("cpu")
        session = getattr(model, "session", None)
        if _is_ort_session(model) or _is_ort_session(session):
            ort_session = model if _is_ort_session(model) else session
            self._call = self._ort_caller(ort_session)
            self.config = _model_config(model) or onnx_facts(ort_session)
            return
        module = getattr(model, "module", None)
        if module is not None and hasattr(model, "plan") and isinstance(module, torch.nn.Module):
            from ..data import model_inputs

            kwargs = model.example_kwargs
            self.config = dict(model.config or {})
            self.device = _device_of(module)
            self._call = (lambda ids: module(**model_inputs(kwargs, ids))) if kwargs else (lambda ids: module(input_ids=ids))
            return
        if not isinstance(model, torch.nn.Module):
            raise GraphpruneError(
                f"cannot evaluate a {type(model).__name__}: pass an nn.Module, a CompiledModel, a GraphModule "
                "or an onnxruntime.InferenceSession"
            )
        self.config = _model_config(model)
        self.device = _device_of(model)
        self._candidates = _module_callers(model)

    # ------------------------------------------------------------ callers
    @staticmethod
    def _ort_caller(session):
        inputs = session.get_inputs()
        names = [i.name for i in inputs]
        if "input_ids" not in names:
            raise GraphpruneError(f"the ONNX session has no 'input_ids' input (inputs: {names})")

        def call(ids: torch.Tensor):
            feed = {}
            for i in inputs:
                if i.name == "input_ids":
                    feed[i.name] = ids.cpu().numpy().astype(np.int64)
                elif i.name == "position_ids":
                    feed[i.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), tuple(ids.shape)).copy()
                elif "mask" in i.name:
                    dtype = np.bool_ if "bool" in i.type else np.int64
                    feed[i.name] = np.ones(tuple(ids.shape), dtype=dtype)
                elif i.name.startswith("past_key_values."):  # a KV-cache export: an empty past, as its prefill
                    shape = [ids.shape[0] if n == 0 else (d if isinstance(d, int) else 0) for n, d in enumerate(i.shape)]
                    feed[i.name] = np.zeros(shape, dtype=np.float16 if "float16" in i.type else np.float32)
                else:
                    raise GraphpruneError(f"the ONNX session needs an input {i.name!r} that evaluation cannot make")
            return torch.from_numpy(np.asarray(session.run([logits_name], feed)[0]))

        outputs = [o.name for o in session.get_outputs()]
        logits_name = "logits" if "logits" in outputs else outputs[0]

        return call

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        with torch.no_grad():
            if self._call is None:
                self._call = self._first_working(input_ids)
            return logits_of(self._call(input_ids)).float()

    def _first_working(self, ids: torch.Tensor):
        errors = []
        for call in self._candidates:
            try:
                logits_of(call(ids))
                return call
            except GraphpruneError:
                raise
            except Exception as exc:  # try the next calling convention
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        raise GraphpruneError(f"could not call {type(self.model).__name__} on token ids: " + " | ".join(errors))

    # ------------------------------------------------------------ facts
    def max_length(self, default: int | None = None) -> int | None:
        limit = position_limit(self.config)
        return default if limit is None else limit


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _module_callers(model: torch.nn.Module) -> list:
    """Calling conventions to try, most specific first (a traced graph rejects unexpected kwargs)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    callers = []
    if "use_cache" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        callers.append(lambda ids: model(input_ids=ids, use_cache=False))
    callers.append(lambda ids: model(input_ids=ids))
    callers.append(lambda ids: model(ids))
    return callers
