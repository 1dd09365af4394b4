"""Models on disk: loading what users have, and the Hugging Face round trip.

``load_model(source)`` accepts the three forms the command line takes — a local Hugging Face
folder, a ``.gguf`` file (or a folder holding one), and a folder written by
``CompiledModel.save`` — and says clearly what is wrong with anything else.

The Hugging Face round trip: ``CompiledModel.save`` also writes a ``transformers`` checkpoint
(``config.json`` + ``model.safetensors``) next to the graph when the plan applies at module
level (:mod:`graphprune.module_apply`). When every layer kept the same width, the widths are in
the config and ``AutoModelForCausalLM.from_pretrained(folder)`` loads it as is. When layers
differ, the config keeps the dense widths plus a ``graphprune_widths`` record (parameter shapes
and unit counts per layer); :func:`load_hf` (and ``graphprune.load(folder).to_hf()``) restores
them. The record also holds module numbers a config cannot give (a norm over pruned channels
keeps the graph's divisor through a rescaled eps), so such a model takes this path even with
uniform widths. The record survives ``save_pretrained`` after fine-tuning, so the loop stays closed.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .errors import GraphpruneError, LoadError
from .trace import dynamic_shapes_for, position_limit

WIDTHS_KEY = "graphprune_widths"  # config.json entry holding per-layer widths
WIDTHS_VERSION = 2  # 2: adds "attributes" (module numbers the config does not give, e.g. a rescaled norm's eps)
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
CHECKED_SUFFIXES = (".pt2", ".safetensors")  # binary files whose size and SHA-256 the manifest records
MANIFEST = "graphprune.json"
# manifest entries load reads, with the JSON type each must have (absent is fine: older manifests)
MANIFEST_TYPES = {"files": dict, "sha256": dict, "pytree_modules": list, "example_kwargs": dict, "config": (dict, type(None)),
                  "dynamic_dims": dict}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ================================================================ loading what the user has
@dataclass
class LoadedModel:
    """A model named on the command line: a dense model to prune, or a saved pruned one."""

    kind: str  # "hf", "gguf" or "graphprune"
    path: Path
    model: torch.nn.Module | None = None  # the dense model (hf/gguf), or a saved model's HF copy
    compiled: object = None  # the CompiledModel of a saved graphprune folder
    tokenizer_path: Path | None = None

    def module(self) -> torch.nn.Module:
        """An ``nn.Module`` to trace (a saved folder: its HF checkpoint, else its graph)."""
        if self.model is None and self.compiled is not None:
            if not has_hf_checkpoint(self.path):
                raise GraphpruneError(
                    f"{self.path} holds a pruned graph but no transformers checkpoint, so it cannot be traced again: "
                    "prune the original model (a stricter ratio, or compile(model, plan=...) to replay plan.json)"
                )
            self.model = self.compiled.to_hf()
        return self.model

    @property
    def example_kwargs(self) -> dict | None:
        return None  # every module() is a Hugging Face model: it makes its own example input

    @property
    def evaluable(self):
        """What evaluation should run: the pruned graph of a saved folder, else the model."""
        return self.compiled if self.compiled is not None else self.model

    def tokenizer(self):
        from .data import load_tokenizer

        if self.tokenizer_path is None:
            raise GraphpruneError(f"no tokenizer found for {self.path}: save one next to the model")
        return load_tokenizer(self.tokenizer_path)


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GraphpruneError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def describe_source(source: str | os.PathLike) -> str:
    """Which form ``source`` is: ``graphprune``, ``hf`` or ``gguf``; a clear error otherwise."""
    path = Path(source)
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder (MODEL is a local Hugging Face folder, a .gguf file or a saved graphprune folder; nothing is downloaded)")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise LoadError(f"{path} is a file but not a .gguf model; give a Hugging Face folder, a .gguf file or a saved graphprune folder")
    if (path / MANIFEST).exists():
        return "graphprune"
    if (path / "config.json").exists():
        return "hf"
    if any(path.glob("*.gguf")):
        return "gguf"
    raise LoadError(f"{path} holds no model: expected config.json (Hugging Face), a .gguf file, or graphprune.json (saved by graphprune)")


def load_model(source: str | os.PathLike, dtype="float32") -> LoadedModel:
    """Load MODEL as given on the command line (see :func:`describe_source`)."""
    from . import api

    path = Path(source)
    kind = describe_source(path)
    if kind == "graphprune":
        compiled = api.load(path)
        tok = path if _has_tokenizer(path) else _local_dir((compiled.config or {}).get("_name_or_path"))
        return LoadedModel(kind, path, compiled=compiled, tokenizer_path=tok)
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    if kind == "gguf":
        gguf = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        folder, extra = gguf.parent, {"gguf_file": gguf.name}
    else:
        folder, extra = path, {}
    if kind == "hf" and has_widths_record(path):
        model = load_hf(path, dtype=torch_dtype)
    else:
        model = _hf_call(lambda: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, **extra), path)
    model.eval()
    tok = gguf if kind == "gguf" else (path if _has_tokenizer(path) else None)
    return LoadedModel(kind, path, model=model, tokenizer_path=tok)


def _hf_call(fn, path: Path):
    """Run a transformers loader; turn its many exception types into one clear LoadError."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn()
    except GraphpruneError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        raise LoadError(f"could not load {path} with transformers: {type(exc).__name__}: {first}") from exc
    finally:
        hf_logging.set_verbosity(level)


