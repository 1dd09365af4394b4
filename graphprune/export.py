"""ONNX export of traced or pruned graphs, with the torch.onnx dynamo exporter.

``export_onnx(model, path)`` accepts a :class:`~graphprune.CompiledModel`, a ``Traced``, an
``ExportedProgram`` or any module that ``torch.export`` can trace (a pruned ``GraphModule``
included). Batch and sequence length stay dynamic. The file is written atomically: everything is
written and checked in a temporary folder next to ``path`` and then moved into place, so a failed
export never leaves a partial ``.onnx`` (or ``.onnx.data``) at the target.

Dynamic dimensions carry readable names (``batch``, ``sequence``, ``past_sequence``,
``total_sequence``) instead of the exporter's symbols (``s26``), taken from the ``dynamic_shapes``
the graph was exported with. ``optimize=True`` also applies ONNX Runtime's transformer fusions
(RMSNorm / LayerNorm, skip-add + norm, GELU) and keeps the fused file only when its outputs match
the plain one's (see :func:`optimize_file`).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from .complex_ops import is_complex, lower_complex
from .evaluate.runner import onnx_metadata
from .errors import ExportError
from .trace import dynamic_shapes_for, export_graph

log = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GiB: bigger models keep their weights in a side file.
EXTERNAL_DATA_BYTES = int(1.8 * 2**30)
_DTYPES = {"float32": "float32", "fp32": "float32", torch.float32: "float32",
           "float16": "float16", "fp16": "float16", "half": "float16", torch.float16: "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16", torch.bfloat16: "bfloat16"}


def normalize_dtype(dtype) -> str:
    """``"float32"`` or ``"float16"``; bfloat16 and unknown dtypes raise :class:`ExportError`."""
    name = _DTYPES.get(dtype if not isinstance(dtype, str) else dtype.lower().replace("torch.", ""))
    if name is None:
        raise ExportError(f"unsupported ONNX export dtype {dtype!r}: use 'float32' or 'float16'")
    if name == "bfloat16":
        raise ExportError(
            "bfloat16 ONNX export is not offered: ONNX Runtime has no bfloat16 kernels for most ops on "
            "CPU (MatMul, LayerNorm, Softmax), so the model would not load; use dtype='float16'"
        )
    return name


def to_program(model, example_kwargs: dict | None = None, dynamic_shapes=None) -> tuple[torch.export.ExportedProgram, dict, object]:
    """An ``ExportedProgram``, its example kwargs and the ``dynamic_shapes`` it was exported with
    (None when unknown: an ``ExportedProgram`` given without ``dynamic_shapes=``)."""
    from .trace import Traced, _dynamic_shapes

    if hasattr(model, "export_program") and hasattr(model, "plan"):  # a CompiledModel
        shapes = dynamic_shapes if dynamic_shapes is not None else getattr(model, "dynamic_shapes", None)
        return model.export_program(), dict(example_kwargs or model.example_kwargs or {}), shapes
    if isinstance(model, Traced):
        shapes = dynamic_shapes if dynamic_shapes is not None else model.dynamic_shapes
        return model.program, dict(example_kwargs or model.example_kwargs), shapes
    if isinstance(model, torch.export.ExportedProgram):
        return model, dict(example_kwargs or {}), dynamic_shapes
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"cannot export a {type(model).__name__}: pass a CompiledModel, a traced graph or an nn.Module")
    if not example_kwargs:
        raise ExportError(f"exporting a {type(model).__name__} needs example_kwargs={{...}} (how it is called)")
    kwargs = dict(example_kwargs)
    shapes = dynamic_shapes if dynamic_shapes is not None else _dynamic_shapes(model, kwargs)
    try:
        with torch.no_grad():
            program = torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise ExportError(f"torch.export could not trace {type(model).__name__} for ONNX: {_first_line(exc)}") from exc
    return program, kwargs, shapes


def real_program(program: torch.export.ExportedProgram, kwargs: dict, shapes) -> torch.export.ExportedProgram:
    """``program`` with its complex arithmetic done on real pairs (:mod:`graphprune.complex_ops`),
    re-exported; the same program when it has none."""
    if not any(is_complex(n) for n in program.graph.nodes):
        return program
    lowered = lower_complex(program.module())
    if shapes is None:
        shapes = dynamic_shapes_for(kwargs, None)
    try:
        with torch.no_grad():
            return export_graph(lowered, kwargs, shapes)
    except Exception as exc:
        raise ExportError(f"could not re-export the graph with its complex values as real pairs: {_first_line(exc)}") from exc


def output_names(program: torch.export.ExportedProgram) -> list[str]:
    """Readable names of the flattened outputs: ``logits`` for a model output's field, else ``output_0``..."""
    spec = program.call_spec.out_spec
    if spec is None:
        return []
    tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        name = re.sub(r"[^0-9A-Za-z_.]+", "_", pytree.keystr(path)).strip("._") or "output"
        names.append(name if not name[0].isdigit() else f"output_{name}")
    return names


