"""Quality benchmark: every pruning method against the dense model and the LLM-Pruner (Taylor) baseline.

For one model (default SmolLM2-135M-Instruct, fetched by ``../shared/data/fetch_smollm2.sh``): a
dense row; each method at each ratio, without and with LoRA recovery fine-tuning (the same budget
for every method, and for the dense model: PAT's comparison). Columns: parameters, WikiText-2 and
PTB perplexity under LLM-Pruner's 128-token protocol and the long one (1024 or the model's limit),
7-task zero-shot accuracy and its average, scoring time, fine-tuning time, peak memory.
Methods of ``METHODS`` not registered (``graphprune.available_passes()``) appear as missing, without
numbers; a ``--methods`` name that is neither in ``METHODS`` nor a registered pass is rejected (exit 2).
Every pruned model has the layers that lose inputs refit after planning (``RECONSTRUCT_RECIPE``, compile's
``reconstruct=``) before its rows are measured; ``--no-reconstruct`` measures the sliced weights instead.

Each (method, ratio) runs in a fresh subprocess, so its peak memory is its own; ``--jobs N`` runs N
of them at once (each with cores / N torch threads). Each finished case is kept in a cache
(``~/.cache/graphprune/quality`` or ``$GRAPHPRUNE_QUALITY_CACHE``, keyed by model, case, caps and method options), so an interrupted
run resumes where it stopped (``--fresh`` ignores the cache; on a machine without the cache,
``--reuse-report`` takes the finished cases of the out-dir's quality.json that have the same key); the report is rewritten after every
case, with the cases still to run marked *pending*. Writes a markdown report with a table and a
PNG of the kept width per layer per method, plus a JSON file. Below the table the report shows what the
refit changed per case, the cross entropy per tenth of the steps of the trainings on the recovery text
(the dense model's LoRA, PAT's own), and the quality issue's targets:

    python benchmarks/quality.py                                    # full: docs/results.md, docs/quality.json
    python benchmarks/quality.py --quick --model ../shared/data/models/stories260K   # smoke test (/tmp)
    python benchmarks/quality.py --max-tokens 32768 --max-examples 500 --finetune-steps 200
    python benchmarks/quality.py --methods taylor,bernoulli --ratios 0.5 --seeds 0,1,2   # means and spread over 3 seeds
    python benchmarks/quality.py --methods taylor,pat:0.2 --ratios 0.5 --seeds 0,1,2    # PAT at 20% only

Every cap is recorded in the output and printed next to the table. Which calibration windows a
method sees moves its perplexity at 50% without recovery by up to 1.4× (HyWIA over three seeds,
``docs/seeds``), so a comparison of two methods there needs several seeds: with ``--seeds`` each pruned case runs once per seed, the table shows the
means, and the targets call a difference within noise when the two methods' ranges overlap.
The targets themselves (which rows each compares, and when a gap is noise) are in ``_quality_targets.py``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from _memory import lifetime_peak_rss_mib
from _quality_targets import TWENTY, fmt, noise_text, row_acc, row_ppl, targets, targets_table, twenty_note

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SMOLLM2 = Path.home() / ".cache" / "graphprune" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("GRAPHPRUNE_QUALITY_CACHE", Path.home() / ".cache" / "graphprune" / "quality"))
METHODS = ("magnitude", "taylor", "hywia", "loraprune", "bernoulli", "pat")
RATIOS = (0.2, 0.5)
TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaS.", "winogrande": "WinoG.",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


# the refit every method gets after planning (compile's reconstruct=), chosen on WikiText-2 *validation* text
# (docs/validation.md: the dense model's inputs, damp 0.1, 256 windows); --no-reconstruct leaves the sliced weights
RECONSTRUCT_RECIPE = json.dumps({"calib": "wikitext2", "n_samples": 256})
PERPLEXITIES = ("wikitext2@128", "ptb@128", "wikitext2@long", "ptb@long")
ALL_PERPLEXITIES = ",".join(PERPLEXITIES)
MAIN_REPORT = REPO / "docs" / "results.md"


@dataclass
class Caps:
    """Everything that limits or sizes the run (recorded with the results)."""

    max_tokens: int | None = None  # per corpus and protocol, for perplexity (None: the whole split)
    max_examples: int | None = None  # per zero-shot task (None: every question)
    perplexities: str = ALL_PERPLEXITIES  # which corpus@protocol columns to measure
    zeroshot: bool = True  # False: perplexity only (e.g. a whole-split check, which takes long on a CPU)
    finetune_steps: int = 200
    finetune_batch: int = 4
    finetune_seq_len: int = 256
    finetune_lr: float = 5e-4
    finetune_distill: float = 1.0  # weight of the KL to the dense model's logits in the recovery loss (rest: CE)
    finetune_data: str = "instruct/alpaca_data.json.gz"
    lora_r: int = 8
    lora_alpha: float = 16
    calib_samples: int = 32
    calib_seq_len: int = 128
    method_steps: int | None = None  # overrides the `steps` option of passes that train (LoRAPrune, Bernoulli, PAT)
    # the pruning recipe, the same for every method that has no kinds of its own (PAT prunes the hidden size):
    kinds: str = "channels"  # comma list ("" = each method's default); see recipe_note() for why not heads
    protect_layers: str = "4,2"  # first,last blocks left whole by the uniform-allocation methods (LLM-Pruner's recipe)
    reconstruct: str = RECONSTRUCT_RECIPE  # JSON of compile's reconstruct= for every method ("" = none): refit the layers that lose inputs
    eval_batch: int = 8
    device: str = "auto"


QUICK = dict(max_tokens=1024, max_examples=12, finetune_steps=4, finetune_batch=2, finetune_seq_len=256,
             calib_samples=4, calib_seq_len=64, method_steps=4, protect_layers="1,1",
             reconstruct=json.dumps({"calib": "wikitext2", "n_samples": 8}))


def peak_rss_gib() -> float:
    return lifetime_peak_rss_mib() / 1024


# ================================================================ one case (child process)
def evaluate_row(model, tok, caps: Caps, long_len) -> dict:
    from graphprune.evaluate import perplexity, zeroshot

    row: dict = {"ppl": {}}
    t0 = time.perf_counter()
    for key in caps.perplexities.split(","):
        corpus, protocol = key.split("@")
        seq_len = long_len if protocol == "long" else int(protocol)
        if caps.max_tokens is not None and caps.max_tokens < seq_len:
            continue
        r = perplexity(model, tok, corpus, seq_len=seq_len, max_tokens=caps.max_tokens, batch_size=caps.eval_batch, progress=False)
        row["ppl"][key] = {"ppl": r.ppl, "seq_len": r.seq_len, "tokens": r.tokens_scored, "split": r.split}
    row["zeroshot"], row["zeroshot_average"] = {}, None
    if caps.zeroshot:
        zs = zeroshot(model, tok, max_examples=caps.max_examples, batch_size=caps.eval_batch, progress=False)
        row["zeroshot"] = {k: v.to_dict() for k, v in zs.tasks.items()}
        row["zeroshot_average"] = zs.average
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def trains_at_recovery_budget(method: str, caps: Caps) -> bool:
    """PAT's claim is against dense LoRA at the same budget: it trains on the recovery's data and budget."""
    return method == "pat" and caps.finetune_steps > 0


def finetune_data_path(caps: Caps) -> str:
    """The recovery data as ``graphprune.finetune`` takes it: a corpus name (its training split), an
    absolute path, or a path inside the shared data folder."""
    from graphprune.data import CORPORA, data_dir

    if caps.finetune_data in CORPORA or Path(caps.finetune_data).is_absolute():
        return caps.finetune_data
    return str(data_dir() / caps.finetune_data)


def method_config(method: str, caps: Caps, extra: dict) -> dict:
    """The options ``compile`` gets for ``method``: ``--method-config`` first, then the caps' recipe.

    The recipe (``kinds``) applies to every method without kinds of its own; ``protect_layers``
    only to those that allocate uniformly — a global ranking (HyWIA, Bernoulli) decides each
    layer's share from its scores, which is the point of those methods.
    """
    import dataclasses

    from graphprune.registry import get_pass

    cls = get_pass(method)
    config = dict(extra.get(method, {}))
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if trains_at_recovery_budget(method, caps):
        for key, value in (("steps", caps.finetune_steps), ("batch_size", caps.finetune_batch),
                           ("lora_r", caps.lora_r), ("lora_alpha", caps.lora_alpha)):
            config.setdefault(key, value)
    if caps.kinds and getattr(cls, "default_kinds", None) is None:
        config.setdefault("kinds", caps.kinds.split(","))
        allocation = config.get("allocation", getattr(cls, "default_allocation", "uniform"))
        if caps.protect_layers and allocation == "uniform":
            config.setdefault("protect_layers", [int(n) for n in caps.protect_layers.split(",")])
    if caps.method_steps is not None and "steps" in fields:
        config.setdefault("steps", caps.method_steps)
    if caps.reconstruct:  # on WikiText-2 windows unless it names its text (compile's calib here is the method's)
        config.setdefault("reconstruct", {"calib": "wikitext2", **json.loads(caps.reconstruct)})
    return config


def recovery_options(caps: Caps, dense=None) -> dict:
    """``graphprune.finetune`` keywords of the benchmark's recovery: a pruned model (``dense`` given)
    learns from the dense model's logits, the dense model itself from the text."""
    options = {"steps": caps.finetune_steps, "batch_size": caps.finetune_batch, "seq_len": caps.finetune_seq_len,
               "lr": caps.finetune_lr, "lora_r": caps.lora_r, "lora_alpha": caps.lora_alpha}
    if dense is not None and caps.finetune_distill:
        options.update(distill_from=dense, distill_weight=caps.finetune_distill)
    return options