def read_json(path: Path):
    """The JSON value in ``path``; a LoadError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"corrupt {path}: {exc}") from exc


def read_manifest(folder: Path) -> dict:
    """``folder``'s graphprune.json, checked to be a manifest this graphprune reads."""
    from .api import SAVE_FORMAT, SAVE_VERSION
    from .plan import check_version

    path = folder / MANIFEST
    if not path.exists():
        raise LoadError(f"{folder} is not a saved graphprune model (no {MANIFEST})")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != SAVE_FORMAT:
        raise LoadError(f"{path} is not a graphprune model manifest (expected an object with 'format': '{SAVE_FORMAT}')")
    check_version(manifest, SAVE_VERSION, str(path))
    for key, kind in MANIFEST_TYPES.items():
        if key in manifest and not isinstance(manifest[key], kind):
            raise LoadError(f"{path}: {key!r} is a {type(manifest[key]).__name__}, not what graphprune wrote; the file was edited or is corrupt")
    names = [*manifest.get("sha256", {}).values(), *manifest.get("pytree_modules", [])]  # digests, module names
    if not all(map(_is_count, manifest.get("files", {}).values())) or not all(isinstance(v, str) for v in names):
        raise LoadError(f"{path}: 'files' must map names to sizes, 'sha256' names to digests and 'pytree_modules' "
                        "list module names; the file was edited or is corrupt")
    return manifest


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists())


def _local_dir(name) -> Path | None:
    return Path(name) if name and Path(name).exists() else None


