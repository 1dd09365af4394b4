"""ONNX Runtime inference: a session on the best available device, and incremental generation.

``OnnxSession.open(path)`` picks ``CUDAExecutionProvider`` when ONNX Runtime offers it (install
``graphprune[gpu]`` for ``onnxruntime-gpu``) and the session really starts on it, else the CPU, and
says which. ``generate(session, input_ids)`` decodes greedily or by sampling; with a model exported
with ``cache=True`` it feeds each step's present key/values back as the next step's past (bound on
the device with IO binding on CUDA, so the cache never travels through host memory).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import GraphpruneError

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def choose_provider(provider: str = "auto") -> tuple[str, str]:
    """(provider, why): CUDA when ONNX Runtime was built with it, else CPU; or the one asked for."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider != "auto":
        if provider not in available:
            raise GraphpruneError(f"ONNX Runtime has no {provider} here (available: {', '.join(available)})")
        return provider, "asked for"
    if CUDA in available:
        return CUDA, "CUDA provider available"
    if not _gpu_visible():
        return CPU, "no GPU here"
    return CPU, "no CUDAExecutionProvider in this onnxruntime build (pip install 'graphprune[gpu]' for onnxruntime-gpu)"


def _gpu_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


_ANNOUNCED: set = set()  # (provider, reason) already said in this process: a loop of opens says it once


