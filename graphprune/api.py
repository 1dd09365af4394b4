"""The one verb: ``graphprune.compile(model, ratio)`` — trace, analyse, score, plan, rewrite.

Also ``load`` (a saved compiled model) and ``verify`` (pruned graph == masked dense graph).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from .analysis import DEFAULT_KINDS, DependencyGraph, analyze
from .analysis.groups import as_names, block_of, end_block_patterns, ignored_by, select_groups
from .errors import ExportError, GraphpruneError, LoadError, PlanError
from .flops import count_flops, flops_tokens
from .masking import insert_masks
from .plan import PruningPlan, atomic_write_text, check_ratio, make_plan, usual_modes
from .reconstruct import reconstruct_options, reconstruct_weights, reconstruction_data
from .rewrite import check_runs, rewrite
from .data import as_tokenizer, load_tokenizer
from .registry import check_options, get_pass
from .scoring import score
from .trace import Traced, export_graph, trace

if TYPE_CHECKING:  # finetune imports this module
    from .finetune import FinetuneInfo

SAVE_FORMAT = "graphprune.model"
SAVE_VERSION = 1


# ================================================================ report
@dataclass
class Report:
    """What a compile did: parameter counts, kept widths per group, time per stage, frozen channels."""

    method: str
    ratio: float
    params_before: int
    params_after: int
    block_params_before: int
    block_params_after: int
    groups: list[tuple[str, str, int, int]]  # name, kind, kept, total
    seconds: dict[str, float] = field(default_factory=dict)
    frozen: list[tuple[str, str]] = field(default_factory=list)
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    flops_before: int | None = None  # matmul FLOPs of one forward pass over flops_tokens tokens
    flops_after: int | None = None
    flops_tokens: int = 0
    scoring: dict = field(default_factory=dict)  # what the scoring pass reported (Scores.info)
    reconstruction: dict = field(default_factory=dict)  # layers refit after planning (graphprune.reconstruct)

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.block_params_after / self.block_params_before if self.block_params_before else 0.0

    def per_layer(self) -> list[dict]:
        """One row per transformer block: kept/total units of each group kind."""
        rows: dict[str, dict] = {}
        for name, kind, kept, total in self.groups:
            block = block_of(name.split(":")[0] + ".x") or "(global)"
            row = rows.setdefault(block, {"block": block})
            k0, t0 = row.get(kind, (0, 0))
            row[kind] = (k0 + kept, t0 + total)
        return list(rows.values())

    def table(self) -> str:
        kinds = sorted({g[1] for g in self.groups})
        head = ["block", *kinds]
        rows = [[r["block"], *(f"{r[k][0]}/{r[k][1]}" if k in r else "-" for k in kinds)] for r in self.per_layer()]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([fmt.format(*head), *(fmt.format(*r) for r in rows)])

    def __str__(self) -> str:
        lines = [
            f"graphprune: {self.method}, target ratio {self.ratio:.0%} of block parameters",
            f"  parameters      {self.params_before:>14,} -> {self.params_after:>14,} ({1 - self.params_after / max(self.params_before, 1):.1%} fewer)",
            f"  block params    {self.block_params_before:>14,} -> {self.block_params_after:>14,} (achieved {self.achieved_ratio:.1%})",
            "  time            " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()),
        ]
        if self.flops_before and self.flops_after:
            lines.insert(3, f"  FLOPs/forward   {self.flops_before:>14,} -> {self.flops_after:>14,} ({1 - self.flops_after / self.flops_before:.1%} fewer; "
                            f"{self.flops_tokens} tokens)")
        if self.reconstruction.get("layers"):
            r = self.reconstruction
            lines.append(f"  reconstruction  {r['layers']} layers refit on {r['samples']} samples: their output error "
                         f"{r['mean_error_sliced']:.2%} -> {r['mean_error_refit']:.2%} (mean)")
        if self.unsupported_ops:
            lines.append("  ops without a rule (channels frozen): " + ", ".join(f"{k} x{v}" for k, v in self.unsupported_ops.items()))
        return "\n".join(lines) + "\n" + self.table()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["achieved_ratio"] = self.achieved_ratio
        d["per_layer"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in row.items()} for row in self.per_layer()]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # derived keys (achieved_ratio, per_layer) dropped
        data["groups"] = [tuple(g) for g in data.get("groups", [])]
        data["frozen"] = [tuple(f) for f in data.get("frozen", [])]
        return cls(**data)

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a PNG of the kept width of every layer (needs matplotlib)."""
        from .report_plot import plot_widths

        return plot_widths(self, path)