def recovery_windows(caps: Caps, tok, steps: int, batch: int, seed: int = 0):
    """PAT's training text: the recovery data (prompt + response), ``steps × batch`` windows of
    ``finetune_seq_len`` tokens: as many tokens of the same data as the dense model's LoRA recovery."""
    from graphprune.data import calibration
    from graphprune.finetune import alpaca_prompt, read_instruction_json

    path = finetune_data_path(caps)
    if not path.endswith((".json", ".json.gz")):
        return calibration(path, tok, n_samples=steps * batch, seq_len=caps.finetune_seq_len, seed=seed)
    records = read_instruction_json(path)[: 4 * steps * batch]
    texts = [alpaca_prompt(r) + r["output"] for r in records]
    return calibration(texts, tok, n_samples=steps * batch, seq_len=caps.finetune_seq_len, seed=seed)


def reconstruct_note(caps: dict, validation: str = "validation.md") -> list[str]:
    if not caps.get("reconstruct"):
        return ["**No reconstruction** (`--no-reconstruct`): each pruned model keeps the dense weights of its kept units, "
                "sliced, until its recovery.", ""]
    return [f"**Reconstruction** (`reconstruct={caps['reconstruct']}` for every method, `graphprune.reconstruct`): after "
            "planning, the layers that lose inputs (each MLP's down-projection under the channels recipe; every projection "
            "that reads the hidden size under PAT's) are refit by least squares on "
            "calibration windows so that their outputs stay close to the dense model's; the recovery starts from the "
            "refit model. The damping and the sample count were chosen on WikiText-2 *validation* text "
            f"([validation.md]({validation})).", ""]


def recipe_note(caps: dict, validation: str = "validation.md") -> list[str]:
    """What every method removes and protects (the options each case ran with are in the JSON); ``validation``:
    the link to docs/validation.md from the report's folder."""
    kinds = caps.get("kinds")
    if not kinds:
        return []
    protect = caps.get("protect_layers")
    return [*reconstruct_note(caps, validation),
        f"**Recipe**: every method without kinds of its own removes `{kinds}`"
        + (f"; those with uniform allocation (magnitude, Taylor, LoRAPrune) leave the first and last blocks "
           f"whole (`protect_layers={protect}`, " + ("LLM-Pruner's 4 and 2 of LLaMA-7B's 32)" if protect.replace(" ", "") == "4,2"
                                                    else "LLM-Pruner's recipe uses 4,2 of LLaMA-7B's 32)") if protect else "")
        + "; HyWIA and Bernoulli rank units across layers."
        + (" PAT removes hidden channels and trains (HSMs + LoRA of the recovery's rank) on the recovery data for "
           "the recovery's steps and batch, so its row without recovery has had the dense LoRA row's budget."
           if caps.get("finetune_steps") else "")
        + " Why not heads by default: a unit is a whole KV group, a third of "
          "SmolLM2's attention per layer; Taylor at 20% with heads and channels gives WikiText-2 *validation* PPL "
          "97.8, with channels only 65.4 (dense 42.2; that text still had `<unk>` markers). The recipe and the "
          "options of `--method-config` were chosen on that validation text, never on the splits reported here: "
          f"[validation.md]({validation}).",
        "",
    ]


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or "?"


def case_name(method: str, ratio: float | None = None, seed: int = 0) -> str:
    """``dense``, ``taylor:0.5``, ``taylor:0.5:seed1``: seed 0's name (and so its cache key) is the
    name cases had before seeds existed."""
    if method == "dense":
        return method
    return f"{method}:{ratio}" + (f":seed{seed}" if seed else "")


def method_ratios(methods: str, ratios: list[float]) -> list[tuple[str, float]]:
    """``--methods taylor,pat:0.2``: a bare method runs at every ``--ratios`` value, ``method:ratio``
    at that ratio only (so one report can hold PAT's 20% seeds next to the others' 50% ones)."""
    pairs = []
    for entry in filter(None, (m.strip() for m in methods.split(","))):
        method, _, ratio = entry.partition(":")
        try:
            pairs += [(method, float(ratio))] if ratio else [(method, r) for r in ratios]
        except ValueError:
            sys.exit(f"quality.py: --methods takes METHOD or METHOD:RATIO entries, got {entry!r}")
    return list(dict.fromkeys(pairs))


def _ratios_arg(text: str) -> list[float]:
    """``--ratios 0.2,0.5``: parsed (and checked) by argparse, so a typo exits 2 before any model loads."""
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a comma list of numbers in (0, 1), got {text!r}") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"takes a comma list of numbers in (0, 1), got {text!r}")
    return ratios


def _reconstruct_arg(text: str) -> str:
    """``--reconstruct``: a JSON object of ``compile``'s reconstruct options, checked (and written one way, so
    that the cache key does not depend on spacing) before any model loads."""
    from graphprune.errors import GraphpruneError
    from graphprune.reconstruct import reconstruct_options

    try:
        options = json.loads(text)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
        reconstruct_options(options)
    except (ValueError, GraphpruneError) as e:
        raise argparse.ArgumentTypeError(f"takes a JSON object of reconstruct options, got {text!r}: {e}") from None
    return json.dumps(options)


def _methods_arg(text: str) -> str:
    """``--methods``: each name must be one the benchmark knows (``METHODS``, shown as *missing* when it is
    not registered yet) or a registered pass; a ratio after ``:`` must be a number in (0, 1)."""
    import graphprune

    known = {"dense", *METHODS, *graphprune.available_passes()}
    for entry in filter(None, (m.strip() for m in text.split(","))):
        method, _, ratio = entry.partition(":")
        if method not in known:
            raise argparse.ArgumentTypeError(f"unknown method {method!r}; known: {', '.join(sorted(known))}")
        try:
            ok = not ratio or 0 < float(ratio) < 1
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"takes METHOD or METHOD:RATIO entries with RATIO in (0, 1), got {entry!r}")
    return text


def parse_case(case: str) -> tuple[str, float, int]:
    method, _, rest = case.partition(":")
    ratio, _, seed = rest.partition(":")
    return method, float(ratio or 0), int(seed.removeprefix("seed") or 0)