@dataclass
class OnnxSession:
    """An ONNX Runtime session plus what ``generate`` needs to know about the model's inputs."""

    session: object  # onnxruntime.InferenceSession
    provider: str
    path: Path
    reason: str = ""
    input_types: dict = field(default_factory=dict)  # name -> numpy dtype
    input_shapes: dict = field(default_factory=dict)  # name -> shape (ints for static dims)

    @classmethod
    def open(cls, path: str | os.PathLike, provider: str = "auto", *, optimization: str = "all",
             threads: int | None = None, quiet: bool = False) -> "OnnxSession":
        """Start a session on ``provider`` (``"auto"``: CUDA if possible, else CPU) and report the choice.

        ``optimization``: ONNX Runtime graph optimisation level (``"none"``, ``"basic"``,
        ``"extended"``, ``"all"``: constant folding, node fusions, layout changes).
        ``threads``: intra-op threads (default: ONNX Runtime's choice).
        """
        import onnxruntime as ort

        path = Path(path)
        if not path.exists():
            raise GraphpruneError(f"no ONNX model at {path}")
        if optimization not in _LEVELS:
            raise GraphpruneError(f"optimization must be one of {list(_LEVELS)}, got {optimization!r}")
        provider, reason = choose_provider(provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
        if threads:
            options.intra_op_num_threads = threads
        providers = [provider] + ([CPU] if provider != CPU else [])
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:
            raise GraphpruneError(f"ONNX Runtime could not load {path}: {str(exc).strip().splitlines()[0][:300]}") from exc
        used = session.get_providers()[0]
        if used != provider:  # e.g. onnxruntime-gpu without a usable CUDA device
            reason = f"{provider} could not start; fell back"
        out = cls(session, used, path, reason,
                  {i.name: _NP_TYPES.get(i.type, np.float32) for i in session.get_inputs()},
                  {i.name: list(i.shape) for i in session.get_inputs()})
        if not quiet and (used, out.reason) not in _ANNOUNCED:
            _ANNOUNCED.add((used, out.reason))
            print(f"graphprune: ONNX Runtime runs {path.name} on {used} ({out.reason})", file=sys.stderr)
        return out

    # ------------------------------------------------------------ model facts
    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def facts(self) -> dict:
        """Config entries the export recorded: ``max_position_embeddings``, ``vocab_size`` (when known)."""
        from .evaluate.runner import onnx_facts

        facts = onnx_facts(self.session)
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if "vocab_size" not in facts and logits is not None and isinstance(logits.shape[-1], int):
            facts["vocab_size"] = logits.shape[-1]  # a static last dim of the logits is the vocabulary
        return facts

    @property
    def has_cache(self) -> bool:
        return any(n.startswith("past_key_values.") for n in self.input_types)

    @property
    def num_layers(self) -> int:
        return sum(1 for n in self.input_types if n.startswith("past_key_values.") and n.endswith(".key"))

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past key/values of length 0 for every layer (each with its own pruned head count)."""
        out = {}
        for name, shape in self.input_shapes.items():
            if name.startswith("past_key_values."):
                heads, head_dim = shape[1], shape[3]
                if not isinstance(heads, int) or not isinstance(head_dim, int):
                    raise GraphpruneError(f"{name} has no static head count/size in {self.path.name}: {shape}")
                out[name] = np.zeros((batch, heads, 0, head_dim), dtype=self.input_types[name])
        return out

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Run once on host arrays (torch tensors are converted); returns outputs by name."""
        feeds = {k: _numpy(v, self.input_types.get(k)) for k, v in feeds.items() if k in self.input_types}
        return dict(zip(self.output_names, self.session.run(None, feeds)))

    def __call__(self, **feeds) -> dict[str, np.ndarray]:
        return self.run(feeds)

    def __repr__(self) -> str:
        kind = f"KV cache, {self.num_layers} layers" if self.has_cache else "no KV cache"
        return f"OnnxSession({self.path.name}, {self.provider}, {kind})"


# Sizes given to a model's named dynamic dims by random_feeds, in order of first appearance: all
# different, so a dim that is wrongly tied to another shows up as a shape error.
_PROBE_SIZES = (2, 5, 3, 4, 6, 7)


def random_feeds(session: OnnxSession, seed: int = 0) -> dict[str, np.ndarray]:
    """A random input for every model input: ``input_ids`` below the vocabulary size (the logits'
    last dim), other integer inputs 1 (a valid mask, token type and position), floats N(0, 1)
    (KV-cache inputs get a past of one of the probe sizes). Dims with the same name get the same size."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    vocab = next((o.shape[-1] for o in session.session.get_outputs()
                  if o.name == "logits" and o.shape and isinstance(o.shape[-1], int)), 2)
    feeds = {}
    for name, shape in session.input_shapes.items():
        dims = []
        for d in shape:
            if not isinstance(d, int):  # a named (or unnamed: None) dynamic dim
                d = sizes.setdefault(str(d), _PROBE_SIZES[len(sizes) % len(_PROBE_SIZES)])
            dims.append(d)
        dtype = session.input_types[name]
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif name == "input_ids":
            feeds[name] = rng.integers(0, vocab, dims).astype(dtype)
        else:
            feeds[name] = np.ones(dims, dtype=dtype)
    return feeds


def _numpy(value, dtype=None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    value = np.asarray(value)
    return value.astype(dtype, copy=False) if dtype is not None else value


# ================================================================ generation
@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (``do_sample=False``) or sampled with temperature/top-k/top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.do_sample:
            return  # greedy decoding reads none of them (temperature=0 is a common way to say greedy)
        if self.temperature <= 0 or not (0 < self.top_p <= 1) or self.top_k < 0:
            raise GraphpruneError(f"invalid sampling settings {self}: need temperature > 0, 0 < top_p <= 1, top_k >= 0")

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Next token per row of ``logits`` [batch, vocab]."""
        if not self.do_sample:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(z, axis=-1)[:, -min(self.top_k, z.shape[-1])][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            drop = np.cumsum(sorted_p, -1) - sorted_p >= self.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0
            p = np.zeros_like(p)
            np.put_along_axis(p, order, sorted_p, -1)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def generate(
    session: OnnxSession | str | os.PathLike,
    input_ids,
    max_new_tokens: int = 20,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    io_binding: bool | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` [batch, prompt] by up to ``max_new_tokens`` tokens; returns [batch, prompt + new].

    ``input_ids``: a tensor or array, a list of equal-length lists, or a tokenizer's output without
    padding. All prompts in a batch have the same length (there is no padding mask: padded or ragged
    prompts are refused). Ids outside the vocabulary, and a prompt + ``max_new_tokens`` longer than
    the model's positions, are refused when the export recorded them (``OnnxSession.facts``).
    Greedy by default; ``do_sample=True`` samples with ``temperature``, ``top_k``, ``top_p`` (seeded
    by ``seed``). Rows that produced ``eos_token_id`` are padded with it; generation stops when
    every row has. A model exported
    with ``cache=True`` decodes incrementally (prefill once, then one token per step); one without
    a cache is re-run on the whole sequence at each step. ``io_binding`` (default: on CUDA) keeps
    the cache on the device between steps.
    """
    from .data import check_token_ids

    if isinstance(session, torch.nn.Module) or hasattr(session, "plan"):
        raise GraphpruneError(f"generate runs an ONNX model, not a {type(session).__name__}: export it first "
                              "(compiled.export_onnx(path, cache=True)), or use compiled.to_hf().generate(...)")
    if not isinstance(session, OnnxSession):
        session = OnnxSession.open(session)
    if max_new_tokens < 0:
        raise GraphpruneError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = _prompt_ids(input_ids)
    facts = session.facts
    vocab, limit = facts.get("vocab_size"), facts.get("max_position_embeddings")
    check_token_ids(torch.from_numpy(ids), vocab, "input_ids")
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise GraphpruneError(f"a prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                              f"limit of {limit} positions")
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    rng = np.random.default_rng(seed)
    if not session.has_cache:
        warnings.warn(f"{session.path.name} has no KV-cache inputs: generate() re-runs the whole sequence at "
                      "every step; export with cache=True for incremental decoding", stacklevel=2)
        steps = _UncachedSteps(session, ids)
    elif io_binding if io_binding is not None else session.on_cuda:
        steps = _BoundSteps(session, ids)
    else:
        steps = _HostSteps(session, ids)
    out = [ids]
    done = np.zeros(ids.shape[0], dtype=bool)
    logits = steps.step(None) if max_new_tokens else None
    for i in range(max_new_tokens):
        token = sampling.pick(logits, rng)
        if eos_token_id is not None:
            token = np.where(done, eos_token_id, token)
            done |= token == eos_token_id
        out.append(token[:, None].astype(np.int64))
        if i + 1 == max_new_tokens or (eos_token_id is not None and done.all()):
            break
        logits = steps.step(out[-1])
    return torch.from_numpy(np.concatenate(out, axis=1))


def _prompt_ids(input_ids) -> np.ndarray:
    """[batch, prompt] int64 ids from a tensor, an array, a list of equal-length lists, or a tokenizer's
    output (whose attention mask must be all ones: generate has no padding mask)."""
    if hasattr(input_ids, "keys") and "input_ids" in input_ids:  # a BatchEncoding or a dict
        mask = input_ids.get("attention_mask")
        if mask is not None and not _numpy(mask).all():
            raise GraphpruneError("the prompts are padded (the attention mask has zeros), and generate has no padding "
                                  "mask: give same-length prompts, or use compiled.to_hf().generate(**batch)")
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray, torch.Tensor)):
        lengths = sorted({len(row) for row in input_ids})
        if len(lengths) > 1:
            raise GraphpruneError(f"prompts of different lengths {lengths}: generate has no padding mask; give "
                                  "same-length prompts (or one at a time)")
    try:
        ids = _numpy(input_ids)
    except (TypeError, ValueError) as exc:
        raise GraphpruneError(f"input_ids must be token ids [batch, prompt_len], got {type(input_ids).__name__}") from exc
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0:
        raise GraphpruneError(f"input_ids must be [batch, prompt_len] with batch, prompt_len >= 1, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise GraphpruneError(f"input_ids must be integer token ids, got {ids.dtype}")
    return ids.astype(np.int64)


class _UncachedSteps:
    """No cache: the whole sequence is run again at each step."""

    def __init__(self, session: OnnxSession, ids: np.ndarray):
        self.session, self.ids = session, ids

    def step(self, token: np.ndarray | None) -> np.ndarray:
        """Next-token logits [batch, vocab] after appending ``token`` (None: the prompt)."""
        if token is not None:
            self.ids = np.concatenate([self.ids, token], 1)
        out = self.session.run({"input_ids": self.ids})
        return out.get("logits", next(iter(out.values())))[:, -1]  # a plain module's only output


class _HostSteps:
    """Cached decoding with host arrays: each step's presents become the next step's past."""

    def __init__(self, session: OnnxSession, ids: np.ndarray):
        self.session, self.feeds = session, {"input_ids": ids, **session.empty_past(ids.shape[0])}

    def step(self, token: np.ndarray | None) -> np.ndarray:
        if token is not None:
            self.feeds["input_ids"] = token
        out = self.session.run(self.feeds)
        for name, value in out.items():
            if name.startswith("present."):
                self.feeds["past_key_values." + name[len("present."):]] = value
        return out["logits"][:, -1]


class _BoundSteps:
    """Cached decoding with IO binding: the cache stays as OrtValues on the session's device."""

    def __init__(self, session: OnnxSession, ids: np.ndarray):
        import onnxruntime as ort

        self.ort, self.session = ort, session
        self.device = "cuda" if session.on_cuda else "cpu"
        self.inputs = {"input_ids": self._value(ids)}
        self.inputs.update({k: self._value(v) for k, v in session.empty_past(ids.shape[0]).items()})

    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def step(self, token: np.ndarray | None) -> np.ndarray:
        if token is not None:
            self.inputs["input_ids"] = self._value(token)
        binding = self.session.session.io_binding()
        for name, value in self.inputs.items():
            binding.bind_ortvalue_input(name, value)
        names = self.session.output_names
        for name in names:
            binding.bind_output(name, self.device)
        self.session.session.run_with_iobinding(binding)
        outputs = dict(zip(names, binding.get_outputs()))
        for name, value in outputs.items():
            if name.startswith("present."):
                self.inputs["past_key_values." + name[len("present."):]] = value
        return outputs["logits"].numpy()[:, -1]  # only the logits come back to the host