def export_onnx(
    model,
    path: str | os.PathLike,
    *,
    example_kwargs: dict | None = None,
    dynamic_shapes=None,
    dtype="float32",
    external_data: bool | None = None,
    check: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    metadata: dict[str, str] | None = None,
    optimize: bool = False,
    progress: bool = True,
) -> Path:
    """Export ``model`` to an ONNX file at ``path`` (dynamic batch and sequence) and return the path.

    ``model``: a CompiledModel (its pruned graph is re-exported), a ``Traced``, an
    ``ExportedProgram``, or any ``nn.Module`` with ``example_kwargs`` (``dynamic_shapes`` defaults
    to dynamic dims 0 and 1 of every tensor input). ``dtype``: ``"float32"`` or ``"float16"`` (every
    float tensor, inputs and outputs included). ``external_data``: keep the weights in
    ``<path>.data``; by default only when they exceed what a single protobuf file can hold (2 GiB).
    ``check`` runs the ONNX checker. An op with no ONNX translation raises
    :class:`graphprune.ExportError` naming it, and nothing is written at ``path``.

    Dynamic dims are named after the ``dynamic_shapes`` used (``batch``, ``sequence``, and for the
    KV-cache variant ``past_sequence`` / ``total_sequence``); pass ``dynamic_shapes=`` with an
    ``ExportedProgram`` to get names, else the exporter's symbols stay. ``optimize=True`` fuses
    the graph with ONNX Runtime's transformer optimizer and keeps the fused file only if its outputs
    stay within ``PARITY_TOL`` of the plain file's (else it keeps the plain file and warns why);
    the fusions applied are logged and recorded in the model's ``graphprune.fusions`` metadata
    (:func:`fusions`). The fused file uses ONNX Runtime operators, so it is for ONNX Runtime only.
    """
    path = Path(path)
    dtype = normalize_dtype(dtype)
    check_target(path)  # before the export: a folder at ``path`` would otherwise fail only at the end
    bar = tqdm(total=4, disable=not progress, leave=False, desc="onnx: torch.export")
    try:
        program, kwargs, shapes = to_program(model, example_kwargs, dynamic_shapes)
        program = real_program(program, kwargs, shapes)
        bar.update(1)
        bar.set_description("onnx: convert")
        names = output_names if output_names is not None else _default_output_names(program)
        onnx_program = _convert(program, kwargs, input_names, names)
        name_dims(onnx_program.model, program, shapes)
        # the position limit and vocabulary go into the file, so evaluation and generate can check them
        metadata = {**onnx_metadata(model), **(metadata or {})}
        if metadata:
            onnx_program.model.metadata_props.update({str(k): str(v) for k, v in metadata.items()})
        bar.update(1)
        if external_data is None:
            external_data = _weight_bytes(program) > EXTERNAL_DATA_BYTES
        bar.set_description("onnx: save")
        save_atomic(onnx_program, path, dtype=dtype, external_data=external_data, check=check,
                    optimize=optimize, bar=bar)
    finally:
        bar.close()
    return path