def run_case(case: str, model_path: str, caps: Caps, extra: dict) -> dict:
    import torch

    import graphprune
    from graphprune.data import calibration
    from graphprune.evaluate.perplexity import LONG_CONTEXT
    from graphprune.io import load_model

    device = caps.device if caps.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(model_path)
    model, tok = loaded.model.to(device), loaded.tokenizer()
    limit = getattr(model.config, "max_position_embeddings", None)
    long_len = min(LONG_CONTEXT, limit) if limit else LONG_CONTEXT
    method, ratio, seed = parse_case(case)
    # the seed draws the calibration windows and every random choice of the method and the recovery
    out: dict = {"case": case, "method": method, "ratio": ratio, "seed": seed, "device": device, "rows": [],
                 "commit": head_commit()}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if method == "dense":
        pruned, params = model, model.num_parameters()
        out.update(score_seconds=None, compile_seconds=None, config={})
    else:
        config = method_config(method, caps, extra)
        out["config"], out["calibration"] = config, CALIBRATION_TEXT
        if trains_at_recovery_budget(method, caps):
            calib = recovery_windows(caps, tok, config["steps"], config["batch_size"], seed)
        else:
            calib = calibration("wikitext2", tok, n_samples=caps.calib_samples, seq_len=caps.calib_seq_len, seed=seed)
        t0 = time.perf_counter()
        # the sizes and tokenizer serve options that name a text of their own (PAT's init_calib)
        pruned = graphprune.compile(model, ratio, method=method, calib=calib, tokenizer=tok, n_samples=caps.calib_samples,
                                    seq_len=caps.calib_seq_len, seed=seed, progress=False, **config)
        out["compile_seconds"] = time.perf_counter() - t0
        report = pruned.report
        out["score_seconds"] = report.seconds.get("score")
        if report.reconstruction:  # its time and how far each refit layer's output error fell (per layer in the report)
            out["reconstruction"] = {**{k: v for k, v in report.reconstruction.items() if k != "errors"},
                                     "seconds": report.seconds.get("reconstruct")}
        out["achieved_ratio"] = report.achieved_ratio
        out["scoring"] = report.scoring  # what each pass recorded (a training pass: its steps and losses)
        out["per_layer"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in r.items()} for r in report.per_layer()]
        params = pruned.num_parameters()
    out["params"] = params
    out["peak_rss_gib_compile"] = peak_rss_gib()
    out["peak_cuda_gib_compile"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    out["rows"].append({"recovery": "none", **evaluate_row(pruned, tok, caps, long_len)})
    if caps.finetune_steps > 0:
        t0 = time.perf_counter()
        tuned = graphprune.finetune(pruned, finetune_data_path(caps), tokenizer=tok, progress=False, seed=seed,
                                    **recovery_options(caps, None if method == "dense" else model))
        info = tuned.finetune_info
        row = {"recovery": "lora", "finetune_seconds": time.perf_counter() - t0, "finetune_backend": info.backend,
               "finetune_first_loss": info.losses[0], "finetune_last_loss": info.losses[-1],
               "finetune_loss_by_tenth": info.loss_by_tenth}
        out["rows"].append({**row, **evaluate_row(tuned, tok, caps, long_len)})
    out["peak_rss_gib"] = peak_rss_gib()
    return out


# ================================================================ orchestration (parent process)
# caps added after cases were cached: at these values they leave a case's key as it was (for reconstruct, "" is
# no refit, which every case ran with before reconstruction existed; the recipe's own key names it)
KEY_DEFAULTS = {"perplexities": ALL_PERPLEXITIES, "zeroshot": True, "reconstruct": ""}
# the calibration text of the pruned cases (the dense ones have none): when the library changes what
# "wikitext2" calibration reads, every pruned case must run again, so it is part of their key
CALIBRATION_TEXT = "WikiText-2 train without its <unk> markers"
OLD_CALIBRATION_TEXT = "WikiText-2 train with its <unk> markers"
MARKERS_DROPPED_AT = "1863c3d"  # the library's first commit that reads WikiText-2 without the markers


def calibration_of(result: dict) -> str:
    """The calibration text a pruned case ran on: recorded since ea7d309; before that, the commit says."""
    if "calibration" in result:
        return result["calibration"]
    commit = result.get("commit") or ""
    newer = subprocess.run(["git", "merge-base", "--is-ancestor", MARKERS_DROPPED_AT, commit], cwd=REPO,
                           capture_output=True).returncode == 0 if commit and commit != "?" else False
    return CALIBRATION_TEXT if newer else OLD_CALIBRATION_TEXT


def reusable_cases(report_json: Path, model: str, caps: dict, method_config: dict) -> dict[str, dict]:
    """Finished cases of an earlier report (its quality.json) that this run would compute again with the
    same key: same model, case, caps, the case's method options and calibration text (``--reuse-report``,
    for a machine without the cache; the code each case ran is in its ``commit``)."""
    if not report_json.exists():
        return {}
    data = json.loads(report_json.read_text())
    meta = data.get("meta", {})
    out = {}
    for res in data.get("results", []):
        case = res.get("case")
        if not case or not res.get("rows") or res.get("error") or res.get("pending"):
            continue
        if parse_case(case)[0] != "dense" and calibration_of(res) != CALIBRATION_TEXT:
            continue
        theirs = cache_path(case, meta.get("model", ""), meta.get("caps", {}), meta.get("method_config", {}))
        if theirs == cache_path(case, model, caps, method_config):
            out[case] = {k: v for k, v in res.items() if k != "cached"}
    return out


def cache_path(case: str, model: str, caps: dict, method_config: dict) -> Path:
    """Where a finished case is kept: one file per (model, case — with its seed —, caps, the options
    of the case's own method), so changing one method's options re-runs only that method's cases."""
    method = parse_case(case)[0]
    own = method_config.get(method, {})
    caps = {k: v for k, v in caps.items() if k not in KEY_DEFAULTS or v != KEY_DEFAULTS[k]}
    if method == "dense":
        caps.pop("reconstruct", None)  # nothing is pruned, so nothing is refit
    key = {"case": case, "model": str(model), "caps": caps, "options": own}
    if method != "dense":
        key["calibration"] = CALIBRATION_TEXT
    key = json.dumps(key, sort_keys=True)
    return CACHE_DIR / f"{case.replace(':', '_')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def run_in_child(case: str, args, caps: Caps, threads: int | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, __file__, "--case", case, "--result", result_path, "--model", args.model,
           "--caps", json.dumps(asdict(caps)), "--method-config", json.dumps(args.method_config)]
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
            return {"case": case, "error": "\n".join(tail), "wall_seconds": time.perf_counter() - t0}
        result = json.loads(Path(result_path).read_text())
        result["wall_seconds"] = time.perf_counter() - t0
        return result
    finally:
        Path(result_path).unlink(missing_ok=True)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def merge_seeds(results: list[dict]) -> list[dict]:
    """One result per (method, ratio). A case run with several seeds becomes one whose figures are
    the means over the seeds that finished; each perplexity and the zero-shot average also keep the
    value of every seed (``per_seed``), from which the targets tell a difference from the spread."""
    groups: dict[tuple, list[dict]] = {}
    for res in results:
        groups.setdefault((res.get("method"), round(res.get("ratio", 0), 9)), []).append(res)
    merged = []
    for group in groups.values():
        done = [r for r in group if r.get("rows")]
        if len(group) == 1:
            merged.append(group[0])
        elif not done:  # pending or failed: shown once, with how many seeds it has
            merged.append({**group[0], "seeds": [], "seed_cases": len(group)})
        else:
            merged.append(_mean_of_seeds(done, len(group)))
    return merged