# ================================================================ saving next to the graph
@contextmanager
def writing(path: Path, error: type[GraphpruneError] = GraphpruneError):
    """An OS error while writing ``path`` (a read-only folder, a file where a folder should be, a
    full disk) as a graphprune ``error`` naming it; the OSError stays as its __cause__."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):  # "File exists" alone would not say which
            blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
            reason = f"{blocker} is a file, not a folder" if blocker else reason
        raise error(f"cannot write {path}: {reason}") from exc


def check_save_target(directory: Path) -> None:
    """``save`` replaces only a folder graphprune saved (it has graphprune.json) or an empty one:
    never a file, nor a folder of the user's files (``--out`` naming the source model's folder)."""
    with writing(directory):
        if directory.is_dir():
            names = sorted(p.name for p in directory.iterdir())
            if not names or (directory / MANIFEST).is_file():
                return
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise GraphpruneError(f"{directory} exists and is not a folder saved by graphprune (it has {listed}): "
                                  "choose another folder or remove it")
        if directory.exists() or directory.is_symlink():
            raise GraphpruneError(f"{directory} exists and is a file, not a folder saved by graphprune: "
                                  "choose another path or remove it")


def check_tokenizer(tokenizer) -> None:
    """What ``save(tokenizer=...)`` can write: a transformers tokenizer (checked before any work)."""
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise GraphpruneError(f"save(tokenizer=...) takes a transformers tokenizer (with save_pretrained), "
                              f"got a {type(tokenizer).__name__}")


def write_companions(compiled, folder: Path, *, hf="auto", tokenizer=None, plot: bool = True) -> dict:
    """Write the HF checkpoint, tokenizer and width plot into ``folder``; return manifest entries."""
    out: dict = {"hf": _write_hf(compiled, folder, hf)}
    out["tokenizer"] = _write_tokenizer(compiled, folder, tokenizer)
    out["plot"] = None
    if plot and compiled.report is not None and compiled.report.groups:
        try:
            compiled.report.plot(folder / "widths.png")
            out["plot"] = "widths.png"
        except GraphpruneError as exc:
            warnings.warn(f"graphprune: no widths.png: {exc}", stacklevel=3)
    return out


def _write_hf(compiled, folder: Path, hf) -> dict | None:
    from .module_apply import ModuleApplyError
    from .trace import is_hf_model

    if hf not in (True, False, "auto"):
        raise GraphpruneError(f"hf must be True, False or 'auto', got {hf!r}")
    if hf is False:
        return None
    if compiled.source is None:  # a loaded model being saved again: carry its checkpoint over
        if compiled.path is not None and has_hf_checkpoint(compiled.path):
            for name in HF_FILES:
                if (compiled.path / name).exists():
                    shutil.copy2(compiled.path / name, folder / name)
            for shard in compiled.path.glob("model-*.safetensors"):
                shutil.copy2(shard, folder / shard.name)
            return {"saved": True, "per_layer": has_widths_record(compiled.path)}
        if hf is True:
            raise GraphpruneError("no Hugging Face model to write: this model was not compiled from one in this session")
        return None
    if not is_hf_model(compiled.source) or not hasattr(compiled.source, "save_pretrained"):
        if hf is True:
            raise GraphpruneError(f"{type(compiled.source).__name__} is not a Hugging Face model: no checkpoint to write")
        return None
    try:
        small = to_hf(compiled)
        if getattr(small, "_graphprune_unsaveable", None):
            raise ModuleApplyError(small._graphprune_unsaveable)
        small.save_pretrained(str(folder), save_original_format=False)  # keys as the modules name them
        info = {"saved": True, "per_layer": WIDTHS_KEY in small.config.to_dict(), "class": type(small).__name__}
        if info["per_layer"]:
            info["why_record"] = getattr(small, "_graphprune_record_reason", None)
        del small  # the reloaded copy takes its place in memory
        check_reloads(compiled, folder, info["class"])
    except Exception as exc:  # "auto": the graph artefacts are still worth saving
        if hf is True:
            raise
        for name in HF_FILES:
            (folder / name).unlink(missing_ok=True)
        reason = str(exc) if isinstance(exc, ModuleApplyError) else f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return {"saved": False, "reason": reason}
    return info


def check_reloads(compiled, folder: Path, name: str) -> None:
    """The checkpoint just written, loaded back as a user would (``load_hf``), must compute what
    the pruned graph computes: what a checkpoint cannot carry (a buffer transformers recomputes
    from the config, a number it takes from the config) fails here, not later in the user's hands."""
    from .module_apply import ModuleApplyError, check_equal

    again = load_hf(folder)
    _buffers_like_graph(again, compiled.module)
    try:
        check_equal(again, compiled.module, compiled.example_kwargs, dynamic_shapes=compiled.dynamic_shapes)
    except ModuleApplyError as exc:
        lost = _lost_tensors(again, compiled)
        where = f"; it cannot carry {', '.join(lost[:3])} (recomputed from the config when loaded)" if lost else ""
        first = str(exc).split(": its code")[0]
        raise ModuleApplyError(f"the transformers checkpoint of the pruned {name} does not reload to the pruned model{where} "
                               f"({first}). The graph (model.pt2) is complete; use graphprune.load") from exc