def _default_output_names(program) -> list[str] | None:
    names = output_names(program)
    return names if names and len(set(names)) == len(names) else None


def _weight_bytes(program: torch.export.ExportedProgram) -> int:
    seen, total = set(), 0
    for t in list(program.state_dict.values()) + list(program.constants.values()):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _convert(program, kwargs, input_names, output_names):
    try:
        onnx_program = torch.onnx.export(
            program, (), kwargs=kwargs, dynamo=True, verbose=False,
            input_names=input_names, output_names=output_names,
        )
    except Exception as exc:
        op, node = failing_op(exc)
        where = f" (node {node})" if node else ""
        what = f"op {op}{where} has no ONNX translation or failed to convert" if op else _first_line(exc)
        raise ExportError(f"ONNX export failed: {what}. Root cause: {_root_message(exc)}") from exc
    if onnx_program is None:  # only returned as None when f= is given, which we never do
        raise ExportError("torch.onnx.export returned no program")
    return onnx_program


def failing_op(exc: BaseException) -> tuple[str | None, str | None]:
    """(op, node name) of the node an exporter exception is about, read from its chained messages."""
    op = node = None
    for text in _messages(exc):
        m = re.search(r"OpOverload\(op='([^']+)', overload='([^']+)'\)", text)
        if m and op is None:
            op = f"{m.group(1)}.{m.group(2)}"
        m = re.search(r"node %(\w+) .*?target=([\w.:]+)", text)
        if m:
            node = node or m.group(1)
            op = op or m.group(2).removeprefix("torch.ops.")
    return op, node