def _mean_of_seeds(done: list[dict], cases: int) -> dict:
    first = done[0]
    out = {**first, "case": case_name(first["method"], first["ratio"]), "seeds": [r.get("seed", 0) for r in done],
           "seed_cases": cases, "score_seconds": _mean([r.get("score_seconds") for r in done]),
           # a global ranking may keep a few units more with one sample than another; the plot shows the first seed's widths
           "params": round(_mean([r["params"] for r in done]))}
    for key in ("peak_cuda_gib_compile", "peak_rss_gib_compile"):
        out[key] = max((r[key] for r in done if r.get(key) is not None), default=None)
    by_recovery = [{x["recovery"]: x for x in r["rows"]} for r in done]
    out["rows"] = []
    for row in first["rows"]:
        same = [rows[row["recovery"]] for rows in by_recovery if row["recovery"] in rows]
        ppl = {}
        for key, value in row["ppl"].items():
            values = [x["ppl"][key]["ppl"] for x in same if key in x["ppl"]]
            ppl[key] = {**value, "ppl": _mean(values), "per_seed": values}
        zeroshot = {task: {**value, "score": _mean([x["zeroshot"][task]["score"] for x in same if task in x["zeroshot"]])}
                    for task, value in row["zeroshot"].items()}
        averages = [x["zeroshot_average"] for x in same if x.get("zeroshot_average") is not None]
        out["rows"].append({**row, "ppl": ppl, "zeroshot": zeroshot, "zeroshot_average": _mean(averages),
                            "zeroshot_average_per_seed": averages,
                            "finetune_seconds": _mean([x.get("finetune_seconds") for x in same])})
    return out


def _seeds_label(res: dict) -> str:
    n = len(res.get("seeds", [res.get("seed", 0)]))
    return f"{n}" + (f" of {res['seed_cases']}" if res.get("seed_cases", n) != n else "")


def majority_answers(max_examples: int | None) -> dict[str, dict]:
    """Per task, the answer most often right among the questions asked: its share (what a model that always gives
    it scores), the question count, and its text where every question offers the same choices (BoolQ's yes / no)."""
    from collections import Counter

    from graphprune.evaluate.zeroshot import load_task

    out = {}
    for task in TASK_LABELS:
        questions = load_task(task, max_examples)
        gold, count = Counter(q.gold for q in questions).most_common(1)[0]
        fixed = len({tuple(q.continuations) for q in questions}) == 1
        out[task] = {"share": count / len(questions), "n": len(questions),
                     "answers": [c.strip() for c in questions[0].continuations] if fixed else None, "gold": gold}
    return out


def majority_average(majority: dict[str, dict]) -> float:
    return sum(100 * m["share"] for m in majority.values()) / len(majority)


def majority_row(majority: dict[str, dict], head: list[str]) -> str:
    cells = ["*majority answer*", *["–"] * (len(head) - 1 - len(TASK_LABELS) - 4)]  # the tasks, then avg and 3 more
    cells += [fmt(100 * majority[t]["share"], 1) for t in TASK_LABELS]
    cells += [fmt(majority_average(majority), 2), "–", "–", "–"]
    return "| " + " | ".join(cells) + " |"


def majority_note(majority: dict[str, dict]) -> list[str]:
    """Where a task's answers are the same two words for every question (BoolQ), a model's preference for one of
    them alone sets its score: say how far apart the two preferences put the average."""
    lines = []
    for task, m in majority.items():
        if not m.get("answers") or len(m["answers"]) != 2:
            continue
        right, other = m["answers"][m["gold"]], m["answers"][1 - m["gold"]]
        share = 100 * m["share"]
        lines.append(f"On {TASK_LABELS[task]}, {share:.0f}% of the {m['n']} questions asked are answered \"{right}\": a model that "
                     f"always says \"{right}\" scores {share:.0f}%, one that always says \"{other}\" {100 - share:.0f}%, so a "
                     f"change of preference alone moves the {len(TASK_LABELS)}-task average by {(2 * share - 100) / len(TASK_LABELS):.1f} points.")
    if not lines:
        return []
    return [" ".join(["*Majority answer*: the score of always giving the answer most often right among the questions asked.",
                      *lines]), ""]


def table(results: list[dict], long_len: int, majority: dict[str, dict] | None = None) -> str:
    """One line per (method, ratio, recovery); with several seeds, the means (a *seeds* column says over how many);
    with ``majority`` (:func:`majority_answers`), a last line with what always giving the most common answer scores."""
    seeded = any(len(res.get("seeds", ())) > 1 or res.get("seed_cases", 1) > 1 for res in results)
    head = ["method", "ratio", *(["seeds"] if seeded else []), "recovery", "params", "Wiki2@128", "PTB@128",
            f"Wiki2@{long_len}", f"PTB@{long_len}", *TASK_LABELS.values(), "avg", "score s", "FT s", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        label = res["method"]
        ratio = [f"{res.get('ratio', 0):.0%}" if label != "dense" else "–", *([_seeds_label(res)] if seeded else [])]
        if res.get("missing") or res.get("error") or res.get("pending"):
            status = "*missing*" if res.get("missing") else "*pending*" if res.get("pending") else "*failed*"
            lines.append(f"| {label} | {' | '.join(ratio)} | {status} | " + " | ".join(["–"] * (len(head) - 3 - seeded)) + " |")
            continue
        for row in res["rows"]:
            ppl = row["ppl"]
            cells = [label, *ratio, row["recovery"], fmt(res["params"])]
            for key in ("wikitext2@128", "ptb@128", "wikitext2@long", "ptb@long"):
                cells.append(fmt(ppl[key]["ppl"]) if key in ppl else "–")
            zs = row["zeroshot"]
            cells += [fmt(100 * zs[t]["score"], 1) if t in zs else "–" for t in TASK_LABELS]
            cells.append(fmt(row_acc(row), 2))
            cells.append(fmt(res.get("score_seconds"), 1))
            cells.append(fmt(row.get("finetune_seconds"), 0) if row["recovery"] != "none" else "–")
            peak = res.get("peak_cuda_gib_compile") or res.get("peak_rss_gib_compile")
            cells.append(fmt(peak, 2))
            lines.append("| " + " | ".join(cells) + " |")
    if majority:
        lines.append(majority_row(majority, head))
    return "\n".join(lines)


def reconstruction_table(results: list[dict]) -> list[str]:
    """What the refit changed in each case: the layers refit and their mean relative output error against the
    dense model on the refit's windows, sliced and refit (a case of several seeds: its first seed's)."""
    done = [r for r in results if (r.get("reconstruction") or {}).get("layers")]
    if not done:
        return []
    lines = ["**The refit per case**: layers refit and their mean relative output error ‖W·X − W'·X_K‖² / ‖W·X‖² "
             "against the dense model on the refit's calibration windows, with the sliced weights and after the refit.", "",
             "| method | ratio | layers | error sliced | error refit | refit s |", "|---|---|---:|---:|---:|---:|"]
    for r in done:
        rc = r["reconstruction"]
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {rc['layers']} | {rc['mean_error_sliced']:.3g} | "
                     f"{rc['mean_error_refit']:.3g} | {fmt(rc.get('seconds'), 0)} |")
    unrecorded = [r for r in results if r.get("rows") and r.get("method") != "dense" and "reconstruction" not in r]
    if unrecorded:
        lines += ["", "Not in this table: " + ", ".join(f"{r['method']} {r['ratio']:.0%}" for r in unrecorded)
                  + f" (run at {', '.join(sorted({r.get('commit') or '?' for r in unrecorded}))}, before the benchmark kept "
                    "the refit's summary; their rows are of refit models all the same, as their cache key says)."]
    # a pass that trains its masks into the weights (PAT) leaves the removed inputs nothing to carry
    exact = sorted({r["method"] for r in done if r["reconstruction"]["mean_error_sliced"] < 1e-9})
    if exact:
        lines += ["", f"For {', '.join(exact)} the sliced error is already nil: in the pass's trained model the removed "
                      "inputs contribute nothing (PAT's masks zero the hidden channels it removes, in every write to the "
                      "residual stream), so the refit has nothing to move and those rows are as without it."]
    return lines + [""]


