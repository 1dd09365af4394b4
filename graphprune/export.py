"""ONNX export of traced or pruned graphs, with the torch.onnx dynamo exporter.

``export_onnx(model, path)`` accepts a :class:`~graphprune.CompiledModel`, a ``Traced``, an
``ExportedProgram`` or any module that ``torch.export`` can trace (a pruned ``GraphModule``
included). Batch and sequence length stay dynamic. The file is written atomically: everything is
written and checked in a temporary folder next to ``path`` and then moved into place, so a failed
export never leaves a partial ``.onnx`` (or ``.onnx.data``) at the target.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from .errors import ExportError

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


def to_program(model, example_kwargs: dict | None = None, dynamic_shapes=None) -> tuple[torch.export.ExportedProgram, dict]:
    """An ``ExportedProgram`` and its example kwargs for whatever ``export_onnx`` was given."""
    from .trace import Traced, _dynamic_shapes

    if hasattr(model, "export_program") and hasattr(model, "plan"):  # a CompiledModel
        return model.export_program(), dict(example_kwargs or model.example_kwargs or {})
    if isinstance(model, Traced):
        return model.program, dict(example_kwargs or model.example_kwargs)
    if isinstance(model, torch.export.ExportedProgram):
        return model, dict(example_kwargs or {})
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
    return program, kwargs


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
    progress: bool = False,
) -> Path:
    """Export ``model`` to an ONNX file at ``path`` (dynamic batch and sequence) and return the path.

    ``model``: a CompiledModel (its pruned graph is re-exported), a ``Traced``, an
    ``ExportedProgram``, or any ``nn.Module`` with ``example_kwargs`` (``dynamic_shapes`` defaults
    to dynamic dims 0 and 1 of every tensor input). ``dtype``: ``"float32"`` or ``"float16"`` (every
    float tensor, inputs and outputs included). ``external_data``: keep the weights in
    ``<path>.data``; by default only when they exceed what a single protobuf file can hold (2 GiB).
    ``check`` runs the ONNX checker. An op with no ONNX translation raises
    :class:`graphprune.ExportError` naming it, and nothing is written at ``path``.
    """
    path = Path(path)
    dtype = normalize_dtype(dtype)
    bar = tqdm(total=4, disable=not progress, leave=False, desc="onnx: torch.export")
    try:
        program, kwargs = to_program(model, example_kwargs, dynamic_shapes)
        bar.update(1)
        bar.set_description("onnx: convert")
        names = output_names if output_names is not None else _default_output_names(program)
        onnx_program = _convert(program, kwargs, input_names, names)
        if metadata:
            onnx_program.model.metadata_props.update({str(k): str(v) for k, v in metadata.items()})
        bar.update(1)
        if external_data is None:
            external_data = _weight_bytes(program) > EXTERNAL_DATA_BYTES
        bar.set_description("onnx: save")
        save_atomic(onnx_program, path, dtype=dtype, external_data=external_data, check=check, bar=bar)
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


# ================================================================ saving
def save_atomic(onnx_program, path: Path, *, dtype: str = "float32", external_data: bool = False,
                check: bool = True, bar=None) -> None:
    """Save (converting to float16 if asked), check, and move into place; never a partial file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        tmp = tmpdir / path.name
        if dtype == "float32":
            onnx_program.save(tmp, external_data=external_data)
        else:
            _save_float16(onnx_program.model_proto, tmp, external_data, data_name)
        if bar is not None:
            bar.update(1)
            bar.set_description("onnx: check")
        if check:
            _check(tmp)
        if bar is not None:
            bar.update(1)
        # the weights first, so the model never points at a missing or stale data file
        for f in tmpdir.iterdir():
            if f != tmp:
                os.replace(f, path.parent / f.name)
        os.replace(tmp, path)
        if not external_data:
            (path.parent / data_name).unlink(missing_ok=True)  # left by an earlier export to this path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _save_float16(proto, tmp: Path, external_data: bool, data_name: str) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        # shape inference serialises the model, which fails beyond 2 GiB
        half = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=external_data)
    except Exception as exc:
        raise ExportError(f"float16 conversion failed: {_first_line(exc)}") from exc
    onnx.save_model(half, str(tmp), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=data_name if external_data else None)


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))  # by path: works for models with external data
    except Exception as exc:
        raise ExportError(f"the exported ONNX model fails the ONNX checker: {_first_line(exc)}") from exc