def _messages(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield str(exc)
        exc = exc.__cause__ or exc.__context__


def _root_message(exc: BaseException) -> str:
    *_, last = _messages(exc)
    return _first_line(last)


def _first_line(exc) -> str:
    text = str(exc).strip()
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the exporter colours its messages
    return (text.splitlines()[0] if text else type(exc).__name__)[:400]


# ================================================================ dimension names
# Readable ONNX names for the torch.export Dim names graphprune uses; other Dims keep their own name.
DIM_NAMES = {"batch": "batch", "seq": "sequence", "past": "past_sequence"}
# A dim that is exactly the sum of these named dims gets its own name (present key/values: past + new).
SUM_NAMES = {frozenset({"past_sequence", "sequence"}): "total_sequence"}
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def dim_names(onnx_inputs: list, program: torch.export.ExportedProgram, dynamic_shapes) -> dict[str, str]:
    """Exporter symbol -> readable name, from which input axis each ``torch.export.Dim`` was put on.

    ``onnx_inputs`` are the ONNX graph's inputs (``onnx_ir`` values): one per tensor user input of
    ``program``, in order. Empty when ``dynamic_shapes`` is unknown or does not line up.
    """
    if dynamic_shapes is None:
        return {}
    leaf_dims: dict[int, dict] = {}  # user-input leaf index -> {axis: Dim}
    args, kwargs = pytree.tree_unflatten(list(range(program.call_spec.in_spec.num_leaves)), program.call_spec.in_spec)
    if isinstance(dynamic_shapes, dict):
        _collect_dims(kwargs, dynamic_shapes, leaf_dims)
    else:  # a tuple/list of specs for positional args (and kwargs, if any, after them)
        _collect_dims(args, list(dynamic_shapes)[:len(args)], leaf_dims)
    tensor_leaves = [i for i, node in enumerate(_user_input_nodes(program))
                     if isinstance(node.meta.get("val"), torch.Tensor)]
    if len(tensor_leaves) != len(onnx_inputs):
        log.info("ONNX inputs (%d) do not line up with the program's tensor inputs (%d): dims keep the exporter's names",
                 len(onnx_inputs), len(tensor_leaves))
        return {}
    names: dict[str, str] = {}
    for leaf, value in zip(tensor_leaves, onnx_inputs):
        shape = value.shape.dims if value.shape is not None else ()
        for axis, dim in leaf_dims.get(leaf, {}).items():
            symbol = getattr(shape[axis], "value", None) if axis < len(shape) else None
            name = getattr(dim, "__name__", None)  # a Dim hint (Dim.AUTO) has none
            if not symbol or not _SYMBOL.fullmatch(symbol) or not name or not name.isidentifier():
                continue  # a static size, an expression, or a derived Dim (2*seq)
            readable = DIM_NAMES.get(name, name)
            if symbol not in names and readable not in names.values():  # one symbol per name, or sizes get tied
                names[symbol] = readable
    return names


def _collect_dims(tree, spec, out: dict) -> None:
    """Walk the unflattened input tree (leaf indices) beside its dynamic-shapes spec."""
    if isinstance(tree, int):  # a leaf: its spec is {axis: Dim} or a per-axis tuple
        if isinstance(spec, dict):
            out[tree] = {int(a): d for a, d in spec.items() if d is not None}
        elif isinstance(spec, (list, tuple)):
            out[tree] = {a: d for a, d in enumerate(spec) if d is not None}
    elif isinstance(tree, dict) and isinstance(spec, dict):
        for key, sub in tree.items():
            _collect_dims(sub, spec.get(key), out)
    elif isinstance(tree, (list, tuple)) and isinstance(spec, (list, tuple)) and len(tree) == len(spec):
        for sub, sub_spec in zip(tree, spec):
            _collect_dims(sub, sub_spec, out)


def _user_input_nodes(program: torch.export.ExportedProgram) -> list:
    wanted = set(program.graph_signature.user_inputs)
    return [n for n in program.graph.nodes if n.op == "placeholder" and n.name in wanted]


def rename_dim(text: str, names: dict[str, str]) -> str:
    """``"s17 + s70"`` -> ``"total_sequence"``; ``"s70 + 1"`` -> ``"sequence + 1"``; unknown symbols stay."""
    renamed = _SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), text)
    terms = frozenset(t.strip() for t in renamed.split("+"))
    return SUM_NAMES.get(terms, renamed) if len(terms) > 1 else renamed


def name_dims(model, program: torch.export.ExportedProgram, dynamic_shapes) -> dict[str, str]:
    """Rename the symbolic dims of an ``onnx_ir`` model in place (inputs, outputs and every
    intermediate value, i.e. the saved ``value_info``, so all stay consistent); returns the mapping."""
    import onnx_ir as ir

    names = dim_names(list(model.graph.inputs), program, dynamic_shapes)
    if not names:
        return names
    values = list(model.graph.inputs) + list(model.graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph, enter_graph=lambda g: values.extend(g.inputs)):
        values.extend(node.outputs)
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            values.extend(node.outputs)
    for value in values:
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value for d in shape.dims):
            continue
        dims = [ir.SymbolicDim(rename_dim(d.value, names)) if isinstance(d, ir.SymbolicDim) and d.value else d
                for d in shape.dims]
        value.shape = ir.Shape(dims, denotations=[shape.get_denotation(i) for i in range(len(dims))])
    return names