def training_curves(results: list[dict]) -> list[str]:
    """How training moved the cross entropy on the recovery data, per tenth of the steps: the dense model's LoRA
    recovery and each pass that trains on that data with it (PAT; a case of several seeds: its first seed's).
    The pruned models' recoveries are left out: their loss is the KL to the dense model, another quantity."""
    dense, passes = [], []
    for r in results:
        for row in r.get("rows", ()):
            if r.get("method") == "dense" and row.get("recovery") != "none" and row.get("finetune_loss_by_tenth"):
                dense.append(("dense + LoRA recovery", row["finetune_loss_by_tenth"]))
        for name, info in (r.get("scoring") or {}).items():
            if isinstance(info, dict) and info.get("task_loss_by_tenth") and not info.get("distill"):
                passes.append((f"{r['method']} {r['ratio']:.0%}: its {name} pass", info["task_loss_by_tenth"]))
    if not passes:  # the dense curve alone compares with nothing
        return []
    curves = dense + passes
    parts = max(len(c) for _, c in curves)
    lines = ["**Training curves**: mean cross entropy per tenth of the steps on the recovery data, for the dense "
             "model's LoRA recovery (on its examples' responses, as `graphprune.finetune` trains on instruction data) and "
             "for each pass that trains on that data with the same budget (on windows of prompt and response text: a "
             "different average, so compare each curve's shape, not the two levels). PAT's mask keeps every channel at "
             "least half on until half-way (its bias b_t), and its logits freeze at 80% of the steps: its later tenths are "
             "of a model with the channels it removes (nearly) off.", "",
             "| run | " + " | ".join(f"{i + 1}/{parts}" for i in range(parts)) + " |",
             "|---|" + "---:|" * parts]
    lines += [f"| {label} | " + " | ".join([f"{v:.2f}" for v in curve] + ["–"] * (parts - len(curve))) + " |"
              for label, curve in curves]
    return lines + [""]


def seeds_table(results: list[dict]) -> list[str]:
    """Each seed's figures for the cases run with several (the table shows their means)."""
    lines = []
    for res in results:
        if len(res.get("seeds", ())) < 2:
            continue
        for row in res["rows"]:
            cells = [", ".join(fmt(v) for v in row["ppl"][key].get("per_seed", ())) if key in row["ppl"] else "–"
                     for key in ("wikitext2@128", "ptb@128")]
            cells.append(", ".join(fmt(100 * v, 1) for v in row.get("zeroshot_average_per_seed", ())) or "–")
            lines.append(f"| {res['method']} | {res['ratio']:.0%} | {row['recovery']} | "
                         f"{', '.join(map(str, res['seeds']))} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return ["## Seeds", "",
            "A seed draws the calibration windows and every random choice of the method (Bernoulli's mask samples, "
            "LoRAPrune's and PAT's initial adapters) and of the recovery (its adapters, its order of examples); the "
            "dense model runs once (seed 0). The table above shows the means; each seed's figures:", "",
            "| method | ratio | recovery | seeds | Wiki2@128 | PTB@128 | 0-shot avg % |", "|---|---|---|---|---|---|---|",
            *lines, ""]


def plot_widths(results: list[dict], path: Path) -> Path | None:
    """Kept fraction per layer, one panel per (kind, ratio), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("per_layer")]
    if not done:
        return None
    kinds = sorted({k for r in done for row in r["per_layer"] for k in row if k != "block"})
    ratios = sorted({r["ratio"] for r in done})
    methods = list(dict.fromkeys(r["method"] for r in done))
    n_layers = max(sum(row["block"] != "(global)" for row in r["per_layer"]) for r in done) or 1
    fig, axes = plt.subplots(len(kinds), len(ratios), figsize=(5.5 * len(ratios), 2.8 * len(kinds) + 0.5), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, ratio in enumerate(ratios):
            ax = axes[i][j]
            for n, r in enumerate(r for r in done if r["ratio"] == ratio):
                blocks = [row for row in r["per_layer"] if row["block"] != "(global)"]
                layers = [row for row in blocks if kind in row]
                shared = [row[kind] for row in r["per_layer"] if row["block"] == "(global)" and kind in row]
                if layers:
                    fractions = [row[kind][0] / row[kind][1] for row in layers]
                elif shared:  # one width for every layer (the hidden size)
                    fractions = [shared[0][0] / shared[0][1]] * n_layers
                else:
                    continue
                # uniform allocations overlap: line styles tell them apart
                ax.plot(range(len(fractions)), fractions, label=r["method"], marker="o^sDvx"[n % 6], markersize=3,
                        linestyle=("-", "--", ":", "-.")[n % 4], color=f"C{methods.index(r['method'])}")
                ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"{kind}, ratio {ratio:.0%}", fontsize=9)
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("layer", fontsize=8)
            ax.set_ylabel("kept fraction", fontsize=8)
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), fontsize=8, loc="upper center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    from graphprune.plan import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    finally:
        plt.close(fig)
    return path


def noise_note(caps: dict) -> list[str]:
    """How far apart two zero-shot numbers must be to mean anything, at this run's question count."""
    n = caps.get("max_examples")
    if not n or not caps.get("zeroshot", True):
        return []
    task = 100 * (0.25 / n) ** 0.5  # binomial standard error at p = 0.5, the worst case
    avg = task / len(TASK_LABELS) ** 0.5
    gap = 2 * (2 * avg**2) ** 0.5  # two standard errors of the difference of two such averages
    return [f"With {n} questions per task, one task's accuracy has a standard error of up to {task:.1f} points and the "
            f"{len(TASK_LABELS)}-task average about {avg:.1f} points: zero-shot differences between two rows smaller than about "
            f"{gap:.0f} points are noise (a model with a perplexity in the thousands still scores near chance, "
            "which is 25-50% per task). Perplexity is the sharper measure here.", ""]


