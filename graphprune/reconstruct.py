"""Reconstruction: refit the layers that lose inputs, by least squares on calibration data.

A plan that removes units also removes inputs of the layers that read them: ``down_proj`` loses the
removed MLP channels, ``o_proj`` the removed heads, every projection the removed hidden channels.
Slicing drops those columns of the weight, and the layer's output moves by what they contributed.
Reconstruction refits the kept columns so that, on calibration data, they make up for the removed
ones as well as a linear function of the kept inputs can (ridge regression towards the kept weights):

    W'_K = argmin ‖W·X − W'_K·X_K‖² + λ‖W'_K − W_K‖²  =  W_K + W_R·X_R·X_Kᵀ·(X_K·X_Kᵀ + λ·I)⁻¹

``X`` is the layer's input in the dense model (with the pass's updated weights), ``K``/``R`` its kept
and removed inputs, ``λ = damp ×`` the mean of ``diag(X_K·X_Kᵀ)``. One pass over the calibration data
gathers ``X·Xᵀ`` per input (q/k/v reading one value share it); one linear solve per layer; no gradients. A layer with a bias refits it
too (a constant input). Shapes stay the plan's: only values change, so the result verifies, saves,
exports and fine-tunes like any compiled model.

Why the dense model's inputs, not the pruned model's: fitting the dense output from the *pruned*
model's inputs (so that each layer also chases the errors of the layers before it) was measured
worse than not refitting at all (SmolLM2-135M, Taylor 20% of MLP channels, WikiText-2 validation
perplexity: sliced 70.7; pruned inputs 69.0–72.3 for damp 0.3–0.03; dense inputs 63.0–63.2).

Which ops are such layers is data (``CONTRACTIONS``): an op, where its input and weight are, and
which dim of the weight meets the input's last dim; the weight may come through a transpose (Falcon's
``x @ W.T``). A weight is refit only when it is a parameter that one node reads (a tied embedding is
also the input table). The idea (refitting the remaining
weights on calibration activations after structured pruning) is that of FLAP's bias compensation
and of the layer-wise reconstruction in SlimGPT and ZipLM; the closed form is ordinary ridge regression.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .analysis import DependencyGraph
from .analysis.walk import fetch_attr
from .data import Calibration, as_tokenizer, check_fits, check_size, check_text_source, load_tokenizer, model_inputs
from .data import calibration as as_calibration
from .errors import GraphpruneError
from .masking import insert_masks
from .rewrite import AxisMasks, graph_inputs, rewrite
from .scoring import WeightUpdates, example_kwargs_of

aten = torch.ops.aten


@dataclass(frozen=True)
class Contraction:
    """Where an op's input and weight are; ``weight_dim`` is the weight's dim summed with the input's last."""

    input: int
    weight: int
    weight_dim: int
    bias: int | None = None


CONTRACTIONS: dict = {
    aten.linear.default: Contraction(input=0, weight=1, weight_dim=1, bias=2),  # y = x Wᵀ + b, W [out, in]
    aten.addmm.default: Contraction(input=1, weight=2, weight_dim=0, bias=0),  # y = b + x W, W [in, out] (GPT-2 Conv1D)
    aten.mm.default: Contraction(input=0, weight=1, weight_dim=0),  # y = x W
    aten.matmul.default: Contraction(input=0, weight=1, weight_dim=0),  # y = x W, x [..., in]
}
# a weight may reach the op transposed (Falcon's ``x @ W.T``): these ops swap a 2-D weight's dims
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


@dataclass
class Layer:
    """One layer to refit: its node, weight (and bias) names, and which inputs the plan keeps."""

    node: str
    weight: str
    weight_dim: int
    keep: torch.Tensor  # bool over the input dim
    bias: str | None = None
    source: str = ""  # the node whose value is the layer's input (layers reading one value share statistics)

    @property
    def statistic(self) -> tuple[str, bool]:
        return self.source, self.bias is not None