# ================================================================ saving
def check_target(path: Path) -> None:
    """``path`` (and its side file ``path.data``) can be written: not a folder, in a writable folder."""
    from .io import writing

    if path.is_dir():
        raise ExportError(f"{path} is a folder: give the ONNX file to write, e.g. {path / 'model.onnx'}")
    data = path.with_name(f"{path.name}.data")
    if data.is_dir():
        raise ExportError(f"{data} is a folder, where the model's weights file would go: remove it or choose another name")
    with writing(path, ExportError):  # checked on the nearest existing folder: a failed export makes none
        folder = next(p for p in path.absolute().parents if p.exists())
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def save_atomic(onnx_program, path: Path, *, dtype: str = "float32", external_data: bool = False,
                check: bool = True, optimize: bool = False, bar=None) -> "FusionReport | None":
    """Save (fusing and converting to float16 if asked), check, and move into place; never a
    partial file at ``path``. Returns the fusion report when ``optimize``."""
    from .io import writing

    data_name = f"{path.name}.data"
    with writing(path, ExportError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    report = None
    try:
        tmp = tmpdir / path.name
        if optimize:
            plain = tmpdir / "plain" / path.name
            plain.parent.mkdir()
            onnx_program.save(plain, external_data=external_data)
            if check:  # the exporter's graph; fused ops are ONNX Runtime's own, unknown to the checker
                _check(plain)
            chosen, report = optimize_file(plain, tmpdir, dtype=dtype, external_data=external_data)
            _move_model(chosen, tmp)
        elif dtype == "float32":
            onnx_program.save(tmp, external_data=external_data)
        else:
            _save_float16(onnx_program.model_proto, tmp, external_data, data_name)
        if bar is not None:
            bar.update(1)
            bar.set_description("onnx: check")
        # with optimize the plain graph was checked above; a float16 copy of it is checked again
        if check and (not optimize or (dtype != "float32" and not report.kept)):
            _check(tmp)
        if bar is not None:
            bar.update(1)
        with writing(path, ExportError):
            _move_into_place(tmpdir, tmp, path)
            if not external_data:
                (path.parent / data_name).unlink(missing_ok=True)  # left by an earlier export to this path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return report


def _move_into_place(tmpdir: Path, tmp: Path, path: Path) -> None:
    """Move the side files of ``tmpdir`` (the weights) next to ``path`` first, so the model never
    points at a missing or stale data file, then the model ``tmp`` to ``path``. If a move fails, the
    side files moved so far go and the ones they replaced come back: the folder is as it was."""
    previous = Path(tempfile.mkdtemp(dir=tmpdir))  # replaced side files wait here (a folder: not moved itself)
    moved: list[tuple[Path, Path | None]] = []  # (where a side file went, the file it replaced)
    try:
        for f in [f for f in tmpdir.iterdir() if f != tmp and f.is_file()]:
            dest = path.parent / f.name
            replaced = previous / f.name if dest.exists() else None
            if replaced is not None:
                os.replace(dest, replaced)
            moved.append((dest, replaced))
            os.replace(f, dest)
        os.replace(tmp, path)
    except BaseException:
        for dest, replaced in reversed(moved):
            dest.unlink(missing_ok=True)
            if replaced is not None:
                os.replace(replaced, dest)
        raise


def _move_model(src: Path, dst: Path) -> None:
    """Move a model and its external data file (same base name, so its reference stays valid)."""
    data = src.parent / f"{src.name}.data"
    if data.exists():
        os.replace(data, dst.parent / f"{dst.name}.data")
    os.replace(src, dst)


# ================================================================ optional fusions
# ONNX Runtime's transformer optimizer type for decoder graphs: its fusions (LayerNorm / RMSNorm,
# skip-add + norm, GELU, GPT-style attention) are the generic decoder ones, and unlike "qwen3" the
# type exists in every onnxruntime release graphprune supports.
FUSION_MODEL_TYPE = "gpt2"
PARITY_TOL = 1e-4  # max |fused - plain| over every float output, fp32 ...
PARITY_REL = 1e-5  # ... or this fraction of the largest output, if larger: fp32 rounding grows with the values
# (SmolLM2's logits reach ~30, and ONNX Runtime's own load-time rewrites already move them by ~6e-5)
PARITY_TOL_FP16 = 1e-2  # float16: relative to the largest output magnitude (at least 1)


@dataclass
class FusionReport:
    """What ``optimize`` did: fused op type -> nodes added, and whether the fused file was kept."""

    fusions: dict[str, int] = field(default_factory=dict)
    kept: bool = False
    max_abs_diff: float | None = None
    reason: str = ""  # why the plain file was kept

    def summary(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.fusions.items())) or "none"
        if self.kept:
            return f"fused {ops} (outputs within {self.max_abs_diff:.1e} of the plain model)"
        return f"kept the unoptimized model: {self.reason}"