def write_report(meta: dict, results: list[dict], out_md: Path, out_json: Path) -> None:
    from graphprune.data import CORPORA
    from graphprune.plan import atomic_write_text

    caps = meta["caps"]
    long_len = meta["long_len"]
    runs, results = results, merge_seeds(results)  # the JSON keeps every seed's case
    png = plot_widths(results, out_md.with_name(out_md.stem + "_widths.png"))
    lines = [
        "# Quality: pruning methods on " + meta["model_name"],
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}; the cases ran at commit "
        f"{', '.join(sorted({r['commit'] for r in runs if r.get('commit')})) or meta['commit']}; cached cases are reused, see the module docstring).",
        "Do not edit by hand: re-run the command.",
        "",
        "**Caps of this run** (numbers are only comparable between runs with the same caps): "
        f"perplexity on {'the first ' + fmt(caps['max_tokens']) if caps['max_tokens'] else 'all the'} tokens of each split "
        f"(WikiText-2 test, PTB validation; windows of 128 and {long_len} tokens, non-overlapping"
        + ("" if caps.get("perplexities", ALL_PERPLEXITIES) == ALL_PERPLEXITIES else f"; measured: {caps['perplexities']}")
        + ("); zero-shot on " + (f"the first {caps['max_examples']}" if caps['max_examples'] else "all the") + " questions of each task"
           if caps.get("zeroshot", True) else "); no zero-shot") + f"; LoRA recovery (r={caps['lora_r']}, α={caps['lora_alpha']}) for "
        f"{caps['finetune_steps']} steps × {caps['finetune_batch']} sequences of ≤{caps['finetune_seq_len']} tokens, lr {caps['finetune_lr']}, "
        f"on `{caps['finetune_data']}`" + (" (its train split)" if caps["finetune_data"] in CORPORA else "")
        + (f", loss {caps['finetune_distill']:g} × KL to the dense model's logits + {1 - caps['finetune_distill']:g} × cross-entropy "
           f"(the dense model's own run: cross-entropy)" if caps.get("finetune_distill") else ", cross-entropy loss")
        + " — the same for every method and for the dense model; calibration "
        f"{caps['calib_samples']} × {caps['calib_seq_len']} tokens of {CALIBRATION_TEXT.replace('<unk>', '`<unk>`')}"
        + (f"; passes that train ran {caps['method_steps']} steps" + (" (PAT: the recovery's, see below)" if caps["finetune_steps"] else "")
           if caps["method_steps"] is not None else "") + ".",
        "",
        *recipe_note(caps, Path(os.path.relpath(REPO / "docs" / "validation.md", out_md.resolve().parent)).as_posix()),
        "Zero-shot columns: acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for HellaSwag, ARC-c, OpenBookQA "
        "(LLM-Pruner's convention), in %. *score s*: time of the scoring pass; *FT s*: recovery fine-tuning time; "
        "*peak GiB*: peak memory of the process up to the end of pruning (GPU memory on CUDA, else RSS, model load included).",
        "",
        table(results, long_len, meta.get("majority")),
        "",
        *noise_note(caps),
        *majority_note(meta.get("majority") or {}),
        *reconstruction_table(results),
        *training_curves(results),
        *seeds_table(results),
    ]
    checks = targets(results)
    meta = {**meta, "targets": checks}
    lines += ["## Targets", "", "The quality issue's targets, checked on the table above (computed by the benchmark, "
              "not by hand):", "", targets_table(checks), "", *twenty_note(checks)]
    whole = whole_split_checks(out_md)
    if whole:
        meta["whole_split_targets"] = whole
        lines += ["The capped table's 20% figure comes from the first few thousand tokens of the test split, where even "
                  "the dense model's perplexity moves with the slice; so the 20% target is also checked on all of it:", "",
                  *(line for c in whole for line in whole_split_text(c))]
    seeded = seeds_check(out_md, meta)
    if seeded is not None:
        meta["seeds_targets"] = seeded
        lines += seeds_text(seeded)
    quoted = {}
    for key, folder, title in QUOTED_TARGET_RUNS:
        run = seeds_check(out_md, meta, folder)
        if run is not None:
            meta[key] = quoted[key] = run
            lines += quoted_targets_text(run, title)
    missing = [r["method"] for r in runs if r.get("missing")]
    if missing:
        lines += [f"Missing (method not registered when this ran): {', '.join(sorted(set(missing)))}.", ""]
    failed = [r for r in runs if r.get("error")]
    for r in failed:
        lines += [f"Failed: `{r['case']}`:", "", "```", r["error"], "```", ""]
    if png is not None:
        lines += ["## Kept width per layer", "", f"![kept width per layer per method]({png.name})", ""]
    atomic_write_text(out_md, "\n".join(lines))
    atomic_write_text(out_json, json.dumps({"meta": meta, "results": runs}, indent=1, default=str))
    if out_md.resolve() == MAIN_REPORT.resolve():
        update_readme(meta, results, checks, whole, seeded, quoted)


# runs of the 20% target on the whole test split that the main report quotes: the table's recovery
# budget, and four times that budget (how much of the gap is the budget)
WHOLE_SPLIT_RUNS = (REPO / "docs" / "whole_split", REPO / "docs" / "whole_split_4x_recovery",
                    REPO / "docs" / "whole_split_reconstruct")


def quoted_run(out_md: Path, folder: Path) -> dict | None:
    """The JSON of another run that the main report quotes (only the main report, only when that run exists)."""
    path = folder / "quality.json"
    if out_md.resolve() != MAIN_REPORT.resolve() or not path.exists():
        return None
    return json.loads(path.read_text())


def whole_split_check(out_md: Path, folder: Path) -> dict | None:
    """The 20% target as checked by a whole-split run (in ``folder``), when the main report is
    written and that run exists: a perplexity ratio measured on a few thousand tokens depends on
    which tokens, so the target is also checked where the protocol has no cap."""
    data = quoted_run(out_md, folder)
    if data is None:
        return None
    check = next((c for c in data["meta"].get("targets", []) if c["target"] == TWENTY), None)
    if check is None or check["result"] == "n/a":
        return None
    dense = next(r for r in data["results"] if r.get("method") == "dense")
    tokens = dense["rows"][0]["ppl"]["wikitext2@128"]["tokens"]
    pruned = [r for r in data["results"] if r.get("method") != "dense" and r.get("rows")]
    caps = data["meta"]["caps"]
    return {**check, "command": data["meta"]["command"], "date": data["meta"]["date"], "tokens": tokens,
            "folder": folder.name, "recovery_steps": caps["finetune_steps"], "reconstruct": caps.get("reconstruct", ""),
            "recovery": f"{caps['finetune_steps']} steps × {caps['finetune_batch']} sequences",
            "methods": sorted({r["method"] for r in pruned}),
            # results from before cases recorded it were calibrated on the text with the markers
            "calibration": sorted({calibration_of(r) for r in pruned})}


def whole_split_checks(out_md: Path) -> list[dict]:
    return [c for c in (whole_split_check(out_md, folder) for folder in WHOLE_SPLIT_RUNS) if c is not None]


def whole_split_text(c: dict) -> list[str]:
    link = f"{c['folder']}/results.md"
    refit = ", layers refit after planning" if c.get("reconstruct") else ", no refit after planning"
    return [f"**The 20% target on the whole WikiText-2 test split, recovery {c['recovery']}{refit}** ({c['tokens']:,} tokens "
            f"scored, 128-token windows; [`{link}`]({link}), `{c['command']}`, {c['date']}; methods run there: "
            f"{', '.join(c['methods'])}): best with recovery {fmt(c['ours'])} ({c['method']}) vs {fmt(c['reference'])} "
            f"({c['against']}): **{c['result']}**."
            + "".join(f" That run's pruned cases were calibrated on {t.replace('<unk>', '`<unk>`')}, not on this table's text."
                      for t in c.get("calibration", []) if t != CALIBRATION_TEXT), ""]


SEEDS_RUN = REPO / "docs" / "seeds"


def seeds_check(out_md: Path, meta: dict, folder: Path | None = None) -> dict | None:
    """The targets as checked by the several-seed run (``docs/seeds``; or another run in ``folder``), when
    the main report is written and that run exists: the ones it could check, with each side's range over
    the seeds, and whether it ran with this report's caps and options (then its seed 0 is this table's case)."""
    folder = SEEDS_RUN if folder is None else folder
    data = quoted_run(out_md, folder)
    if data is None:
        return None
    # "the best method at 20%" of a run that had one method there (PAT's seeds) is not that target
    checks = [c for c in data["meta"].get("targets", [])
              if c["result"] != "n/a" and not (c["target"] == TWENTY and len(c.get("of", ())) < 2)]
    if not checks:
        return None
    # the caps that differ from this table's (a reconstruction run differs in that one cap)
    theirs, ours = data["meta"].get("caps", {}), meta.get("caps", {})
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, KEY_DEFAULTS.get(k)) != ours.get(k, KEY_DEFAULTS.get(k)))
    # the options that matter are those of the methods that run ran (another method's options may have changed since)
    pruned = [r for r in data["results"] if r.get("rows") and r.get("method") != "dense"]
    options = [c.get("method_config", {}) for c in (data["meta"], meta)]
    other_options = sorted({m for m in (r["method"] for r in pruned) if options[0].get(m, {}) != options[1].get(m, {})})
    same_model = data["meta"].get("model") == meta.get("model")
    same = same_model and not other_options and not differ  # caps compared with their defaults filled in (caps added later)
    values = {k: [theirs.get(k, KEY_DEFAULTS.get(k)), ours.get(k, KEY_DEFAULTS.get(k))] for k in differ}
    return {"command": data["meta"]["command"], "date": data["meta"]["date"], "seeds": data["meta"].get("seeds", [0]),
            "targets": checks, "same_caps": same, "differ": differ, "differ_values": values, "folder": folder.name,
            "same_model": same_model, "other_options": other_options,
            "majority_average": majority_average(data["meta"]["majority"]) if data["meta"].get("majority") else None,
            "methods": sorted({f"{r['method']} {r['ratio']:.0%}" for r in pruned})}