@dataclass
class Reconstruction:
    """The refit weights (dense shapes, as ``rewrite``'s ``weights``) and how much each layer's error fell."""

    weights: WeightUpdates
    samples: int
    damp: float
    # per layer (its weight's name): relative output error ‖W·X − W'·X_K‖² / ‖W·X‖² with the sliced weights, then refit
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def summary(self) -> dict:
        before = [b for b, _ in self.errors.values()]
        after = [a for _, a in self.errors.values()]
        mean = (lambda v: sum(v) / len(v) if v else 0.0)
        return {"layers": len(self.errors), "samples": self.samples, "damp": self.damp,
                "mean_error_sliced": mean(before), "mean_error_refit": mean(after),
                "errors": {k: {"sliced": b, "refit": a} for k, (b, a) in self.errors.items()}}


def layers_to_refit(dg: DependencyGraph, leaf_keep: dict) -> list[Layer]:
    """Every contraction whose weight loses inputs under the plan, in graph order."""
    masks = AxisMasks(dg, leaf_keep)
    readers: dict[str, int] = {}
    for n in dg.gm.graph.nodes:
        if n.op == "get_attr":
            name = dg.walk.aliases.get(n.target, n.target)
            readers[name] = readers.get(name, 0) + len(n.users)
    out = []
    for n in dg.gm.graph.nodes:
        rule = CONTRACTIONS.get(n.target) if n.op == "call_function" else None
        if rule is None or len(n.args) <= rule.weight or any(n.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
            continue  # addmm's scaled forms are not y = x·W + b
        weight, weight_dim = _param_name(dg, n.args[rule.weight]), rule.weight_dim
        if weight is None and _is_transpose(n.args[rule.weight]):
            weight, weight_dim = _param_name(dg, n.args[rule.weight].args[0]), 1 - rule.weight_dim
        if weight is None or readers.get(weight) != 1 or fetch_attr(dg.gm, weight).dim() != 2:
            continue
        axes = dg.params[weight]
        in_axis, out_axis = axes[weight_dim], axes[1 - weight_dim]
        if not masks.pruned(in_axis) or masks.kept(out_axis) == 0:
            continue
        keep = masks.mask(in_axis).bool()
        if not keep.any():
            continue
        bias = None
        if rule.bias is not None and len(n.args) > rule.bias and isinstance(n.args[rule.bias], fx.Node):
            bias = _param_name(dg, n.args[rule.bias])
            if bias is not None and (readers.get(bias) != 1 or fetch_attr(dg.gm, bias).dim() != 1):
                continue  # a shared bias: refitting it for this layer would change another
        source = n.args[rule.input]
        out.append(Layer(n.name, weight, weight_dim, keep, bias, source.name if isinstance(source, fx.Node) else n.name))
    return out


def _is_transpose(node) -> bool:
    """A view that swaps the two dims of a 2-D tensor, read by one node only."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in TRANSPOSES or len(node.users) != 1:
        return False
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return True


def _param_name(dg: DependencyGraph, node) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    name = dg.walk.aliases.get(node.target, node.target)
    return name if name in dg.params and isinstance(fetch_attr(dg.gm, name), torch.nn.Parameter) else None


class _Stop(Exception):
    pass


class _Capture(fx.Interpreter):
    """Runs the graph and keeps the (flattened) input of the chosen nodes; stops after the last one."""

    def __init__(self, gm, inputs_of: dict[str, int], last: str):
        super().__init__(gm)
        self.inputs_of, self.last, self.seen = inputs_of, last, {}

    def run_node(self, n):
        if n.name in self.inputs_of:
            x = self.env[n.args[self.inputs_of[n.name]]]
            self.seen[n.name] = x.reshape(-1, x.shape[-1])
            if n.name == self.last:
                raise _Stop
        return super().run_node(n)


def _captured(model: fx.GraphModule, layers: list[Layer], kwargs: dict, inputs_of: dict[str, int]) -> dict[str, torch.Tensor]:
    capture = _Capture(model, inputs_of, layers[-1].node)
    try:
        with torch.no_grad():
            capture.run(*graph_inputs(model, kwargs, "calibration batches", "reconstruct"))
    except _Stop:
        pass
    return capture.seen


def _current(dg, weights, name: str) -> torch.Tensor:
    """A parameter's value as the rewrite will read it: the pass's update when there is one."""
    return weights[name] if name in weights else fetch_attr(dg.gm, name)


def _weight_rows(layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's weight as [out, in] in float64 (its bias as one more input column)."""
    w = weight.detach().double()
    if layer.weight_dim == 0:
        w = w.T
    if bias is not None:
        w = torch.cat([w, bias.detach().double().unsqueeze(1)], dim=1)
    return w


def _with_ones(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias else x


def reconstruct_weights(dg: DependencyGraph, plan, calib, *, weights=None, example_kwargs: dict | None = None,
                        damp: float = 0.1, batch_size: int = 8, memory_mib: int = 2048, progress: bool = False) -> Reconstruction:
    """Refit every layer that loses inputs under ``plan`` (see the module docstring).

    ``calib`` is a :class:`graphprune.data.Calibration` (or token ids [n, seq]); ``weights`` the pass's
    updated dense weights (merged LoRA), which the refit starts from. The statistics of at most
    ``memory_mib`` worth of layers are gathered per pass over the calibration data (a model whose
    layers need more takes several passes). Returns the new weights, dense-shaped, merged over ``weights``.
    """
    check_numbers(damp, batch_size, memory_mib)
    calib = as_calibration(calib)
    weights = WeightUpdates(weights)  # the pass's updates, some computed only when read (LoRAPrune's W0 + s·B·A)
    leaf_keep = plan.leaf_keep(dg)
    layers = layers_to_refit(dg, leaf_keep)
    result = Reconstruction(weights=WeightUpdates(weights), samples=len(calib), damp=float(damp))
    if not layers:
        return result
    if example_kwargs is None:
        device = next((p.device for p in dg.gm.parameters()), torch.device("cpu"))
        example_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example_kwargs_of(dg.gm).items()}
    dense = insert_masks(dg, [], weights=weights).module  # a copy with the pass's weights (shares the others)
    for chunk in _chunks(layers, memory_mib):
        grams = _statistics(dense, chunk, calib, example_kwargs, batch_size, progress)
        for layer in chunk:
            # read once: a pass's deferred update (LoRAPrune's W0 + s·B·A) is computed on every read
            weight = _current(dg, weights, layer.weight)
            bias = _current(dg, weights, layer.bias) if layer.bias is not None else None
            new, before, after = _refit(_weight_rows(layer, weight, bias), layer, grams[layer.statistic], damp, weight.dtype)
            result.errors[layer.weight] = (before, after)
            _store(result.weights, layer, new, weight, bias)
    return result


def _chunks(layers: list[Layer], memory_mib: int):
    """Consecutive layers whose float64 Gram matrices (one per input they read) fit in ``memory_mib``, at least one per chunk."""
    chunk, used, seen = [], 0.0, set()
    for layer in layers:
        n_in = layer.keep.numel() + (layer.bias is not None)
        size = 0.0 if layer.statistic in seen else 2 * 8 * n_in * n_in / 2**20  # the sum and one batch's product
        if chunk and size and used + size > memory_mib:
            yield chunk
            chunk, used, seen = [], 0.0, set()
        chunk.append(layer)
        seen.add(layer.statistic)
        used += size
    if chunk:
        yield chunk


def _statistics(model, chunk, calib, example_kwargs, batch_size, progress) -> dict[tuple, torch.Tensor]:
    """Per input a layer reads: ``X·Xᵀ`` (a column of ones appended for a bias), in float64."""
    inputs_of = {}
    for layer in chunk:
        node = next(n for n in model.graph.nodes if n.name == layer.node)
        inputs_of[layer.node] = CONTRACTIONS[node.target].input
    grams: dict[tuple, torch.Tensor] = {}
    bar = tqdm(total=len(calib), desc="reconstruct", disable=not progress, leave=False)
    try:
        for ids in calib.batches(batch_size):
            seen = _captured(model, chunk, model_inputs(example_kwargs, ids), inputs_of)
            done = set()
            for layer in chunk:
                if layer.statistic in done:
                    continue
                done.add(layer.statistic)
                x = _with_ones(seen[layer.node].double(), layer.bias is not None)
                gram = x.T @ x
                grams[layer.statistic] = gram if layer.statistic not in grams else grams[layer.statistic].add_(gram)
            bar.update(ids.shape[0])
    finally:
        bar.close()
    for layer in chunk:
        if not torch.isfinite(grams[layer.statistic]).all():
            raise GraphpruneError(f"reconstruct: the inputs of {layer.weight!r} are not finite on the calibration data "
                                  "(fp16 overflow?); nothing was refit")
    return grams


def _refit(w: torch.Tensor, layer: Layer, gram: torch.Tensor, damp: float,
           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float, float]:
    """(refit kept columns [out, kept(+1)], relative error with the sliced weight, relative error refit), the
    errors of the weights as stored in ``dtype`` (a half-precision model's refit loses some of its gain to rounding)."""
    gram = gram.to(w.device)  # a pass may keep its updated weights elsewhere (offloaded)
    cols = layer.keep.to(w.device)
    if layer.bias is not None:  # the bias is a kept column of a constant input
        cols = torch.cat([cols, cols.new_ones(1)])
    xx, xxk, xkxk = gram, gram[:, cols], gram[cols][:, cols]
    w_k = w[:, cols]
    reg = damp * xkxk.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(xkxk.shape[0], dtype=xkxk.dtype, device=xkxk.device)
    rhs = w @ xxk + reg * w_k  # = W_K (X_K X_Kᵀ + λ) + W_R X_R X_Kᵀ
    new = torch.linalg.solve(xkxk + reg * eye, rhs.T).T

    def error(v: torch.Tensor) -> float:  # ‖W·X − V·X_K‖² from the Gram matrix
        target = (w @ xx * w).sum()
        e = target - 2 * (w @ xxk * v).sum() + (v @ xkxk * v).sum()
        return float(e.clamp_min(0) / target.clamp_min(1e-30))

    return new, error(w_k), error(new.to(dtype).double())


def _store(weights, layer: Layer, new: torch.Tensor, old: torch.Tensor, bias_old: torch.Tensor | None) -> None:
    """Write the refit columns into dense-shaped copies of the weight (and bias) the refit started from."""
    if bias_old is not None:
        weights.set(layer.bias, new[:, -1].to(bias_old.device, bias_old.dtype).detach().clone())
        new = new[:, :-1]
    rows = old.detach().clone()
    if layer.weight_dim == 0:
        rows = rows.T
    rows[:, layer.keep.to(rows.device)] = new.to(rows.device, rows.dtype)
    weights.set(layer.weight, (rows.T if layer.weight_dim == 0 else rows).contiguous())


# ================================================================ public entry points
OPTIONS = ("calib", "n_samples", "damp", "batch_size", "memory_mib")  # calib: other text than the scoring's
# windows of calibration text: more than the scoring passes' default 16, since a layer's statistics are
# width² numbers (SmolLM2, Taylor 20%, validation PPL 70.7 sliced: 32 windows 65.0, 128 63.9, 256 63.0)
DEFAULT_SAMPLES = 128


def check_numbers(damp=0.1, batch_size: int = 8, memory_mib: int = 2048, n_samples: int = DEFAULT_SAMPLES) -> None:
    """Reconstruction's numeric options, checked before any tracing or scoring."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise GraphpruneError(f"reconstruct: damp must be a positive number, got {damp!r}")
    check_size(batch_size, "reconstruct: batch_size")
    check_size(n_samples, "reconstruct: n_samples")
    check_size(memory_mib, "reconstruct: memory_mib", 0)


def reconstruct_options(value) -> dict | None:
    """``compile``'s ``reconstruct=``: False/None (off), True (defaults) or a dict of ``OPTIONS`` (checked)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(OPTIONS))
        if unknown:
            raise GraphpruneError(f"reconstruct: unknown option(s) {unknown}; the options are {list(OPTIONS)}")
        check_numbers(**{k: v for k, v in value.items() if k != "calib"})
        return {k: v for k, v in value.items() if not (k == "calib" and v is None)}  # None: the scoring's
    raise GraphpruneError(f"reconstruct must be True, False or a dict of {list(OPTIONS)}, got {type(value).__name__}")


def reconstruction_data(model, calib, tokenizer, n_samples: int | None, seq_len: int, seed: int):
    """``calib`` as calibration windows, checked against ``model`` (when known) as compile checks its own.

    ``n_samples`` (None: ``DEFAULT_SAMPLES``) windows are drawn from text or a 1-D token stream; ready
    windows (a ``Calibration``, 2-D token ids) are used as they are, with a warning if ``n_samples`` asked otherwise.
    """
    if calib is None:
        raise GraphpruneError("reconstruct refits layers on calibration data: pass calib=... (a corpus name, texts or token ids)")
    ready = calib.input_ids if isinstance(calib, Calibration) else calib if isinstance(calib, torch.Tensor) and calib.dim() == 2 else None
    if ready is not None and n_samples is not None and n_samples != len(ready):
        warnings.warn(f"graphprune: reconstruct uses the {len(ready)} calibration windows given, not n_samples={n_samples}: "
                      "pass text or a 1-D token stream to draw windows", stacklevel=3)
    n_samples = DEFAULT_SAMPLES if n_samples is None else n_samples
    if isinstance(calib, Calibration):
        return calib
    if isinstance(calib, (str, os.PathLike)):
        check_text_source(str(calib))
    if model is not None:
        check_fits(model, calib, seq_len, "calib")
    tokenizer = as_tokenizer(tokenizer)
    if tokenizer is None and not isinstance(calib, torch.Tensor) and not hasattr(calib, "input_ids"):
        if model is None:
            raise GraphpruneError("reconstruct: text calibration data needs tokenizer=")
        tokenizer = load_tokenizer(model)
    return as_calibration(calib, tokenizer, n_samples, seq_len, seed)


def reconstruct(compiled, calib, *, tokenizer=None, n_samples: int | None = None, seq_len: int = 128, seed: int = 0,
                damp: float = 0.1, batch_size: int = 8, memory_mib: int = 2048, progress: bool = True):
    """A copy of ``compiled`` whose layers that lost inputs are refit on ``calib`` (see the module docstring).

    ``calib`` is what ``compile`` takes (a corpus name, a text file, a Dataset, strings or token ids),
    drawn as ``n_samples`` (default 128) windows of ``seq_len`` tokens with ``seed``. ``compile(..., calib=...,
    reconstruct=True)`` does the same before its rewrite. Needs the dense model's analysis: call it on
    the result of ``compile``, not ``load``; ``compiled`` itself is not changed.
    """
    from .api import check_cut_from_dense  # api imports this module

    check_cut_from_dense(compiled, "reconstruct", "refits a pruned model against the dense one it was cut from")
    if compiled.report is not None and compiled.report.reconstruction.get("layers"):
        raise GraphpruneError("this model's layers are refit already (compile(..., reconstruct=...) or reconstruct())")
    data = reconstruction_data(compiled.source, calib, tokenizer, n_samples, seq_len, seed)
    result = reconstruct_weights(compiled.dg, compiled.plan, data, weights=compiled.weights, example_kwargs=compiled.example_kwargs,
                                 damp=damp, batch_size=batch_size, memory_mib=memory_mib, progress=progress)
    module = rewrite(compiled.dg, compiled.plan.leaf_keep(compiled.dg), weights=result.weights)
    report = dataclasses.replace(compiled.report, reconstruction=result.summary()) if compiled.report is not None else None
    return dataclasses.replace(compiled, module=module, weights=result.weights, report=report)


__all__ = ["CONTRACTIONS", "Contraction", "DEFAULT_SAMPLES", "Layer", "OPTIONS", "Reconstruction", "layers_to_refit",
           "reconstruct", "reconstruct_options", "reconstruct_weights", "reconstruction_data"]