def _buffers_like_graph(again: torch.nn.Module, graph: torch.nn.Module) -> None:
    """Reloaded buffers in the graph's dtype: transformers rebuilds e.g. rotary tables in float32,
    for any checkpoint, where a model cast with ``.to(torch.bfloat16)`` had them in bfloat16. That
    is not what this check is about (what the pruning could not carry is)."""
    from .analysis.walk import fetch_attr
    from .rewrite import _set_tensor

    for name, buffer in list(again.named_buffers()):
        try:
            theirs = fetch_attr(graph, name)
        except AttributeError:
            continue
        if isinstance(theirs, torch.Tensor) and theirs.dtype != buffer.dtype and theirs.shape == buffer.shape:
            _set_tensor(again, name, buffer.to(theirs.dtype))


def _lost_tensors(again: torch.nn.Module, compiled) -> list[str]:
    """Analysed tensors whose reloaded shape (or, for buffers, value) differs from the pruned graph's
    (parameter values may differ on purpose: rescaled norms)."""
    from .analysis.walk import fetch_attr

    lost = []
    for name in compiled.dg.params if compiled.dg is not None else ():
        try:
            mine, theirs = fetch_attr(again, name), fetch_attr(compiled.module, name)
        except AttributeError:
            continue
        if mine.shape != theirs.shape:
            lost.append(f"{name} ({list(mine.shape)} instead of {list(theirs.shape)})")
        elif not isinstance(mine, torch.nn.Parameter) and not torch.equal(mine.detach().to(theirs.dtype), theirs.detach()):
            lost.append(name)
    return lost


def _write_tokenizer(compiled, folder: Path, tokenizer) -> bool:
    from .data import load_tokenizer

    if tokenizer is None:
        where = None
        if compiled.path is not None and _has_tokenizer(compiled.path):
            where = compiled.path
        elif compiled.source is not None:
            where = getattr(getattr(compiled.source, "config", None), "name_or_path", None)
        if not where or not Path(where).exists():
            return False
        try:
            tokenizer = load_tokenizer(where)
        except GraphpruneError:
            return False
    tokenizer.save_pretrained(str(folder))
    return True


def pytree_modules(program: torch.export.ExportedProgram) -> list[str]:
    """Modules defining the container types of the program's inputs and outputs (e.g. a
    transformers ``ModelOutput``): a fresh process must import them before ``torch.export.load``."""
    found: set[str] = set()

    def walk(spec) -> None:
        if spec is None:
            return
        kind = getattr(spec, "type", None)
        if isinstance(kind, type) and kind.__module__ not in ("builtins", "collections", "torch.utils._pytree"):
            found.add(kind.__module__)
        for child in spec.children() if callable(getattr(spec, "children", None)) else []:
            walk(child)

    for entry in program.module_call_graph[:1]:
        walk(entry.signature.in_spec)
        walk(entry.signature.out_spec)
    return sorted(found)


def import_pytree_modules(manifest: dict) -> None:
    for name in manifest.get("pytree_modules") or []:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise LoadError(f"this model's outputs are {name} types, and {name} cannot be imported here ({exc})") from exc