# ================================================================ compiled model
@dataclass
class CompiledModel:
    """A pruned model: ``module`` is called like the original (same inputs, same output structure)."""

    module: fx.GraphModule
    plan: PruningPlan
    report: Report | None = None
    traced: Traced | None = None  # the dense model's trace (absent after load)
    dg: DependencyGraph | None = None  # the dense model's analysis (absent after load)
    example_kwargs: dict | None = None
    dynamic_shapes: dict | None = None
    config: dict | None = None
    weights: dict | None = None  # dense weights a pass changed before pruning (merged LoRA/HSM), for verify
    source: torch.nn.Module | None = None  # the caller's (unchanged) model, for module-level copies
    path: Path | None = None  # the directory it was loaded from
    finetune_info: FinetuneInfo | None = None  # set by finetune(): the weights left the dense ones on purpose

    def to_hf(self, check: bool = True) -> torch.nn.Module:
        """The pruned model as a ``transformers`` model (real ``nn.Linear`` layers, for peft/Trainer).

        After ``compile`` it is a sliced copy of the original model, checked equal to the pruned
        graph; after ``load`` it is read from the saved checkpoint (per-layer widths restored).
        """
        from . import io

        return io.to_hf(self, check=check)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def export_program(self) -> torch.export.ExportedProgram:
        """Re-trace the pruned graph with ``torch.export`` (dynamic batch and sequence)."""
        try:
            return export_graph(self.module, self.example_kwargs, self.dynamic_shapes)
        except Exception as exc:
            raise ExportError(f"could not export the pruned graph: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc

    def export_onnx(self, path: str | os.PathLike, *, cache: bool = False, model: torch.nn.Module | None = None, **options) -> Path:
        """Write the pruned model to ONNX; ``cache=True`` writes the KV-cache variant for ``graphprune.generate``.

        The cached variant re-traces the dense ``model`` (default: the one given to ``compile``).
        ``options``: ``dtype``, ``external_data``, ``check``, ``optimize``, ``progress`` (see ``graphprune.export_onnx``).
        """
        if cache:
            from .kvcache import export_onnx_with_cache

            return export_onnx_with_cache(self, path, model, **options)
        from .export import export_onnx

        return export_onnx(self, path, **options)

    def save(self, directory: str | os.PathLike, *, hf: bool | str = "auto", tokenizer=None, plot: bool = True) -> Path:
        """Write ``model.pt2``, ``plan.json``, ``report.json`` and a manifest; atomically (temp dir + rename).

        Also, for a Hugging Face model, a ``transformers`` checkpoint in the same folder
        (``hf="auto"``: when the plan applies at module level; ``True``: fail if it cannot;
        ``False``: never), the tokenizer (given, or found where the model was loaded from) and
        ``widths.png`` (``plot``), a plot of the kept width per layer.

        ``directory`` may be new, empty, or a folder saved by graphprune (replaced); anything else
        (a file, a folder of other files) is refused before any work.
        """
        from . import io
        directory = Path(directory)
        io.check_save_target(directory)  # before any work: never the caller's files
        tokenizer = as_tokenizer(tokenizer)  # a path: the tokenizer saved there, as compile takes it
        io.check_tokenizer(tokenizer)
        with io.writing(directory):  # a read-only folder or a file on the way fails here, before the export
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
        try:
            program = self.export_program()
            with io.writing(directory):
                self._write_folder(tmp, program, hf=hf, tokenizer=tokenizer, plot=plot)
                io.check_save_target(directory)  # again: something else may have been put there meanwhile
                if directory.exists():
                    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                    os.replace(directory, old)
                    try:
                        os.replace(tmp, directory)
                    except BaseException:
                        os.replace(old, directory)  # the previous save stays where it was
                        raise
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def _write_folder(self, tmp: Path, program, *, hf, tokenizer, plot) -> None:
        """Everything ``save`` writes, into the temporary folder ``tmp``."""
        from . import io

        torch.export.save(program, tmp / "model.pt2")
        self.plan.save(tmp / "plan.json")
        if self.report is not None:
            atomic_write_text(tmp / "report.json", json.dumps(self.report.to_dict(), indent=1))
        manifest = {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "model_class": self.plan.model_class,
            "config": self.config,
            "example_kwargs": {k: _describe(v) for k, v in (self.example_kwargs or {}).items()},
            "num_parameters": self.num_parameters(),
        }
        manifest.update(io.write_companions(self, tmp, hf=hf, tokenizer=tokenizer, plot=plot))
        manifest["fingerprint"] = self.plan.fingerprint
        manifest["plan_digest"] = io.plan_digest(self.plan)
        manifest["pytree_modules"] = io.pytree_modules(program)
        manifest["files"] = io.file_sizes(tmp)
        manifest["sha256"] = io.file_digests(tmp)  # sizes miss a same-size corruption
        manifest["dynamic_dims"] = {name: sorted(dims) for name, dims in (self.dynamic_shapes or {}).items()
                                    if isinstance(dims, dict)}  # which dims may vary (a plain module may fix dim 1)
        manifest["sequence_below_limit"] = io.sequence_below_limit(self.dynamic_shapes, self.config)
        atomic_write_text(tmp / io.MANIFEST, json.dumps(manifest, indent=1, default=str))
        usual_modes(tmp)


def _warn_unmatched(ignore, dg: DependencyGraph) -> None:
    """A pattern that protects nothing is most likely a typo in a module name: say so."""
    params = {m.param for g in dg.groups for m in g.members}
    for pattern in ignore:
        if not any(ignored_by(p, pattern) for p in params):
            example = dg.groups[0].members[0].param.rsplit(".", 1)[0] if dg.groups else ""
            warnings.warn(f"graphprune: ignore pattern {pattern!r} matches no parameter or module of a prunable group "
                          f"(names look like {example!r}); it protects nothing", stacklevel=3)


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    return value


def _example_from_manifest(desc: dict) -> dict:
    out = {}
    for k, v in desc.items():
        if isinstance(v, dict) and "tensor" in v:
            dtype = getattr(torch, v["dtype"])
            out[k] = torch.zeros(v["tensor"], dtype=dtype) if not dtype.is_floating_point else torch.randn(v["tensor"]).to(dtype)
        else:
            out[k] = v
    return out


def load(directory: str | os.PathLike) -> CompiledModel:
    """Load a directory written by :meth:`CompiledModel.save`."""
    from . import io

    directory = Path(directory)
    manifest = io.read_manifest(directory)  # a LoadError for anything but a manifest this version reads
    io.check_saved_files(directory, manifest)
    io.import_pytree_modules(manifest)
    plan = PruningPlan.load(directory / "plan.json")
    io.check_plan(directory, manifest, plan)
    try:
        program = torch.export.load(directory / "model.pt2")
    except FileNotFoundError as exc:
        raise LoadError(f"missing {directory / 'model.pt2'}") from exc
    except Exception as exc:
        raise LoadError(f"corrupt or truncated {directory / 'model.pt2'}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    report = None
    if (directory / "report.json").exists():
        data = io.read_json(directory / "report.json")
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, not an object")
            report = Report.from_dict(data)
        except (TypeError, ValueError) as exc:  # valid JSON of another shape
            raise LoadError(f"corrupt {directory / 'report.json'}: {exc}") from exc
    try:
        example_kwargs = _example_from_manifest(manifest.get("example_kwargs", {}))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # an edited description
        raise LoadError(f"{directory / io.MANIFEST}: corrupt 'example_kwargs' ({type(exc).__name__}: {exc})") from exc
    compiled = CompiledModel(
        module=program.module(), plan=plan, report=report,
        example_kwargs=example_kwargs, config=manifest.get("config"), path=directory,
    )
    io.after_load(compiled, directory, manifest)
    return compiled


# ================================================================ compile
@contextmanager
def _stage(seconds: dict, name: str, bar):
    if bar is not None:
        bar.set_description(f"graphprune: {name}")
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0
    if bar is not None:
        bar.update(1)


def check_protect_layers(value) -> tuple[int, int]:
    """``(first, last)``: how many blocks at each end stay whole; a clear error for anything else."""
    try:
        first, last = value
    except (TypeError, ValueError):
        first = last = None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (first, last)):
        raise GraphpruneError(f"protect_layers must be two counts >= 0 (first, last), e.g. (4, 2); got {value!r}")
    return first, last


def compile(
    model: torch.nn.Module,
    ratio: float | None = None,
    method: str = "magnitude",
    *,
    kinds=None,
    allocation: str | None = None,
    round_to: int | dict = 1,
    ignore=(),
    protect_layers: tuple[int, int] = (0, 0),
    calib=None,
    tokenizer=None,
    n_samples: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    plan: PruningPlan | None = None,
    example_inputs=None,
    example_kwargs: dict | None = None,
    strict: bool = False,
    reconstruct=False,
    progress: bool = True,
    **method_config,
) -> CompiledModel:
    """Prune ``model`` by ``ratio`` of its transformer-block parameters and return a smaller graph.

    ``ratio`` defaults to 0.5, or to the ratio of ``plan`` (a ``PruningPlan``, its dict, or the path
    of a saved plan.json) when one is replayed.

    ``kinds`` picks what may be removed (``"heads"`` — KV groups under GQA — and ``"channels"`` by
    default, or the method's ``default_kinds``, e.g. ``("hidden",)`` for PAT; also ``"query_heads"``,
    ``"head_dim"``, ``"hidden"``). ``allocation`` is ``"uniform"``
    (same fraction per layer) or ``"global"`` (default: the method's preference, e.g. global for
    HyWIA, else uniform); ``round_to`` keeps channel widths at multiples (an int), or the widths of
    the kinds it names (``{"channels": 64, "heads": 2}``);
    ``ignore`` protects modules by name pattern, ``protect_layers=(first, last)`` the first and
    last transformer blocks (LLM-Pruner's recipe is ``(4, 2)`` of 32); ``plan`` replays a saved plan instead of scoring.
    Data-driven methods take ``calib`` (a corpus name such as ``"wikitext2"``, a text file, a
    ``datasets.Dataset``, a list of strings, or token ids) as ``n_samples`` windows of ``seq_len``
    tokens drawn with ``seed``; text is tokenized with ``tokenizer`` (default: the model's own,
    from the local folder it was loaded from). ``reconstruct=True`` (or a dict of
    ``graphprune.reconstruct``'s options: ``calib`` (default: the scoring's), ``n_samples`` (default
    128), ``damp``, ``batch_size``, ``memory_mib``) then refits the layers that lose inputs by least squares on ``calib``, so that
    their outputs stay close to the dense model's (it needs ``calib``, also when replaying a
    ``plan``). The caller's model is never modified.
    """
    from .data import check_fits, check_seq_len, check_size, check_text_source

    if isinstance(plan, (str, os.PathLike)):
        plan = PruningPlan.load(plan)
    elif isinstance(plan, dict):
        plan = PruningPlan.from_dict(plan)
    elif plan is not None and not isinstance(plan, PruningPlan):
        raise PlanError(f"plan must be a PruningPlan, a plan dict or the path of a plan.json, got {type(plan).__name__}")
    if plan is None:
        ratio = check_ratio(0.5 if ratio is None else ratio)
    else:
        # The plan already says what is removed, so another ratio cannot apply: a warning (the
        # result is still what the caller asked to replay), not an error.
        if ratio is not None and not math.isclose(check_ratio(ratio), plan.ratio):
            warnings.warn(f"graphprune: ratio={ratio} is ignored: plan= replays a plan made at ratio {plan.ratio}, "
                          "which already says what is removed", stacklevel=2)
        ratio = plan.ratio
    protect_layers = check_protect_layers(protect_layers)
    recon = reconstruct_options(reconstruct)
    recon_reads_calib = recon is not None and "calib" not in recon  # else reconstruction has text of its own
    if recon is not None:
        # the windows are drawn now: a missing file or a bad id should not cost a trace
        n_recon = recon.pop("n_samples", None)
        recon["calib"] = reconstruction_data(model, recon.get("calib", calib), tokenizer, n_recon, seq_len, seed)
    scorer_cls = type(method) if not isinstance(method, str) else (get_pass(method) if plan is None else None)
    if scorer_cls is not None and isinstance(method, str):
        check_options(scorer_cls, method_config)  # before tracing: a typo should not cost a trace
    if allocation is None:
        allocation = getattr(scorer_cls, "default_allocation", "uniform")
    if kinds is None:  # the method's own (PAT prunes the hidden size), else heads and channels
        kinds = getattr(scorer_cls, "default_kinds", DEFAULT_KINDS)
    kinds, ignore = as_names(kinds), as_names(ignore)
    check_size(n_samples, "n_samples")
    check_seq_len(seq_len)
    if calib is not None and plan is not None and not recon_reads_calib:  # nothing reads it: a mistake to hear of
        warnings.warn("graphprune: calib= is ignored: plan= replays a plan without scoring", stacklevel=2)
    elif calib is not None:
        # before tracing: a missing file, windows longer than the model's positions (torch.export's
        # guard otherwise) or ids outside its vocabulary. Every pass gets calib (a plugin may read it
        # without declaring needs_calibration), so it is checked whatever the method.
        if isinstance(calib, (str, os.PathLike)):
            check_text_source(str(calib))
        check_fits(model, calib, seq_len, "calib")
        tokenizer = as_tokenizer(tokenizer)  # a path: the tokenizer saved there
        if tokenizer is None and not isinstance(calib, torch.Tensor) and not hasattr(calib, "input_ids"):
            tokenizer = load_tokenizer(model)  # text calibration data: the model's own tokenizer
    seconds: dict[str, float] = {}
    bar = tqdm(total=5 + (recon is not None), disable=not progress, leave=False)
    try:
        with _stage(seconds, "trace", bar):
            traced = trace(model, example_inputs=example_inputs, example_kwargs=example_kwargs)
        with _stage(seconds, "analyze", bar):
            dg = analyze(traced, strict=strict)
            _warn_unmatched(ignore, dg)
            ignore = (*ignore, *end_block_patterns(dg.groups, *protect_layers))
            if plan is None and ratio > 0 and not select_groups(dg.groups, kinds, ignore):
                raise PlanError(f"nothing left to prune: no group of kinds {list(kinds)} escapes ignore={list(ignore)} "
                                f"(protect_layers={protect_layers}); the graph has {len(dg.groups)} groups")
        with _stage(seconds, "score", bar):
            scores = None if plan is not None else score(
                dg, method, kinds=kinds, ignore=ignore, calib=calib, progress=progress, tokenizer=tokenizer,
                n_samples=n_samples, seq_len=seq_len, seed=seed, example_kwargs=traced.example_kwargs,
                ratio=ratio, allocation=allocation, round_to=round_to, **method_config)
        with _stage(seconds, "plan", bar):
            if plan is None:
                plan = make_plan(dg, scores, ratio, kinds=kinds, allocation=allocation, round_to=round_to,
                                 ignore=ignore, method=method if isinstance(method, str) else method.name,
                                 model_class=traced.model_class)
            leaf_keep = plan.leaf_keep(dg)
        weights = getattr(scores, "weights", None) or {}
        reconstruction = None
        if recon is not None:
            with _stage(seconds, "reconstruct", bar):
                reconstruction = reconstruct_weights(dg, plan, recon.pop("calib"), weights=weights,
                                                      example_kwargs=traced.example_kwargs, progress=progress, **recon)
                weights = reconstruction.weights
        with _stage(seconds, "rewrite", bar):
            module = rewrite(dg, leaf_keep, weights=weights)
            check_runs(module, dg.gm, traced.example_kwargs)
    finally:
        bar.close()
    report = Report(
        method=plan.method, ratio=plan.ratio, params_before=plan.params_before, params_after=plan.params_after,
        block_params_before=plan.block_params_before, block_params_after=plan.block_params_after,
        groups=[(g.name, g.kind, len(g.keep), g.size) for g in plan.groups], seconds=seconds,
        frozen=dg.frozen_report(), unsupported_ops=dict(dg.walk.unsupported),
        scoring=dict(getattr(scores, "info", None) or {}),
        reconstruction=reconstruction.summary() if reconstruction is not None else {},
    )
    report.flops_tokens = flops_tokens(traced.config)
    report.flops_before = count_flops(traced.module, traced.example_kwargs, report.flops_tokens)
    report.flops_after = count_flops(module, traced.example_kwargs, report.flops_tokens)
    return CompiledModel(module=module, plan=plan, report=report, traced=traced, dg=dg,
                         example_kwargs=traced.example_kwargs, dynamic_shapes=traced.dynamic_shapes, config=traced.config,
                         weights=weights, source=model)


# ================================================================ verify
@dataclass
class Verification:
    max_abs: float
    max_rel: float
    trials: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return f"pruned vs masked dense: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} over {self.trials} inputs ({verdict}, tolerance {self.tolerance:g})"


def random_inputs(example_kwargs: dict, batch: int, seq: int, generator: torch.Generator, vocab: int | None = None,
                  dynamic_shapes: dict | None = None) -> dict:
    """Fresh inputs shaped like the example ones, with new batch (dim 0) and sequence (dim 1) sizes
    (only where ``dynamic_shapes``, when given, says the dim may vary)."""
    out = {}
    for name, v in example_kwargs.items():
        if not isinstance(v, torch.Tensor):
            out[name] = v
            continue
        dims = dynamic_shapes.get(name) if dynamic_shapes is not None else {0: True, 1: True}
        shape = list(v.shape)
        if dims and 0 in dims:
            shape[0] = batch
        if len(shape) > 1 and dims and 1 in dims:
            shape[1] = seq
        if v.dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=generator).to(v.dtype).to(v.device)
        elif v.dtype == torch.bool:
            out[name] = torch.ones(shape, dtype=torch.bool, device=v.device)
        else:
            high = vocab if (vocab and name == "input_ids") else int(v.max()) + 1
            out[name] = torch.randint(0, max(high, 1), shape, generator=generator).to(v.dtype).to(v.device)
    return out