def optimize_file(plain: Path, workdir: Path, *, dtype: str = "float32",
                  external_data: bool = False) -> tuple[Path, FusionReport]:
    """Fuse the float32 model ``plain`` (files go under ``workdir``); return (the file to keep, report).

    The fused file is kept only when ONNX Runtime loads it and its outputs on a random input (a
    past of length 3 for KV-cache models) are within ``PARITY_TOL`` of ``plain``'s (or ``PARITY_REL``
    of the largest output, if that is larger); otherwise the
    plain model is kept, with a warning saying why. With ``dtype="float16"`` both are converted
    after that check and compared again, within ``PARITY_TOL_FP16`` of the largest output. Only
    the optimizer's Python fusions run (``opt_level=0``): no provider-specific rewrites, so the file
    runs on CPU and CUDA alike and ONNX Runtime still applies its own optimisations at load.
    """
    import onnx

    fused_path = workdir / "fused" / plain.name
    try:
        fused = _fuse(plain)
    except Exception as exc:  # the optimizer raises anything from AssertionError to KeyError on odd graphs
        return _plain(plain, workdir, dtype, external_data, f"ONNX Runtime's optimizer failed: {type(exc).__name__}: {_first_line(exc)}")
    counts = added_ops(onnx.load(str(plain), load_external_data=False), fused)
    if not counts:
        return _plain(plain, workdir, dtype, external_data, f"ONNX Runtime's {FUSION_MODEL_TYPE!r} optimizer found nothing to fuse")
    _set_metadata(fused, "graphprune.fusions", json.dumps(counts, sort_keys=True))
    _save_proto(fused, fused_path, external_data)
    ok, why, diff = _parity(plain, fused_path, PARITY_TOL, floor_rel=PARITY_REL)
    if not ok:
        return _plain(plain, workdir, dtype, external_data, why, counts, diff)
    if dtype != "float32":
        plain16 = _plain(plain, workdir, dtype, external_data)[0]
        fused16 = workdir / "fused16" / plain.name
        try:  # onnx shape inference does not know ONNX Runtime's fused ops; the exporter's value_info stays
            _save_float16(onnx.load(str(fused_path)), fused16, external_data, f"{plain.name}.data", infer_shapes=False)
        except ExportError as exc:
            return plain16, _rejected(f"the fused model could not be converted to {dtype}: {exc}", counts, diff)
        ok, why, diff = _parity(plain16, fused16, PARITY_TOL_FP16, relative=True)
        if not ok:
            return plain16, _rejected(f"in {dtype}, {why}", counts, diff)
        fused_path = fused16
    report = FusionReport(counts, True, diff)
    log.info("graphprune: %s", report.summary())
    return fused_path, report


def _plain(plain: Path, workdir: Path, dtype: str, external_data: bool, why: str | None = None,
           counts: dict | None = None, diff: float | None = None) -> tuple[Path, FusionReport]:
    """The unfused model in ``dtype`` (converted once, under ``workdir``), and a report saying ``why``."""
    import onnx

    target = plain
    if dtype != "float32":
        target = workdir / "plain16" / plain.name
        if not target.exists():
            _save_float16(onnx.load(str(plain)), target, external_data, f"{plain.name}.data")
    return target, (_rejected(why, counts, diff) if why else FusionReport())