# runs of this table's caps and options but one or two that the main report quotes for the targets they
# check: no refit after planning (what the refit adds); more questions per task for the targets on zero-shot
# accuracy (HyWIA's, PAT's: at 50 questions per task their gaps are mostly within noise); and PAT's targets
# with a longer training budget on both sides (whether the gap to the tuned dense model is the budget's);
# (JSON key, folder, title)
NO_RECONSTRUCT_RUN = REPO / "docs" / "no_reconstruct"
MORE_QUESTIONS_RUN = REPO / "docs" / "more_questions"
LONGER_RECOVERY_RUN = REPO / "docs" / "longer_recovery"
QUOTED_TARGET_RUNS = (("no_reconstruct_targets", NO_RECONSTRUCT_RUN, "The targets without reconstruction"),
                      ("more_questions_targets", MORE_QUESTIONS_RUN, "The targets on more questions per task"),
                      ("longer_recovery_targets", LONGER_RECOVERY_RUN,
                       "The targets with a longer training budget (PAT's and the recovery's)"))


def only_without_refit(run: dict) -> bool:
    """Whether a quoted run differs from this table only in having no refit after planning."""
    return run["differ"] == ["reconstruct"] and run["same_model"] and not run["other_options"]


def options_caveat(run: dict) -> str:
    """What a quoted run ran differently from this table besides its caps (nothing: empty)."""
    if not run["same_model"]:
        return "; **another model**: see its report"
    if run.get("other_options"):
        return f"; **other options for {', '.join(run['other_options'])}** than this table's: see its report"
    return ""


def cap_value(key: str, value) -> str:
    if key == "reconstruct":
        return f"`{value}`" if value else "none"
    return "none" if value is None else fmt(value)


def caps_differences(run: dict) -> str:
    """The caps a quoted run ran with that differ from this table's, with both values."""
    values = run["differ_values"]
    return ", ".join(f"{k} {cap_value(k, values[k][0])} (this table: {cap_value(k, values[k][1])})" for k in run["differ"])


def quoted_targets_text(run: dict, title: str) -> list[str]:
    link = f"{run['folder']}/results.md"
    met = sum(c["result"] == "pass" for c in run["targets"])
    return [f"**{title}** ([`{link}`]({link}), `{run['command']}`, {run['date']}; cases run: "
            f"{', '.join(run['methods'])}; " + ("this table's model, caps and options, the pruned weights only sliced"
                                                 if only_without_refit(run) else f"caps that differ from this table's: {caps_differences(run)}")
            + options_caveat(run)
            + f"): {met} of the {len(run['targets'])} targets that run could check met"
            + (f" (the majority answer's average on its questions: {fmt(run['majority_average'])}%)"
               if run.get("majority_average") is not None else "") + ".", "", targets_table(run["targets"]), ""]


def seeds_text(run: dict) -> list[str]:
    same = ("the same model, caps and options as this table, whose cases are its seed 0" if run["same_caps"]
            else "this table's model, caps and options but no refit after planning" if only_without_refit(run)
            else "**not the model, caps or options of this table**: see its report")
    return [f"**The targets over {len(run['seeds'])} seeds** ([`seeds/results.md`](seeds/results.md), `{run['command']}`, "
            f"{run['date']}; {same}): the comparison is of the means, *within noise* where the two methods' ranges over "
            "the seeds overlap.", "", targets_table(run["targets"]), ""]


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(meta: dict, results: list[dict], checks: list[dict], whole: list[dict] = (),
                  seeded: dict | None = None, quoted: dict[str, dict] | None = None) -> None:
    """The README's results section: a short table (both ratios, with and without recovery) and the targets."""
    from graphprune.plan import atomic_write_text

    readme = REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head = ["method", "ratio", "recovery", "params", "Wiki2 PPL", "PTB PPL", "0-shot avg %"]
    rows = ["| " + " | ".join(head) + " |", "|---|---|---|---:|---:|---:|---:|"]
    for res in results:
        for row in res.get("rows", []):
            label = res["method"] + (f" ({len(res['seeds'])} seeds)" if len(res.get("seeds", ())) > 1 else "")
            rows.append(f"| {label} | {'–' if label == 'dense' else format(res['ratio'], '.0%')} | {row['recovery']} | "
                        f"{res['params'] / 1e6:.1f} M | {fmt(row_ppl(row, 'wikitext2@128'))} | {fmt(row_ppl(row, 'ptb@128'))} | "
                        f"{fmt(row_acc(row), 1)} |")
    if meta.get("majority"):  # for scale: what always giving the most common answer scores
        rows.append(f"| *majority answer* | – | – | – | – | – | {fmt(majority_average(meta['majority']), 1)} |")
    passed = sum(c["result"] == "pass" for c in checks)
    body = [README_START, "",
            f"{meta['model_name']}, from [`docs/results.md`](docs/results.md) (`{meta['command']}`, {meta['date']}; "
            "perplexity with 128-token windows; the caps of that run and every column are there):", "",
            *rows, "",
            f"Targets of the quality issue: {passed} of {len(checks)} met on this table — see `docs/results.md`."
            + (" The 20% target on the whole WikiText-2 test split: " + "; ".join(
                f"{fmt(c['ours'])} ({c['method']}) vs {fmt(c['reference'])} after "
                + ("reconstruction and " if c.get("reconstruct") else "") + f"{c['recovery_steps']} steps of recovery, "
                f"**{c['result']}** (`docs/{c['folder']}/`)" for c in whole) + "." if whole else "")
            + (f" Over {len(seeded['seeds'])} seeds (`docs/seeds/`): {targets_met_text(seeded['targets'])}" if seeded else "")
            + "".join(readme_quoted_sentence(run) for run in (quoted or {}).values()), "",
            README_END]
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    atomic_write_text(readme, text[:start] + "\n".join(body) + text[end:])


def targets_met_text(checks: list[dict]) -> str:
    """How many of another run's targets it met, and how many of those comparisons are within noise (when any)."""
    n, noisy = len(checks), sum(bool(c.get("within_noise")) for c in checks)
    return (f"{sum(c['result'] == 'pass' for c in checks)} of the {n} targets it checks met"
            + (f"; {noisy} of those {n} comparisons are within noise." if noisy else "."))


# how the README names a cap a quoted run changed, given that run's value
CAP_PHRASES = {"finetune_steps": "with {} training steps", "max_examples": "on {} questions per task"}


def quoted_run_lead(run: dict) -> str:
    """How the README names a quoted run: by what it ran differently from the table."""
    if only_without_refit(run):
        return "Without the refit after planning"
    if run["differ"] and set(run["differ"]) <= set(CAP_PHRASES):
        lead = ", ".join(CAP_PHRASES[k].format(fmt(run["differ_values"][k][0])) for k in run["differ"])
        return lead[0].upper() + lead[1:]
    return f"With {caps_differences(run)}"


