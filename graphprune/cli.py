"""The ``graphprune`` command line: compile, inspect, eval, export, methods.

Conventions: exit 0 on success, 1 when the work failed, 2 for bad arguments; an error is one line
on stderr (``--debug`` adds the traceback); ``--json`` prints one JSON document on stdout for
scripts; progress bars go to stderr (``--quiet`` turns them off). User code — a scoring pass or an
op rule — is loaded with ``--plugin FILE.py`` / ``--plugin package.module[:function]`` (or the
``GRAPHPRUNE_PLUGINS`` variable, separated by ``os.pathsep``) before anything else runs.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MODEL_HELP = "a local Hugging Face folder, a .gguf file, or a folder saved by 'graphprune compile'"
EPILOG = """examples:
  graphprune compile ./SmolLM2-135M --ratio 0.3 --method taylor --calib wikitext2 --out out/smol-30
  graphprune inspect out/smol-30
  graphprune eval out/smol-30 --ppl wikitext2 --tasks piqa,arc_easy
  graphprune export out/smol-30 --onnx
Exit status: 0 success, 1 failure, 2 bad arguments. Nothing is downloaded."""


class UsageError(Exception):
    """Bad command-line arguments (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and an exception the caller turns into exit 2)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# ================================================================ argument types
def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction of block parameters removed), got {text}")
    return value


def _integer_at_least(minimum: int, expected: str, bound: str):
    """An argparse type: an integer no smaller than ``minimum`` (messages name the bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


_positive = _integer_at_least(1, "a positive integer", "at least 1")
_non_negative = _integer_at_least(0, "an integer >= 0", ">= 0")


def _round_to(text: str) -> int | dict[str, int]:
    """``64`` (channel widths) or ``channels=64,heads=2`` (per kind)."""
    if "=" not in text:
        return _positive(text)
    out = {}
    for part in text.split(","):
        kind, _, value = part.partition("=")
        if not kind.strip():
            raise argparse.ArgumentTypeError(f"expected KIND=N, got {part!r}")
        out[kind.strip()] = _positive(value)
    return out


def _protect_layers(text: str) -> tuple[int, int]:
    """``4,2``: the first 4 and the last 2 blocks stay whole."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected FIRST,LAST (two counts, e.g. 4,2), got {text!r}")
    return _non_negative(parts[0].strip()), _non_negative(parts[1].strip())


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)  # numbers, true/false, null, lists, quoted strings
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