def _fuse(path: Path):
    """The fused ``ModelProto`` (a seam for tests)."""
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size are left to detection: a pruned model has a head count per layer. The
    # optimizer warns that they are missing; that is expected here, so its warnings are muted.
    quiet = logging.getLogger("onnxruntime.transformers.optimizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return optimize_model(str(path), model_type=FUSION_MODEL_TYPE, opt_level=0, use_gpu=False).model
    finally:
        quiet.setLevel(level)


def _parity(reference: Path, candidate: Path, tol: float, relative: bool = False,
            floor_rel: float = 0.0) -> tuple[bool, str, float | None]:
    """(ok, why not, max |difference|) of two models' outputs on one random input."""
    try:
        diff, scale = _max_output_diff(reference, candidate)
    except Exception as exc:
        return False, f"ONNX Runtime could not run the fused model: {_first_line(exc)}", None
    bound = tol * max(1.0, scale) if relative else max(tol, floor_rel * scale)
    if diff <= bound:  # NaN fails too
        return True, "", diff
    return False, f"the fused model's outputs differ from the plain model's by {diff:.3g} (> {bound:.3g})", diff


def added_ops(before, after) -> dict[str, int]:
    """Op types with more nodes in ``after`` than in ``before`` (the fused ops), with how many more."""
    old, new = Counter(n.op_type for n in before.graph.node), Counter(n.op_type for n in after.graph.node)
    return {op: n - old[op] for op, n in sorted(new.items()) if n > old[op]}


def _rejected(reason: str, counts: dict | None = None, diff: float | None = None) -> FusionReport:
    report = FusionReport(dict(counts or {}), False, diff, reason)
    warnings.warn(f"graphprune: optimize=True {report.summary()}", stacklevel=2)
    return report


def _set_metadata(proto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def _max_output_diff(reference: Path, candidate: Path) -> tuple[float, float]:
    """(largest |difference| between two models' outputs on one random input, largest |reference
    output|), on CPU. A changed shape or integer output counts as an infinite difference."""
    from .runtime import CPU, OnnxSession, random_feeds

    ref = OnnxSession.open(reference, CPU, optimization="none", quiet=True)  # the exporter's graph as is
    cand = OnnxSession.open(candidate, CPU, quiet=True)  # as users run it
    feeds = random_feeds(ref)
    want, got = ref.run(feeds), cand.run(feeds)
    if set(want) != set(got):
        raise ExportError(f"outputs changed: {sorted(want)} -> {sorted(got)}")
    diff = scale = 0.0
    for name, w in want.items():
        g = got[name]
        if g.shape != w.shape:
            return float("inf"), scale
        if np.issubdtype(w.dtype, np.floating) and w.size:
            w, g = w.astype(np.float64), g.astype(np.float64)
            diff, scale = max(diff, float(np.abs(g - w).max())), max(scale, float(np.abs(w).max()))
        elif not np.array_equal(g, w):
            return float("inf"), scale
    return diff, scale


def fusions(path: str | os.PathLike) -> dict[str, int]:
    """The fusions ``export_onnx(..., optimize=True)`` applied to the model at ``path`` ({} if none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    text = next((p.value for p in model.metadata_props if p.key == "graphprune.fusions"), None)
    return json.loads(text) if text else {}


def _save_float16(proto, tmp: Path, external_data: bool, data_name: str, infer_shapes: bool = True) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        # shape inference serialises the model, which fails beyond 2 GiB
        half = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=external_data or not infer_shapes)
    except Exception as exc:
        raise ExportError(f"float16 conversion failed: {_first_line(exc)}") from exc
    _save_proto(half, tmp, external_data, data_name)


def _save_proto(proto, path: Path, external_data: bool, data_name: str | None = None) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=(data_name or f"{path.name}.data") if external_data else None)


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))  # by path: works for models with external data
    except Exception as exc:
        raise ExportError(f"the exported ONNX model fails the ONNX checker: {_first_line(exc)}") from exc