def readme_quoted_sentence(run: dict) -> str:
    """One sentence of the README's results section on a quoted run: how many targets it met, or, for a run
    that checked one or two, each with its figures."""
    lead = quoted_run_lead(run)
    if len(run["targets"]) > 2:
        return f" {lead} (`docs/{run['folder']}/`): {targets_met_text(run['targets'])}"
    return f" {lead} (`docs/{run['folder']}/`): " + "; ".join(
        f"{c['target']}: {fmt(c['ours'])} vs {fmt(c['reference'])} ({c['against']}), **{c['result']}**{noise_text(c)}"
        for c in run["targets"]) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description="Quality benchmark of graphprune's pruning methods (see the module docstring).")
    parser.add_argument("--model", default=str(SMOLLM2), help="HF folder or .gguf (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--methods", default=",".join(METHODS), type=_methods_arg,
                        help="comma list; METHOD:RATIO runs that method at that ratio only instead of every --ratios value")
    parser.add_argument("--ratios", default=list(RATIOS), type=_ratios_arg, help="comma list of ratios in (0, 1) (default 0.2,0.5)")
    parser.add_argument("--quick", action="store_true", help="tiny caps for a smoke test: " + json.dumps(QUICK))
    parser.add_argument("--max-tokens", type=int, help="perplexity: first N tokens of each split (0: the whole split)")
    parser.add_argument("--max-examples", type=int, help="zero-shot: first N questions of each task (0: every question)")
    parser.add_argument("--perplexities", help=f"the perplexity columns to measure, a comma list of {','.join(PERPLEXITIES)} "
                                              "(default: all; 'long' is 1024 tokens or the model's limit)")
    parser.add_argument("--no-zeroshot", dest="zeroshot", action="store_false", default=None, help="perplexity only")
    parser.add_argument("--finetune-steps", type=int, help="LoRA recovery steps (0: no recovery rows)")
    parser.add_argument("--finetune-batch", type=int)
    parser.add_argument("--finetune-seq-len", type=int)
    parser.add_argument("--finetune-lr", type=float)
    parser.add_argument("--finetune-data", help="recovery data: a file in the shared data folder (default "
                                               f"{Caps.finetune_data}), a path, or a corpus name (wikitext2: its train split)")
    parser.add_argument("--finetune-distill", type=float, help="weight of the KL to the dense logits in recovery (0: cross-entropy only)")
    parser.add_argument("--calib-samples", type=int)
    parser.add_argument("--method-steps", type=int, help="steps of the passes that train (their `steps` option)")
    parser.add_argument("--kinds", help='what the methods without kinds of their own remove (default "channels"; "" = their defaults)')
    parser.add_argument("--protect-layers", help='FIRST,LAST blocks the uniform-allocation methods leave whole (default "4,2"; "" = none)')
    parser.add_argument("--reconstruct", type=_reconstruct_arg, help="JSON of compile's reconstruct= for every method "
                        f"(default {RECONSTRUCT_RECIPE}: the layers that lose inputs are refit after planning)")
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_const", const="",
                        help="no refit after planning: the pruned models keep the dense weights, sliced")
    parser.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--method-config", type=json.loads, default={}, help='JSON {method: {option: value}}')
    parser.add_argument("--seeds", default="0", help="comma list: each pruned case runs once per seed (calibration windows, "
                        "the method's and the recovery's random choices); the table shows means, the targets their "
                        "spread (default 0; the dense model runs once)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (each gets cores / jobs threads)")
    parser.add_argument("--fresh", action="store_true", help="run every case again, ignoring finished ones in the cache")
    parser.add_argument("--reuse-report", action="store_true", help="also take finished cases from OUT_DIR/quality.json when "
                        "their model, caps, options and calibration text are this run's (re-renders a report without the cache)")
    parser.add_argument("--out-dir", help="where results.md/quality.json go (default: docs/; /tmp/graphprune-quality with --quick)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--caps", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # child: one (method, ratio), result as JSON
        caps = Caps(**json.loads(args.caps))
        try:
            result = run_case(args.case, args.model, caps, args.method_config)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        from graphprune.plan import atomic_write_text

        text = json.dumps(result, default=str)
        Path(args.result).write_text(text)
        # a finished case survives an interrupted run
        atomic_write_text(cache_path(args.case, args.model, json.loads(args.caps), args.method_config), text)
        return

    caps = Caps(**(QUICK if args.quick else {}))
    for name in ("max_tokens", "max_examples", "finetune_steps", "finetune_batch", "finetune_seq_len", "finetune_lr",
                 "finetune_data", "finetune_distill", "calib_samples", "method_steps", "device", "kinds", "protect_layers",
                 "perplexities", "zeroshot", "reconstruct"):
        value = getattr(args, name)
        if value is not None:
            setattr(caps, name, value)
    caps.max_tokens, caps.max_examples = caps.max_tokens or None, caps.max_examples or None  # 0: no cap
    bad = [k for k in caps.perplexities.split(",") if k not in PERPLEXITIES]
    if bad:
        sys.exit(f"quality.py: --perplexities takes a comma list of {', '.join(PERPLEXITIES)}; got {', '.join(bad)}")
    if not Path(args.model).exists():
        if Path(args.model) == SMOLLM2:
            subprocess.run(["bash", str(SHARED_DATA / "fetch_smollm2.sh")], check=True)
        else:
            sys.exit(f"no model at {args.model}")
    import graphprune
    from graphprune.evaluate.perplexity import LONG_CONTEXT

    available = set(graphprune.available_passes())
    pairs = method_ratios(args.methods, args.ratios)
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        sys.exit(f"quality.py: --seeds takes a comma list of integers, got {args.seeds!r}")
    if not seeds or min(seeds) < 0:
        sys.exit(f"quality.py: --seeds takes a comma list of integers >= 0, got {args.seeds!r}")
    cases = list(dict.fromkeys(["dense"] + [case_name(m, r, s) for m, r in pairs for s in seeds]))
    out_dir = Path(args.out_dir) if args.out_dir else (Path("/tmp/graphprune-quality") if args.quick else REPO / "docs")
    config = json.loads((Path(args.model) / "config.json").read_text()) if (Path(args.model) / "config.json").exists() else {}
    limit = config.get("max_position_embeddings")
    long_len = min(LONG_CONTEXT, limit) if limit else LONG_CONTEXT
    import torch

    meta = {
        "command": "python benchmarks/quality.py " + shlex.join(sys.argv[1:]),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
        "commit": head_commit(),  # the report's; each case records the code it ran with
        "model": args.model,
        "model_name": Path(args.model).name,
        "caps": asdict(caps),
        "method_config": args.method_config,
        "seeds": seeds,
        "long_len": long_len,
        "available_passes": sorted(available),
    }
    if caps.zeroshot:
        meta["majority"] = majority_answers(caps.max_examples)
    results: dict[str, dict] = {}

    def record(case: str, res: dict) -> None:
        method, ratio, seed = parse_case(case)
        res.update(case=case, method=res.get("method", method), ratio=res.get("ratio", ratio), seed=res.get("seed", seed))
        results[case] = res
        if res.get("missing"):
            print(f"{case:18s} missing (not registered)", flush=True)
        elif res.get("error"):
            print(f"{case:18s} FAILED after {res['wall_seconds']:.0f}s: {res['error'].splitlines()[-1]}", flush=True)
        else:
            summary = "; ".join(f"{row['recovery']}: wiki2@128 {row['ppl'].get('wikitext2@128', {}).get('ppl', float('nan')):.2f}, "
                                f"avg {fmt(row_acc(row), 1)}" for row in res["rows"])
            print(f"{case:18s} {res.get('wall_seconds', 0):.0f}s{' (cached)' if res.get('cached') else ''}  "
                  f"params {res['params']:,}  {summary}", flush=True)
        ordered = [results.get(c) or dict(zip(("method", "ratio", "seed"), parse_case(c)), case=c, pending=True) for c in cases]
        write_report(meta, ordered, out_dir / "results.md", out_dir / "quality.json")

    todo = []
    reusable = reusable_cases(out_dir / "quality.json", args.model, asdict(caps), args.method_config) if args.reuse_report else {}
    for case in cases:
        method = parse_case(case)[0]
        cached = cache_path(case, args.model, asdict(caps), args.method_config)
        if method != "dense" and method not in available:
            record(case, {"case": case, "missing": True})
        elif cached.exists() and not args.fresh:
            record(case, {**json.loads(cached.read_text()), "cached": True})
        elif case in reusable and not args.fresh:
            record(case, {**reusable[case], "cached": True})
        else:
            todo.append(case)
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_in_child, case, args, caps, threads): case for case in todo}
        for future in concurrent.futures.as_completed(futures):
            record(futures[future], future.result())
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'quality.json'}")


if __name__ == "__main__":
    main()