# ================================================================ the parser
def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    common.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="import user code first (a scoring pass, an op rule): FILE.py or package.module[:function]; repeatable")

    parser = _Parser(
        prog="graphprune", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Make an LLM physically smaller: trace it, find its coupled channel groups, score them, "
                    "and emit a smaller graph (.pt2, ONNX, and a transformers checkpoint when possible).",
    )
    parser.add_argument("--version", action="version", version=f"graphprune {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("compile", parents=[common], help="prune a model and save it",
                       description="Prune MODEL by --ratio of its transformer-block parameters and save it in --out: "
                                   "model.pt2, plan.json, report.json, widths.png, and (when the architecture allows) "
                                   "a transformers checkpoint and the tokenizer. Prints a summary table.")
    c.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    c.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (written atomically; replaced if it exists)")
    c.add_argument("--ratio", type=_ratio, default=None,
                   help="fraction of transformer-block parameters removed, in [0, 1) (default 0.5; with --plan: the plan's)")
    c.add_argument("--method", "-m", default=None, help="scoring pass (see 'graphprune methods'; default magnitude)")
    c.add_argument("--calib", metavar="DATA", help="calibration text for data-driven methods: wikitext2, ptb, tinystories "
                                                  "or a .txt/.txt.gz file (default wikitext2 when the method needs data)")
    c.add_argument("--n-samples", type=_positive, default=16, help="calibration windows (default 16)")
    c.add_argument("--seq-len", type=_positive, default=128, help="tokens per calibration window (default 128)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    c.add_argument("--kinds", type=_csv, default=None, metavar="K1,K2",
                   help="what may be removed: heads, query_heads, head_dim, channels, hidden, experts; whole blocks: attn_block, "
                        "mlp_block, layer; lora_rank (a peft adapter's rank) (default heads,channels)")
    c.add_argument("--allocation", choices=["uniform", "global"], default=None,
                   help="same fraction per layer, or ranked across layers (default: the method's preference)")
    c.add_argument("--round-to", type=_round_to, default=1, metavar="N|KIND=N,...",
                   help="keep channel widths at multiples of N (e.g. 64), or per kind: channels=64,heads=2")
    c.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                   help="protect modules whose name matches (glob, e.g. 'model.layers.0.*'); repeatable")
    c.add_argument("--protect-layers", type=_protect_layers, default=(0, 0), metavar="FIRST,LAST",
                   help="leave the first FIRST and last LAST transformer blocks whole (LLM-Pruner: 4,2)")
    c.add_argument("--option", "-O", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="an option of the scoring pass (see 'graphprune methods'); repeatable")
    c.add_argument("--plan", metavar="PLAN.json", help="replay a saved plan instead of scoring")
    # const: graphprune.reconstruct.DEFAULT_SAMPLES, written out so that the parser loads without torch
    c.add_argument("--reconstruct", nargs="?", const=128, type=_positive, default=None, metavar="N",
                   help="refit the layers that lose inputs by least squares on N windows of the calibration text "
                        "(--calib, else wikitext2; N default 128)")
    c.add_argument("--strict", action="store_true", help="fail on an op without a rule instead of freezing its channels")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="load the model in this dtype (default float32)")
    c.add_argument("--finetune-steps", type=_non_negative, default=0, metavar="N", help="LoRA recovery steps after pruning (default 0: none)")
    c.add_argument("--finetune-data", metavar="DATA", help="fine-tuning text (default: the calibration corpus, else wikitext2)")
    c.add_argument("--finetune-lr", type=float, default=1e-4, metavar="LR", help="fine-tuning learning rate (default 1e-4)")
    c.add_argument("--onnx", action="store_true", help="also export DIR/model.onnx (ONNX Runtime)")
    c.add_argument("--verify", action="store_true", help="check the pruned graph against the masked dense graph")
    c.add_argument("--no-hf", action="store_true", help="do not write a transformers checkpoint")
    c.add_argument("--no-plot", action="store_true", help="do not write widths.png")
    c.set_defaults(handler=cmd_compile)

    i = sub.add_parser("inspect", parents=[common], help="show the groups a model has (or what a saved model kept)",
                       description="Trace and analyse MODEL: the coupled groups found (kind, units, members), what is "
                                   "frozen and why, ops without a rule. For a saved folder: the plan and report too.")
    i.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="load dtype (default float32)")
    i.add_argument("--members", action="store_true", help="list every member (parameter, dim) of every group")
    i.set_defaults(handler=cmd_inspect)

    e = sub.add_parser("eval", parents=[common], help="perplexity and zero-shot accuracy",
                       description="Evaluate a saved pruned folder or a dense MODEL. Without --ppl/--tasks: WikiText-2 perplexity.")
    e.add_argument("model", metavar="DIR_OR_MODEL", help=MODEL_HELP)
    e.add_argument("--ppl", type=_csv, default=None, metavar="C1,C2", help="perplexity corpora: wikitext2, ptb, tinystories or .txt files")
    e.add_argument("--seq-len", default="128", metavar="N|long", help="perplexity window (default 128; 'long' = 1024 or the model's limit)")
    e.add_argument("--max-tokens", type=_positive, default=None, metavar="N", help="score only the first N tokens of each corpus (quick runs)")
    e.add_argument("--tasks", type=_csv, default=None, metavar="T1,T2",
                   help="zero-shot tasks: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, or 'all'")
    e.add_argument("--limit", type=_positive, default=None, metavar="N", help="questions per task (quick runs; default all)")
    e.add_argument("--batch-size", type=_positive, default=4, help="windows/requests per forward pass (default 4)")
    e.add_argument("--onnx", action="store_true", help="evaluate DIR/model.onnx with ONNX Runtime instead of the graph")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="load dtype of a dense MODEL (default float32)")
    e.set_defaults(handler=cmd_eval)

    x = sub.add_parser("export", parents=[common], help="export a saved pruned model (ONNX)",
                       description="Export the pruned graph of a folder saved by 'graphprune compile'.")
    x.add_argument("model", metavar="DIR", help="a folder saved by 'graphprune compile'")
    x.add_argument("--onnx", action="store_true", help="write an ONNX model (dynamic batch and sequence)")
    x.add_argument("--output", metavar="PATH", help="where to write it (default DIR/model.onnx)")
    x.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="ONNX float type (default float32)")
    x.add_argument("--optimize", action="store_true",
                   help="apply ONNX Runtime's fusions (RMSNorm/LayerNorm, skip+norm, GELU); kept only if outputs match "
                        "the plain model within max(1e-4, 1e-5 x the largest output) (fp32; float16: 1e-2 of the largest output), "
                        "else the plain model is written with a warning")
    x.set_defaults(handler=cmd_export)

    m = sub.add_parser("methods", parents=[common], help="list the scoring passes and their options",
                       description="The registered scoring passes (built in, and from --plugin), with their options.")
    m.set_defaults(handler=cmd_methods)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("graphprune")
    except Exception:
        return "unknown"