def file_sizes(folder: Path) -> dict[str, int]:
    """Sizes of the binary files in ``folder`` (a later load detects a truncated copy)."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in CHECKED_SUFFIXES}


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of the same files (a later load detects a same-size corruption)."""
    return {name: sha256_of(folder / name) for name in file_sizes(folder)}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # streamed: a checkpoint may be larger than memory
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_saved_files(folder: Path, manifest: dict) -> None:
    """The manifest's files are there, with their sizes, then their SHA-256 (manifests written
    before digests were recorded have sizes only)."""
    for name, size in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.exists():
            raise LoadError(f"{path} is missing (the manifest lists it): the folder is incomplete")
        actual = path.stat().st_size
        if actual != size:
            raise LoadError(f"{path} is corrupt or truncated: {actual:,} bytes where the manifest says {size:,}; copy the folder again")
    for name, digest in (manifest.get("sha256") or {}).items():
        if not name.endswith(".safetensors"):  # the checkpoint's own are load_hf's: load never reads it
            check_digest(folder / name, digest)


def check_digest(path: Path, digest: str | None) -> None:
    if digest is not None and (not path.exists() or sha256_of(path) != digest):
        raise LoadError(f"{path} is corrupt or was changed after saving (SHA-256 differs from {MANIFEST}): copy the folder "
                        "again; weights fine-tuned after loading belong in a folder of their own (save_pretrained elsewhere)")


def plan_digest(plan) -> str:
    """A hash of what a plan keeps: the saved graph and plan.json must agree on it."""
    kept = [[g.name, sorted(g.keep)] for g in plan.groups]
    return hashlib.sha256(json.dumps([plan.fingerprint, kept]).encode()).hexdigest()[:16]


def check_plan(folder: Path, manifest: dict, plan) -> None:
    """plan.json must be the plan model.pt2 was made with (not another model's, not another pruning's)."""
    if manifest.get("fingerprint") not in (None, plan.fingerprint):
        raise LoadError(f"{folder / 'plan.json'} belongs to a different model than {folder / 'model.pt2'} "
                        f"(fingerprints {plan.fingerprint} and {manifest['fingerprint']}): the folder was mixed up")
    if manifest.get("plan_digest") not in (None, plan_digest(plan)):
        raise LoadError(f"{folder / 'plan.json'} belongs to a different model than {folder / 'model.pt2'}: it keeps other "
                        "units than the ones the saved graph was pruned to (the folder was mixed up)")


def sequence_below_limit(dynamic_shapes: dict | None, config: dict | None) -> bool:
    """Whether the graph was traced for sequences one token short of the position limit (see graphprune.trace)."""
    limit = position_limit(config)
    maxima = {getattr(dims.get(1), "max", None) for dims in (dynamic_shapes or {}).values() if isinstance(dims, dict)}
    return limit is not None and limit - 1 in maxima


def after_load(compiled, folder: Path, manifest: dict) -> None:
    """Dynamic batch/sequence for re-export, and evaluation pointed at the folder's tokenizer."""
    if compiled.dynamic_shapes is None and compiled.example_kwargs:
        compiled.dynamic_shapes = dynamic_shapes_for(compiled.example_kwargs, compiled.config,
                                                     below_limit=bool(manifest.get("sequence_below_limit")))
        dims = manifest.get("dynamic_dims")  # a trace that kept only the batch dynamic (see graphprune.trace)
        if isinstance(dims, dict):
            compiled.dynamic_shapes = {name: ({d: v for d, v in shape.items() if str(d) in map(str, dims.get(name, []))}
                                              if isinstance(shape, dict) else shape)
                                       for name, shape in compiled.dynamic_shapes.items()}
    if _has_tokenizer(folder):
        compiled.config = {**(compiled.config or {}), "_name_or_path": str(folder)}