def check_cut_from_dense(compiled, action: str, why: str) -> None:
    """``verify`` and ``reconstruct`` work against the dense model a pruned one was cut from: they need
    ``compile``'s analysis of it (``load`` keeps none) and weights that still derive from it (not fine-tuned)."""
    if not isinstance(compiled, CompiledModel):
        raise GraphpruneError(f"{action} takes the CompiledModel that compile() returned, not a {type(compiled).__name__}")
    if compiled.dg is None:
        raise GraphpruneError(f"{action} needs the dense model's analysis: call it on the result of compile(), not load()")
    if compiled.finetune_info is not None:  # its weights left the dense ones on purpose
        raise GraphpruneError(f"{action} {why}: call it on the model compile() returned, before finetune()")


def verify(compiled: CompiledModel, trials: int = 3, seed: int = 0, tolerance: float = 1e-5) -> Verification:
    """Check on fresh random inputs that the pruned graph equals the masked dense graph.

    The masked dense graph is the original graph with a 0/1 mask multiplied onto every value that
    carries a pruned group; equality means the rewrite removed exactly the planned units and
    nothing else. ``max_rel`` is the worst deviation relative to the largest output magnitude.
    """
    from .data import check_size

    check_cut_from_dense(compiled, "verify", "compares a pruned model with the dense model it was cut from; a fine-tuned "
                                             "one differs from it by design")
    check_size(trials, "trials")  # zero trials would report "OK" having compared nothing
    groups = [compiled.dg.group(g.name) for g in compiled.plan.groups]
    masked = insert_masks(compiled.dg, groups, weights=compiled.weights)
    masked.set_keep({g.name: g.keep for g in compiled.plan.groups})
    gen = torch.Generator().manual_seed(seed)
    vocab = (compiled.config or {}).get("vocab_size")
    max_abs = max_rel = 0.0
    for t in range(trials):
        batch, seq = 2 + t % 3, 3 + (5 * t) % 11
        kwargs = random_inputs(compiled.example_kwargs, batch, seq, gen, vocab, compiled.dynamic_shapes)
        with torch.no_grad():
            a = [x for x in pytree.tree_leaves(compiled.module(**kwargs)) if isinstance(x, torch.Tensor)]
            b = [x for x in pytree.tree_leaves(masked(**kwargs)) if isinstance(x, torch.Tensor)]
        for x, y in zip(a, b):
            x, y = x.double(), y.double()
            # equal infinities (a masked logit) agree; a NaN on either side never does (max() would skip it)
            diff = torch.where(x == y, 0.0, (x - y).abs()).max().item() if x.numel() else 0.0
            finite = y[torch.isfinite(y)]
            scale = max(finite.abs().max().item(), 1e-12) if finite.numel() else 1.0
            if math.isnan(diff):
                diff = math.inf
            max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale)
    return Verification(max_abs, max_rel, trials, tolerance)