# ================================================================ helpers
def _out(args, human: str, data: dict) -> None:
    if args.json:
        print(json.dumps(data, indent=1, default=_jsonable))
    else:
        print(human)


@contextlib.contextmanager
def _steps(args, names: list[str]):
    """A bar over named steps on stderr (off with --quiet); the body calls ``step()`` after each."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(names), desc=names[0], disable=not _progress(args), leave=False)

    def step():
        bar.update(1)
        if bar.n < len(names):
            bar.set_description(names[bar.n])

    try:
        yield step
    finally:
        bar.close()


def _out_line(args, human: str) -> None:
    """One result line for a person, as soon as it exists (--json prints one document at the end)."""
    if not args.json:
        print(human, flush=True)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _progress(args) -> bool:
    return not args.quiet


def load_plugins(specs: list[str]) -> list[str]:
    """Import each plugin (a .py file, or package.module[:function] — the function is called)."""
    from .errors import GraphpruneError

    loaded = []
    for spec in specs:
        path = Path(spec)
        try:
            if spec.endswith(".py") or path.is_file():
                if not path.is_file():
                    raise UsageError(f"--plugin {spec}: no such file")
                name = f"graphprune_plugin_{path.stem}"
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                module_name, _, attr = spec.partition(":")
                if os.getcwd() not in sys.path:  # as `python -m` does: a module in the current folder is found
                    sys.path.insert(0, os.getcwd())
                module = importlib.import_module(module_name)
                if attr:
                    hook = getattr(module, attr, None)
                    if not callable(hook):
                        raise UsageError(f"--plugin {spec}: {module_name} has no function {attr!r}")
                    hook()
        except (UsageError, GraphpruneError):
            raise
        except ModuleNotFoundError as exc:
            raise UsageError(f"--plugin {spec}: {exc}") from exc
        except Exception as exc:
            raise GraphpruneError(f"plugin {spec} failed to load: {type(exc).__name__}: {exc}") from exc
        loaded.append(spec)
    return loaded


def _check_source(path: str) -> None:
    """A MODEL that does not exist is a bad argument (exit 2), not a failed run."""
    from .errors import LoadError
    from .io import describe_source

    if not Path(path).exists():
        raise UsageError(f"MODEL {path!r}: no such file or folder ({MODEL_HELP}; nothing is downloaded)")
    try:
        describe_source(path)
    except LoadError as exc:  # a file or folder that is not a model at all: a bad argument
        raise UsageError(f"MODEL {exc}") from exc


def _check_text(name: str | None, flag: str) -> None:
    """A corpus name or a file; anything else is a bad argument (exit 2), found before any work."""
    from .data import check_text_source
    from .errors import GraphpruneError

    if name is not None:
        try:
            check_text_source(name)
        except GraphpruneError as exc:
            raise UsageError(f"{flag}: {exc}") from None


def _check_kinds(kinds: list[str] | None) -> None:
    from .analysis.groups import check_kinds
    from .errors import GraphpruneError

    try:
        check_kinds(kinds or ())
    except GraphpruneError as exc:
        raise UsageError(f"--kinds: {exc}") from None


def _check_plan_replay(args) -> None:
    """With --plan nothing is scored: options that only steer scoring would be silently ignored."""
    steering = {"--ratio": args.ratio is not None, "--method": args.method is not None, "--kinds": args.kinds, "--allocation": args.allocation, "--ignore": args.ignore,
                "--option": args.option, "--round-to": args.round_to != 1,
                "--protect-layers": args.protect_layers != (0, 0)}
    given = [flag for flag, value in steering.items() if value]
    if args.plan and given:
        raise UsageError(f"--plan replays a saved plan, which already says what is removed; {given[0]} has no effect with it")


def _pass_class(method: str):
    from .registry import PASSES, available_passes

    names = available_passes()
    if method not in names:
        raise UsageError(f"unknown --method {method!r}; available: {', '.join(names)} (add yours with --plugin)")
    return PASSES[method]


def _feature(module: str, what: str):
    """Import a part of graphprune built separately; a clear error when it is not there yet."""
    from .errors import GraphpruneError

    if importlib.util.find_spec(f"graphprune.{module}") is None:
        raise GraphpruneError(f"{what} is not available in this graphprune build (graphprune.{module} is missing)")
    return importlib.import_module(f"graphprune.{module}")


# ================================================================ compile
def cmd_compile(args) -> int:
    from . import api
    from .errors import GraphpruneError
    from .io import MANIFEST, check_save_target, load_model
    from .plan import PruningPlan, atomic_write_text
    from .registry import check_options

    _check_source(args.model)
    try:  # --out naming the source model's folder (or any folder of other files) fails now, not after the compile
        check_save_target(Path(args.out))
    except GraphpruneError as exc:
        raise UsageError(f"--out: {exc}") from None
    _check_plan_replay(args)
    method = args.method or "magnitude"
    scorer = _pass_class(method)
    options = dict(args.option)
    try:
        check_options(scorer, options)  # names and types, as compile() would check them
    except GraphpruneError as exc:
        raise UsageError(f"--option: {exc}") from None
    _check_kinds(args.kinds)
    _check_text(args.calib, "--calib")
    _check_text(args.finetune_data, "--finetune-data")
    if args.plan and not Path(args.plan).is_file():
        raise UsageError(f"--plan {args.plan}: no such file")
    calib = args.calib  # also the default fine-tuning text
    if calib is None and getattr(scorer, "needs_calibration", False) and not args.plan:
        calib = "wikitext2"
    if args.finetune_steps:
        _feature("finetune", "--finetune-steps (LoRA recovery)")
    if args.onnx:
        _feature("export", "--onnx")

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    model = loaded.module()
    tokenizer = loaded.tokenizer() if loaded.tokenizer_path is not None else None
    seconds["load"] = time.perf_counter() - t0
    plan = PruningPlan.load(args.plan) if args.plan else None
    compiled = api.compile(
        model, args.ratio, method, kinds=tuple(args.kinds) if args.kinds else None,  # None: the method's own default kinds
        allocation=args.allocation, round_to=args.round_to, ignore=tuple(args.ignore),
        protect_layers=args.protect_layers, calib=None if args.plan else calib,  # a replay scores nothing
        tokenizer=tokenizer, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, plan=plan,
        example_kwargs=loaded.example_kwargs, strict=args.strict, progress=_progress(args), **options,
        reconstruct={"calib": calib or "wikitext2", "n_samples": args.reconstruct} if args.reconstruct else False,
    )
    result: dict = {"model": str(args.model), "out": str(args.out), "method": method, "calib": calib}
    if args.reconstruct:
        result["reconstruct"] = {"calib": calib or "wikitext2", "n_samples": args.reconstruct}
    if args.verify:
        t = time.perf_counter()
        check = api.verify(compiled)
        compiled.report.seconds["verify"] = time.perf_counter() - t
        result["verify"] = {"max_abs": check.max_abs, "max_rel": check.max_rel, "ok": check.ok}
        if not check.ok:
            raise api.GraphpruneError(f"verification failed: {check}")
    if args.finetune_steps:
        compiled, result["finetune"] = _finetune(compiled, args, tokenizer, calib)
    t = time.perf_counter()
    out = compiled.save(args.out, hf=not args.no_hf and "auto", tokenizer=tokenizer, plot=not args.no_plot)
    compiled.report.seconds["save"] = time.perf_counter() - t
    manifest = json.loads((out / MANIFEST).read_text())
    if args.onnx:
        t = time.perf_counter()
        result["onnx"] = str(compiled.export_onnx(out / "model.onnx", progress=_progress(args)))
        compiled.report.seconds["onnx"] = time.perf_counter() - t
    seconds.update(compiled.report.seconds)
    compiled.report.seconds = seconds
    atomic_write_text(out / "report.json", json.dumps(compiled.report.to_dict(), indent=1))  # with save/onnx times
    result.update(report=compiled.report.to_dict(), hf=manifest.get("hf"), plot=manifest.get("plot"),
                  files=sorted(p.name for p in out.iterdir() if not p.name.startswith(".")))
    _out(args, _compile_text(compiled, result, out), result)
    return EXIT_OK


def _compile_text(compiled, result: dict, out: Path) -> str:
    lines = [str(compiled.report), ""]
    if "verify" in result:
        v = result["verify"]
        lines.append(f"verified: pruned == masked dense (max rel {v['max_rel']:.2g})")
    if "finetune" in result:
        f = result["finetune"]
        loss = f" (loss {f['first_loss']:.3f} -> {f['last_loss']:.3f})" if f.get("first_loss") is not None else ""
        lines.append(f"fine-tuned: {f.get('steps')} LoRA steps on {f['data']} with {f.get('backend', '?')}{loss}")
    hf = result.get("hf")
    if hf and hf.get("saved"):
        why = hf.get("why_record") or "its per-layer widths or norm constants are in a graphprune_widths record"
        how = (f"graphprune.load_hf(DIR) loads it; plain from_pretrained cannot: {why}"
               if hf.get("per_layer") else "AutoModelForCausalLM.from_pretrained(DIR) loads it")
        lines.append(f"transformers checkpoint: yes ({how})")
    elif hf:
        lines.append(f"transformers checkpoint: no — {hf.get('reason', '')}")
    lines.append(f"saved to {out}: {', '.join(result['files'])}")
    return "\n".join(lines)


def _finetune(compiled, args, tokenizer, calib):
    """LoRA recovery on the pruned model (adapters merged): the tuned model and what the run did."""
    finetune = _feature("finetune", "--finetune-steps (LoRA recovery)")
    data = args.finetune_data or calib or "wikitext2"
    tuned = finetune.finetune(compiled, data, args.finetune_steps, tokenizer=tokenizer, lr=args.finetune_lr,
                              seq_len=args.seq_len, seed=args.seed, progress=_progress(args))
    info = tuned.finetune_info.to_dict() if tuned.finetune_info is not None else {}
    return tuned, {"data": data, **info}


# ================================================================ inspect
def cmd_inspect(args) -> int:
    from .analysis import DEFAULT_KINDS, analyze
    from .io import MANIFEST, has_hf_checkpoint, load_model
    from .trace import trace

    _check_source(args.model)
    loaded = load_model(args.model, dtype=args.dtype)
    data: dict = {"model": str(args.model), "form": loaded.kind}
    lines = [f"{args.model}  ({_FORMS[loaded.kind]})"]
    if loaded.compiled is not None:
        c = loaded.compiled
        manifest = json.loads((loaded.path / MANIFEST).read_text())
        data.update(plan={g.name: [len(g.keep), g.size] for g in c.plan.groups}, method=c.plan.method,
                    achieved_ratio=c.plan.achieved_ratio, hf=manifest.get("hf"),
                    params_before=c.plan.params_before, params_after=c.plan.params_after)
        lines.append(f"pruned by {c.plan.method or 'a replayed plan'}: {c.plan.achieved_ratio:.1%} of block parameters removed; "
                     f"{c.plan.params_before:,} -> {c.plan.params_after:,} parameters")
        if c.report is not None:
            lines += ["", str(c.report)]
    if loaded.compiled is not None and not has_hf_checkpoint(loaded.path):
        lines.append("\n(no transformers checkpoint in this folder: the pruned graph is not analysed again)")
        _out(args, "\n".join(lines), data)
        return EXIT_OK
    model = loaded.module()
    with _steps(args, ["trace", "analyze"]) as step:
        traced = trace(model, example_kwargs=loaded.example_kwargs)
        step()
        dg = analyze(traced)
    groups = [
        {"name": g.name, "kind": g.kind, "units": g.size, "min_units": g.min_units, "prunable_by_default": g.kind in DEFAULT_KINDS,
         "members": [[m.param, m.dim] for m in g.members]}
        for g in dg.groups
    ]
    frozen = [{"what": w, "why": r} for w, r in dg.frozen_report()]
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    data.update(model_class=traced.model_class, parameters=n_params, groups=groups, frozen=frozen,
                unsupported_ops=dict(dg.walk.unsupported), fingerprint=dg.fingerprint())
    lines += ["", f"{traced.model_class}: {n_params:,} parameters, {len(groups)} groups (fingerprint {dg.fingerprint()})"]
    lines.append(_groups_table(groups, args.members))
    lines.append("")
    if frozen:
        lines.append("frozen (never pruned):")
        lines += [f"  {f['what']}: {f['why']}" for f in frozen]
    else:
        lines.append("frozen: nothing")
    if dg.walk.unsupported:
        lines.append("ops without a rule (add one with graphprune.register_op_rule): "
                     + ", ".join(f"{k} x{v}" for k, v in dg.walk.unsupported.items()))
    _out(args, "\n".join(lines), data)
    return EXIT_OK


_FORMS = {"hf": "Hugging Face folder", "gguf": "GGUF file", "graphprune": "saved by graphprune"}


def _groups_table(groups: list[dict], members: bool) -> str:
    width = max([len(g["name"]) for g in groups] + [5])
    lines = [f"  {'group':<{width}}  {'kind':<11}  {'units':>6}  members"]
    for g in groups:
        mark = "" if g["prunable_by_default"] else "  (only with --kinds)"
        if g.get("min_units", 1) > 1:  # a router's top-k: that many experts always stay
            mark += f"  (keeps at least {g['min_units']})"
        shown = ", ".join(f"{p}:{d}" for p, d in g["members"]) if members else f"{len(g['members'])}"
        lines.append(f"  {g['name']:<{width}}  {g['kind']:<11}  {g['units']:>6}  {shown}{mark}")
    return "\n".join(lines)


# ================================================================ eval
def cmd_eval(args) -> int:
    from .io import load_model

    _check_source(args.model)
    seq_len = args.seq_len if args.seq_len == "long" else _int_or_usage(args.seq_len, "--seq-len")
    corpora = args.ppl or ([] if args.tasks else ["wikitext2"])
    tasks = args.tasks or []
    evaluate = _feature("evaluate", "evaluation")
    if tasks == ["all"]:
        tasks = list(evaluate.TASKS)
    bad = [t for t in tasks if t not in evaluate.TASKS]
    if bad:
        raise UsageError(f"--tasks: unknown task {bad[0]!r}; choose from {', '.join(evaluate.TASKS)} or 'all'")
    for corpus in corpora:
        _check_text(corpus, "--ppl")
    loaded = load_model(args.model, dtype=args.dtype)
    target = loaded.evaluable
    if args.onnx:
        target = _onnx_session(loaded)
    tokenizer = loaded.tokenizer()
    data: dict = {"model": str(args.model), "ppl": {}, "zeroshot": None}
    for corpus in corpora:
        r = evaluate.perplexity(target, tokenizer, corpus, seq_len=seq_len, max_tokens=args.max_tokens,
                                batch_size=args.batch_size, progress=_progress(args))
        data["ppl"][corpus] = r.to_dict()
        _out_line(args, str(r))  # now: a later, longer step failing must not lose this figure
    if tasks:
        z = evaluate.zeroshot(target, tokenizer, tasks=tasks, max_examples=args.limit, batch_size=args.batch_size,
                              progress=_progress(args))
        data["zeroshot"] = z.to_dict()
        _out_line(args, str(z))
    if args.json:
        _out(args, "", data)
    return EXIT_OK


def _int_or_usage(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{flag}: expected an integer or 'long', got {text!r}") from None
    if value < 2:
        raise UsageError(f"{flag}: must be at least 2, got {value}")
    return value


def _onnx_session(loaded):
    from .errors import GraphpruneError

    if loaded.compiled is None:
        raise UsageError("--onnx evaluates DIR/model.onnx of a saved folder; MODEL is not one")
    path = loaded.path / "model.onnx"
    if not path.exists():
        raise GraphpruneError(f"{path} does not exist: run 'graphprune export {loaded.path} --onnx' first")
    runtime = _feature("runtime", "ONNX Runtime evaluation")
    return runtime.OnnxSession.open(path, provider="auto", quiet=True)


# ================================================================ export
def cmd_export(args) -> int:
    from .errors import LoadError
    from .io import describe_source

    if not args.onnx:
        raise UsageError("choose a format: --onnx (model.pt2 and the transformers checkpoint are written by compile)")
    if not Path(args.model).exists():
        raise UsageError(f"DIR {args.model!r}: no such folder")
    if describe_source(args.model) != "graphprune":
        raise UsageError(f"DIR {args.model!r} is not a folder saved by 'graphprune compile' (no graphprune.json)")
    export = _feature("export", "ONNX export")
    from . import api

    t = time.perf_counter()
    compiled = api.load(args.model)
    path = Path(args.output) if args.output else Path(args.model) / "model.onnx"
    try:
        written = export.export_onnx(compiled, path, dtype=args.dtype, optimize=args.optimize, progress=_progress(args))
    except FileNotFoundError as exc:
        raise LoadError(str(exc)) from exc
    size = sum(p.stat().st_size for p in written.parent.glob(written.name + "*"))
    data = {"onnx": str(written), "bytes": size, "seconds": time.perf_counter() - t, "dtype": args.dtype}
    text = f"wrote {written} ({size / 2**20:.1f} MiB, {args.dtype}) in {data['seconds']:.1f}s"
    if args.optimize:  # a rejected fusion has already warned why
        data["fusions"] = export.fusions(written)
        text += "; fused " + (", ".join(f"{op} x{n}" for op, n in data["fusions"].items()) or "nothing")
    _out(args, text, data)
    return EXIT_OK


# ================================================================ methods
def cmd_methods(args) -> int:
    import dataclasses

    from .registry import PASSES, available_passes

    rows = []
    for name in available_passes():
        cls = PASSES[name]
        # a Python callback (bernoulli's on_done) cannot be given as -O KEY=VALUE: not listed
        options = {f.name: f.default for f in dataclasses.fields(cls.Config)
                   if f.default is not dataclasses.MISSING and "Callable" not in str(f.type)}
        doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
        rows.append({"name": name, "needs_calibration": bool(getattr(cls, "needs_calibration", False)),
                     "options": options, "summary": _first_sentence(doc)})
    lines = []
    for r in rows:
        data = "calibration data" if r["needs_calibration"] else "no data"
        lines.append(f"{r['name']:<12} ({data}) {r['summary']}")
        if r["options"]:
            lines.append("             options: " + ", ".join(f"{k}={v!r}" for k, v in r["options"].items()))
    _out(args, "\n".join(lines), {"methods": rows})
    return EXIT_OK


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph (which may wrap over several lines)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph[: end + 1] if end >= 0 else paragraph


# ================================================================ entry point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    _quiet_libraries(debug, args.quiet)
    from .errors import GraphpruneError

    try:
        env = [p for p in os.environ.get("GRAPHPRUNE_PLUGINS", "").split(os.pathsep) if p]
        load_plugins(env + args.plugin)
        return args.handler(args)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        print(f"graphprune {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GraphpruneError as exc:
        if debug:
            traceback.print_exc()
        print(f"graphprune {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"graphprune {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader stopped reading (| head): say nothing, and let exit not flush into it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:  # a bug or an unexpected library failure: still one line, unless --debug
        if debug:
            traceback.print_exc()
        print(f"graphprune {args.command}: unexpected {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:1000] if text else type(exc).__name__


def _quiet_libraries(debug: bool, quiet: bool) -> None:
    """Library chatter (deprecation warnings, transformers info logs) would bury our one-line errors."""
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' own bars (read at its import)
    if debug:
        return
    for name in ("torch.onnx", "torch.export", "torch._export"):  # exporter chatter (missing torchvision, ...)
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