# ================================================================ the Hugging Face round trip
def has_hf_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "config.json").exists() and (
        (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    )


def has_widths_record(folder: Path) -> bool:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and WIDTHS_KEY in config


def to_hf(compiled, check: bool = True) -> torch.nn.Module:
    """The pruned model at module level (see ``CompiledModel.to_hf``)."""
    from .module_apply import apply_plan_to_module

    if compiled.source is not None:
        small = apply_plan_to_module(compiled.source, compiled, check=check)
        dense = getattr(compiled.source, "config", None)
        if dense is None or not hasattr(dense, "to_dict"):
            return small
        why = config_falls_short(type(small), small)
        if why:
            # per-layer widths, or widths the config class cannot express (or would derive other
            # sizes from, e.g. head_dim = hidden / heads): dense config + a record of the widths
            from .module_apply import ModuleApplyError, check_equal

            _restore_config(small, dense)
            try:
                check_equal(small, compiled.module, compiled.example_kwargs, dynamic_shapes=compiled.dynamic_shapes)
            except ModuleApplyError as exc:  # its forward reads the widths from the config at run time
                small = apply_plan_to_module(compiled.source, compiled, check=check)
                small._graphprune_unsaveable = (
                    f"{type(small).__name__} reads its widths from the config at run time, and its config class cannot hold "
                    f"these widths: usable in this session, not as a transformers checkpoint ({exc})")
                return small
            record_widths(small, compiled.plan)
            small._graphprune_record_reason = why
        return small
    if compiled.path is not None and has_hf_checkpoint(compiled.path):
        return load_hf(compiled.path)  # its weights' digests are checked here: load reads only model.pt2
    raise GraphpruneError(
        "no module-level model to build: this CompiledModel was loaded from a folder without a Hugging Face "
        "checkpoint (save it from a compile of a Hugging Face model)"
    )


def config_falls_short(cls, small: torch.nn.Module) -> str | None:
    """Why a model built from the pruned config alone would not have exactly ``small``'s shapes and
    module numbers; None when it would (then a plain checkpoint loads with ``from_pretrained``). A
    number the config cannot give, such as a rescaled norm's eps, would load silently wrong: such a
    checkpoint keeps the dense config, so that ``from_pretrained`` fails on the shapes instead.
    transformers validates configs on save and some classes check sizes when built (GPT-2: hidden
    size divisible by the head count)."""
    config = small.config
    if hasattr(config, WIDTHS_KEY):
        delattr(config, WIDTHS_KEY)
    try:
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
        shapes, numbers = _reference(cls, config)
    except Exception as exc:
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        return f"{type(config).__name__} rejects the pruned widths ({first})"
    mine_shapes = {n: tuple(p.shape) for n, p in small.state_dict().items()}
    if shapes != mine_shapes:
        name = next((n for n in mine_shapes if shapes.get(n) != mine_shapes[n]), None)
        example = f"{name}: the config gives {shapes.get(name)}, the pruned model has {mine_shapes[name]}" if name else ""
        return f"a model built from the pruned config has other shapes (per-layer widths, or widths its config class cannot express; {example})"
    mine = module_numbers(small)
    odd = sorted(k for k, v in mine.items() if k in numbers and numbers[k] != v)
    if odd:
        return f"it has module numbers a config cannot hold ({odd[0]}: a norm over pruned channels keeps the graph's divisor)"
    return None


def _restore_config(small: torch.nn.Module, dense) -> None:
    """Put the dense widths back into ``small``'s config (the same object its layers hold)."""
    pruned, original = small.config.to_dict(), dense.to_dict()
    for key, value in original.items():
        if key in pruned and pruned[key] != value and (value is None or (isinstance(value, int) and not isinstance(value, bool))):
            setattr(small.config, key, value)
    for key in set(pruned) - set(original) - {WIDTHS_KEY, "experts_implementation"}:
        if not hasattr(small.config, key):
            continue
        if getattr(dense, key, "absent") is None:
            setattr(small.config, key, None)  # e.g. head_dim set on a config that derives it
        elif not hasattr(dense, key):
            try:
                delattr(small.config, key)  # e.g. head_dim written into a config class that has none
            except AttributeError:
                pass


def record_widths(small: torch.nn.Module, plan) -> None:
    """Store in the (dense) config what a model built from it would not have: parameter shapes,
    module numbers (head counts, a rescaled norm's eps, ...) and the unit counts of every pruned
    group, which ``load_hf`` replays to rebuild the pruned modules from the dense ones (and the
    config views of modules that read widths from the config at run time)."""
    config = getattr(small, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    if hasattr(config, WIDTHS_KEY):
        delattr(config, WIDTHS_KEY)
    shapes, numbers = _reference(type(small), config)
    actual = {n: tuple(p.shape) for n, p in small.state_dict().items()}
    differ = {n: list(s) for n, s in actual.items() if shapes.get(n) != s}
    attributes = {k: v for k, v in module_numbers(small).items() if k in numbers and numbers[k] != v}
    if not differ and not attributes:
        return  # the config says it all: a plain transformers checkpoint
    groups = [[g.name, g.kind, len(g.keep), g.size] for g in plan.groups if len(g.keep) != g.size]
    setattr(config, WIDTHS_KEY, {"version": WIDTHS_VERSION, "params": differ, "attributes": attributes, "groups": groups})


# size attributes of standard layers: they follow the weights (module_apply._fix_module_sizes)
_FOLLOW_WEIGHTS = {"in_features", "out_features", "num_embeddings", "embedding_dim", "nx", "nf"}


def module_numbers(model: torch.nn.Module) -> dict[str, int | float]:
    """Every plain int/float attribute of every module, as "module.path.attr" (bools excluded)."""
    out = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if type(value) in (int, float) and not attr.startswith("_") and attr not in _FOLLOW_WEIGHTS and value == value:
                out[f"{name}.{attr}" if name else attr] = value
    return out


def _reference(cls, config) -> tuple[dict[str, tuple], dict[str, int | float]]:
    """Parameter shapes and module numbers of a model of ``cls`` built from ``config`` (on the meta device)."""
    with torch.device("meta"):
        model = _hf_call(lambda: cls(config), Path(cls.__name__))
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}, module_numbers(model)


@contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device (no memory, no init); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index} has no 'weight_map' of weight names to file names: the checkpoint is corrupt")
        files = sorted(set(weight_map.values()))
    state = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise LoadError(f"{path} is missing: the checkpoint is incomplete")
        try:
            state.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error type on a cut file
            raise LoadError(f"{path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]}); copy it again") from exc
    return state


def _check_weight_digests(folder: Path, digests: dict | None) -> None:
    """A graphprune folder's weights against the SHA-256s its manifest records. Checked after the
    weights were found to fit the config: another model's weights are better told by their shapes."""
    for name, digest in (digests or {}).items():
        if name.endswith(".safetensors"):
            check_digest(folder / name, digest)


def load_hf(folder: str | os.PathLike, dtype=None, *, verify: bool = True) -> torch.nn.Module:
    """A pruned ``transformers`` model from ``folder``, per-layer widths restored.

    Plain checkpoints (uniform widths) load with ``from_pretrained``; checkpoints with a
    ``graphprune_widths`` record are built with the dense config, resized to the recorded shapes,
    given the recorded module numbers and filled from the safetensors file. A checkpoint whose weights do not fit its config (another
    model's weights), a cut file or a record of a newer format fails with a :class:`LoadError`.
    In a folder saved by graphprune, the weights must also match the SHA-256 in its graphprune.json
    (``verify=False`` skips that check, e.g. for weights fine-tuned and saved there on purpose).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .module_apply import _fix_module_sizes, _fix_unit_attributes

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise LoadError(f"{folder} has no config.json: not a Hugging Face checkpoint")
    digests = read_manifest(folder).get("sha256") if verify and (folder / MANIFEST).exists() else None
    dtype = resolve_dtype(dtype)
    config = _hf_call(lambda: AutoConfig.from_pretrained(str(folder)), folder)
    record = getattr(config, WIDTHS_KEY, None)
    auto = _model_class(config) or AutoModelForCausalLM
    if record is None:
        state = _read_safetensors(folder)  # a cut file fails here, with a clear message
        del state
        model = _hf_call(lambda: auto.from_pretrained(str(folder), dtype=dtype), folder)
        _check_weight_digests(folder, digests)
        return model.eval()
    check_record(record, folder / "config.json")
    with _parameters_on_meta():
        model = _hf_call(lambda: auto.from_config(config) if auto is AutoModelForCausalLM else auto._from_config(config), folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))  # (a router's score-correction bias)
    for name, shape in record.get("params", {}).items():
        if name not in params and name not in buffers:
            raise LoadError(f"{folder}: recorded width of {name!r}, which a {type(model).__name__} does not have")
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if name in params:
            module._parameters[leaf] = torch.nn.Parameter(torch.empty(shape, device="meta"), requires_grad=params[name].requires_grad)
        else:
            module._buffers[leaf] = torch.empty(shape, dtype=buffers[name].dtype, device=buffers[name].device)
    _fix_module_sizes(model)
    _fix_unit_attributes(model, SimpleNamespace(groups=[  # counts, and config views; version 2 records the numbers too
        SimpleNamespace(name=n, kind=k, keep=range(kept), size=total) for n, k, kept, total in record.get("groups", [])
    ]))
    _set_numbers(model, record.get("attributes", {}), folder)
    state = _read_safetensors(folder)
    _check_state_fits(model, state, folder)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise LoadError(f"{folder}: the checkpoint has no weights for {left[:3]}{' ...' if len(left) > 3 else ''}: it belongs to a different model")
    _check_weight_digests(folder, digests)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_record(record, path: Path) -> None:
    """A widths record as :func:`record_widths` writes it; anything else is a LoadError saying what is wrong."""
    from .plan import check_version

    def wrong(what: str) -> LoadError:
        return LoadError(f"{path}: {WIDTHS_KEY} {what}; the file was edited or is corrupt")

    if not isinstance(record, dict):
        raise wrong(f"is a {type(record).__name__}, not an object")
    check_version(record, WIDTHS_VERSION, f"{path}: {WIDTHS_KEY}")
    params, groups, numbers = record.get("params", {}), record.get("groups", []), record.get("attributes", {})
    if not isinstance(params, dict) or not all(isinstance(s, list) and all(map(_is_count, s)) for s in params.values()):
        raise wrong("'params' must map parameter names to shapes (lists of sizes)")
    if not isinstance(groups, list) or not all(
            isinstance(g, list) and len(g) == 4 and all(isinstance(x, str) for x in g[:2]) and all(map(_is_count, g[2:]))
            for g in groups):
        raise wrong("'groups' must be a list of [name, kind, kept, total]")
    if not isinstance(numbers, dict) or not all(type(v) in (int, float) for v in numbers.values()):
        raise wrong("'attributes' must map module attributes to numbers")


def _model_class(config):
    """The transformers class the checkpoint was saved from (config.architectures), if there is one."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else None


def _set_numbers(model: torch.nn.Module, numbers: dict, folder: Path) -> None:
    for key, value in numbers.items():
        owner, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:
            module = None
        if module is None or not hasattr(module, attr):
            raise LoadError(f"{folder}: recorded {key!r}, which a {type(model).__name__} does not have: it belongs to a different model")
        setattr(module, attr, value)


def _check_state_fits(model: torch.nn.Module, state: dict, folder: Path) -> None:
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise LoadError(f"{folder}: the checkpoint has weights a {type(model).__name__} of this config does not have "
                        f"({', '.join(unexpected[:3])}): it belongs to a different model, or was written by "
                        "save_pretrained in transformers' original key format (use save_original_format=False)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise LoadError(f"{folder}: {name} has shape {tuple(tensor.shape)} in the checkpoint, {expected[name]} in the "
                            "config and width record: the checkpoint belongs to a different model")
