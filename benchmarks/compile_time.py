"""Compile-time benchmark: how long graphprune's stages take, and how much memory they need.

What is measured
----------------
For each case, the wall time (``time.perf_counter``) of every stage of the pipeline that
``graphprune.compile`` runs, timed separately:

    trace    graphprune.trace(model)                  torch.export of the whole model
    analyze  graphprune.analyze(traced)               dependency graph + groups
    score    graphprune.score(dg, "magnitude")        unit importances from the weights
    plan     graphprune.make_plan(dg, scores, 0.5)    + plan.leaf_keep(dg), as compile() does
    rewrite  graphprune.rewrite(dg, leaf_keep)        the physically smaller GraphModule

``total`` is trace + analyze + score + plan + rewrite. Loading the model is timed and reported
but not counted. Each case runs ``--repeats`` times (default 3) and the medians are reported. The peak resident set size is ``getrusage(RUSAGE_SELF).ru_maxrss`` read at the
end of the case; every case runs in a fresh ``python`` subprocess so cases do not inherit each
other's memory (the peak includes the interpreter with torch and transformers imported, whose
RSS is reported separately as ``rss_baseline``).

Cases
-----
* ``smollm2``: SmolLM2-135M-Instruct with real weights (Q4_1 GGUF, de-quantised to float32),
  fetched by ``../shared/data/fetch_smollm2.sh``.
* ``llama2-7b`` / ``llama2-70b``: LlamaForCausalLM with Llama-2 7B / 70B shapes built on the
  ``meta`` device: the analysis only needs shapes, so a 70B model costs no weight memory. The
  magnitude pass is tried first; if it cannot run on meta tensors, deterministic synthetic scores
  (``torch.arange(group.size)``) are used instead and the reason is recorded.
* ``llama2-70b-L{8,16,32,64,80}``: the 70B config with fewer layers, to show how compile time
  grows with depth (a least-squares line: seconds per layer and R^2).
* ``qwen3-moe-30b``: Qwen3MoeForCausalLM with Qwen3-30B-A3B shapes (48 layers, 128 experts, top-8)
  on the ``meta`` device, planned with whole experts as well (kinds heads, channels, experts).

Why
---
graphprune is meant to be run interactively on big models; these numbers check that compiling is
cheap next to fine-tuning (targets, on 2 CPU cores: SmolLM2-135M end to end < 20 s; the 70B-shaped
analysis < 60 s and < 4 GB peak RSS; time linear in the number of layers).

Usage
-----
    python benchmarks/compile_time.py            # everything; writes docs/compile_time.json and docs/performance.md
    python benchmarks/compile_time.py --quick    # SmolLM2 (if already downloaded), 7B, 70B at 8/16 layers; writes nothing
    python benchmarks/compile_time.py --case llama2-7b   # one case in this process, result as JSON on stdout
    python benchmarks/compile_time.py --case qwen3-moe-30b
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _docs import PERFORMANCE, write_section
from _memory import lifetime_peak_rss_mib, rss_mib
from _models import FETCH_SMOLLM2, SMOLLM2_DIR, SMOLLM2_GGUF

REPO = Path(__file__).resolve().parents[1]
JSON_PATH = REPO / "docs" / "compile_time.json"
COMMAND = "python benchmarks/compile_time.py"

RATIO = 0.5
STAGES = ("trace", "analyze", "score", "plan", "rewrite")
SCALING_LAYERS = (8, 16, 32, 64, 80)
QUICK_SCALING_LAYERS = (8, 16)
CASE_TIMEOUT_S = 900

# Targets (2 CPU cores).
SMOLLM2_MAX_S = 20.0
LLAMA70B_MAX_S = 60.0
LLAMA70B_MAX_RSS_BYTES = 4e9  # 4 GB
LINEAR_MIN_R2 = 0.98

LLAMA_SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=32000),
}
MOE_SHAPE = dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, vocab_size=151936)  # Qwen3-30B-A3B
DEFAULT_KINDS = ("heads", "channels")
CASE_KINDS = {"qwen3-moe-30b": ("heads", "channels", "experts")}


# ================================================================ one case (runs in a subprocess)
def _load_case(name: str):
    """Build the model of case ``name``: (model, facts about it)."""
    import torch

    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        return model, {"weights": "real (GGUF Q4_1 de-quantised to float32)", "device": "cpu"}
    if name == "qwen3-moe-30b":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        with torch.device("meta"):
            model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**MOE_SHAPE))
        return model, {"weights": "none (meta device)", "device": "meta", "config": MOE_SHAPE}
    m = re.fullmatch(r"(llama2-7b|llama2-70b)(?:-L(\d+))?", name)
    if not m:
        raise SystemExit(f"unknown case {name!r}")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA_SHAPES[m.group(1)])
    if m.group(2):
        shape["num_hidden_layers"] = int(m.group(2))
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    return model, {"weights": "none (meta device)", "device": "meta", "config": shape}


def run_case(name: str) -> dict:
    """Time every stage of one case in this process; return the numbers."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline RSS is read)

    import graphprune

    out: dict = {"case": name, "rss_baseline_mib": rss_mib()}
    t0 = time.perf_counter()
    model, facts = _load_case(name)
    out["load_s"] = time.perf_counter() - t0
    out.update(facts)
    out["rss_after_load_mib"] = rss_mib()
    out["num_layers"] = model.config.num_hidden_layers

    sec: dict[str, float] = {}
    t = time.perf_counter()
    traced = graphprune.trace(model)
    sec["trace"] = time.perf_counter() - t
    out["trace_input_device"] = str(traced.example_kwargs["input_ids"].device)

    t = time.perf_counter()
    dg = graphprune.analyze(traced)
    sec["analyze"] = time.perf_counter() - t
    out["groups"] = len(dg.groups)
    out["heads_group_size"] = next((g.size for g in dg.groups if g.kind == "heads"), None)
    out["graph_nodes"] = len(dg.gm.graph.nodes)

    t = time.perf_counter()
    try:
        scores = graphprune.score(dg, "magnitude")
        out["score_method"] = "magnitude"
    except Exception as exc:  # the magnitude pass needs data; meta tensors have none
        if facts["device"] != "meta":
            raise
        out["score_method"] = "synthetic arange (magnitude failed on meta)"
        out["magnitude_error"] = f"{type(exc).__name__}: {exc}"
        t = time.perf_counter()  # the failed attempt is not counted
        scores = {g.name: torch.arange(g.size, dtype=torch.float32) for g in dg.groups}
    sec["score"] = time.perf_counter() - t

    t = time.perf_counter()
    out["kinds"] = list(CASE_KINDS.get(name, DEFAULT_KINDS))
    plan = graphprune.make_plan(dg, scores, RATIO, kinds=out["kinds"])
    leaf_keep = plan.leaf_keep(dg)
    sec["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    small = graphprune.rewrite(dg, leaf_keep)
    sec["rewrite"] = time.perf_counter() - t

    out["seconds"] = sec
    out["total_s"] = sum(sec.values())
    out["ratio"] = RATIO
    out["params_before"] = plan.params_before
    out["params_after"] = plan.params_after
    out["block_params_before"] = plan.block_params_before
    out["block_params_after"] = plan.block_params_after
    out["achieved_ratio"] = plan.achieved_ratio
    out["rewritten_params"] = sum(p.numel() for p in small.parameters())
    out["rewritten_params_match_plan"] = out["rewritten_params"] == plan.params_after
    out["peak_rss_mib"] = lifetime_peak_rss_mib()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["page_faults_minor"], out["page_faults_major"] = usage.ru_minflt, usage.ru_majflt
    return out


# ================================================================ driver
def _run_in_subprocess(name: str, label: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--result-file", str(result)]
        print(f"[{name}{label}] running ...", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"case": name, "error": f"timed out after {CASE_TIMEOUT_S} s"}
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"case": name, "error": f"exit code {proc.returncode}: " + " | ".join(tail)}
        data = json.loads(result.read_text())
    print(f"[{name}{label}] total {data['total_s']:.2f} s, peak RSS {data['peak_rss_mib']:.0f} MiB", flush=True)
    return data


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def combine_runs(runs: list[dict]) -> dict:
    """One result from repeated runs of a case: median time per stage, worst peak RSS, every total kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = dict(ok[0])
    out["repeats"] = len(ok)
    out["seconds"] = {s: _median([r["seconds"][s] for r in ok]) for s in STAGES}
    out["total_s"] = _median([r["total_s"] for r in ok])
    out["load_s"] = _median([r["load_s"] for r in ok])
    out["total_s_runs"] = [r["total_s"] for r in ok]
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ok)
    out["page_faults_minor"] = _median([r["page_faults_minor"] for r in ok])
    if len(ok) < len(runs):
        out["failed_runs"] = [r["error"] for r in runs if "error" in r]
    return out


def memory_touch_probe(mib: int = 256) -> float:
    """GiB/s of writing freshly allocated memory (page faults included): shows how costly new pages are now."""
    import torch

    t = time.perf_counter()
    torch.empty(mib * 2**18, dtype=torch.float32).fill_(1.0)
    return mib / 1024 / (time.perf_counter() - t)


def _smollm2_available(fetch: bool) -> tuple[bool, str]:
    if fetch:
        proc = subprocess.run(["bash", str(FETCH_SMOLLM2)], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            return False, "fetch failed: " + " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    if not (SMOLLM2_DIR / SMOLLM2_GGUF).exists():
        return False, f"{SMOLLM2_DIR / SMOLLM2_GGUF} not present" + ("" if fetch else " (--quick does not download)")
    return True, ""


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = slope * x + intercept, with R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope_s_per_layer": slope, "intercept_s": intercept, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def evaluate_targets(results: dict, scaling: dict | None) -> list[dict]:
    targets = []
    smol = results.get("smollm2")
    targets.append({
        "target": f"SmolLM2-135M end to end (trace..rewrite) < {SMOLLM2_MAX_S:g} s",
        "measured": f"{smol['total_s']:.1f} s" if smol and "error" not in smol else "not run",
        "pass": (smol["total_s"] < SMOLLM2_MAX_S) if smol and "error" not in smol else None,
    })
    big = results.get("llama2-70b")
    ok = big is not None and "error" not in big
    targets.append({
        "target": f"Llama-2-70B-shaped analysis (trace..rewrite, meta) < {LLAMA70B_MAX_S:g} s",
        "measured": f"{big['total_s']:.1f} s" if ok else "not run",
        "pass": big["total_s"] < LLAMA70B_MAX_S if ok else None,
    })
    targets.append({
        "target": f"Llama-2-70B-shaped peak RSS < 4 GB ({LLAMA70B_MAX_RSS_BYTES / 2**20:.0f} MiB)",
        "measured": f"{big['peak_rss_mib']:.0f} MiB" if ok else "not run",
        "pass": big["peak_rss_mib"] * 2**20 < LLAMA70B_MAX_RSS_BYTES if ok else None,
    })
    targets.append({
        "target": f"time linear in layers (70B config, R^2 >= {LINEAR_MIN_R2})",
        "measured": (f"{scaling['total']['slope_s_per_layer']:.3f} s/layer, R^2 = {scaling['total']['r2']:.4f}"
                     if scaling else "not run"),
        # two points always fit a line: the target needs at least three
        "pass": scaling["total"]["r2"] >= LINEAR_MIN_R2 if scaling and len(scaling["layers"]) >= 3 else None,
    })
    return targets


# ================================================================ output
def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def results_table(results: dict) -> str:
    head = ["case", "layers", "load s", *[f"{s} s" for s in STAGES], "total s", "total min-max s", "peak RSS MiB",
            "params before", "params after", "achieved"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, "-", "-", *["-"] * len(STAGES), "error", "-", "-", "-", "-", "-"])
            continue
        runs = r.get("total_s_runs", [r["total_s"]])
        rows.append([
            name, str(r["num_layers"]), f"{r['load_s']:.2f}", *[f"{r['seconds'][s]:.2f}" for s in STAGES],
            f"{r['total_s']:.2f}", f"{min(runs):.2f}-{max(runs):.2f}", f"{r['peak_rss_mib']:.0f}", _fmt_params(r["params_before"]),
            _fmt_params(r["params_after"]), f"{r['achieved_ratio']:.1%}",
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plain_table(results: dict) -> str:
    md = results_table(results).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md if not line.startswith("|---")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def _verdict(p) -> str:
    return "not run" if p is None else ("**pass**" if p else "**FAIL**")


def doc_section(report: dict) -> str:
    m, results, scaling = report["machine"], report["results"], report.get("scaling")
    lines = [
        "## Compile time",
        "",
        f"Measured {m['date']} on {m['nproc']} CPU cores ({m['cpu']}, {m['mem_total_gib']:.0f} GiB RAM), "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. Reproduce with:",
        "",
        "```",
        COMMAND,
        "```",
        "",
        f"Each case runs {report['repeats']}x, each time in a fresh subprocess (round-robin over the cases); "
        "times are medians of the wall-clock seconds per stage, *total* is the median of "
        "trace + analyze + score + plan + rewrite (loading the model is shown but not counted), "
        "and *total min-max* its range over the runs. "
        f"Plans are made at ratio {RATIO} (uniform allocation, heads + channels; whole experts too for the MoE "
        "case). Peak RSS is the largest "
        "`ru_maxrss` of the case's processes, including the Python interpreter with torch and "
        "transformers imported (about "
        f"{min(r['rss_baseline_mib'] for r in results.values() if 'error' not in r):.0f} MiB before any model exists). "
        "The Llama-2 and Qwen3-30B-A3B shapes are built on the `meta` device: no weights, so analysis needs "
        "shapes only.",
        "",
        results_table(results),
        "",
    ]
    notes = [f"- `{name}` failed: {r['error']}" for name, r in results.items() if "error" in r]
    synthetic = [name for name, r in results.items() if "error" not in r and r["score_method"] != "magnitude"]
    if synthetic:
        err = results[synthetic[0]].get("magnitude_error", "")[:160]
        notes.append(f"- Score for {', '.join(f'`{n}`' for n in synthetic)}: the magnitude pass cannot run on meta "
                     f"tensors (`{err}`), so synthetic scores `torch.arange(group.size)` were used; the time shown "
                     "is building them, the failed attempt is not counted.")
    for name, r in results.items():
        if "error" not in r and abs(r["achieved_ratio"] - RATIO) > 0.01:
            notes.append(f"- `{name}` reaches {r['achieved_ratio']:.1%}, not {RATIO:.0%}: uniform allocation removes the "
                         "same fraction of every group, and its attention has only "
                         f"{r['heads_group_size']} prunable head units (KV heads) per layer, so the achievable ratios "
                         "come in coarse steps; the plan takes the closest.")
    probe = (m.get("memory_touch_gib_s_before"), m.get("memory_touch_gib_s_after"))
    if None not in probe:
        notes.append(f"- Writing freshly allocated memory ran at {probe[0]:.2f} GiB/s before the runs and "
                     f"{probe[1]:.2f} GiB/s after. On VMs where first-touch page faults are expensive this "
                     "varies over time and mostly moves *score* and *rewrite* (they allocate new tensors); "
                     "see the min-max column.")
    if notes:
        lines += ["Notes:", "", *notes, ""]
    if scaling:
        lines += [
            f"### Growth with depth (Llama-2-70B config, {', '.join(map(str, scaling['layers']))} layers)",
            "",
            "Least-squares line of (median) seconds against the number of layers, per stage:",
            "",
            "| stage | seconds per layer | intercept s | R^2 |",
            "|---|---:|---:|---:|",
        ]
        for stage in (*STAGES, "total"):
            fit = scaling[stage]
            lines.append(f"| {stage} | {fit['slope_s_per_layer']:.4f} | {fit['intercept_s']:.2f} | {fit['r2']:.4f} |")
        rss = scaling["peak_rss_mib"]
        lines += ["", f"Peak RSS grows by {rss['slope_mib_per_layer']:.1f} MiB per layer "
                      f"(intercept {rss['intercept_mib']:.0f} MiB, R^2 = {rss['r2']:.4f}).", ""]
    lines += ["### Targets (2 CPU cores)", "", "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {_verdict(t['pass'])} |" for t in report["targets"]]
    lines.append("")
    if m["nproc"] != 2:
        lines += [f"Note: this run had {m['nproc']} cores, not the 2 the targets are stated for.", ""]
    return "\n".join(lines)


# ================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="fast check: SmolLM2 if already downloaded, Llama-2-7B shape, 70B config at 8/16 layers")
    ap.add_argument("--case", help="run one case in this process (smollm2, llama2-7b, llama2-70b, llama2-70b-L<n>, qwen3-moe-30b)")
    ap.add_argument("--result-file", help="with --case: write the result JSON here instead of stdout")
    ap.add_argument("--write-docs", action=argparse.BooleanOptionalAction, default=None,
                    help=f"write {JSON_PATH.relative_to(REPO)} and the '## Compile time' section of "
                         f"{PERFORMANCE.relative_to(REPO)} (default: yes for a full run, no with --quick)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per case, each in a fresh subprocess; times are medians (default: 3, or 1 with --quick)")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    if args.case:
        data = run_case(args.case)
        text = json.dumps(data, indent=1)
        if args.result_file:
            Path(args.result_file).write_text(text)
        else:
            print(text)
        return 0

    write_docs = (not args.quick) if args.write_docs is None else args.write_docs
    layers = QUICK_SCALING_LAYERS if args.quick else SCALING_LAYERS
    have_smol, why_not = _smollm2_available(fetch=not args.quick)
    cases = (["smollm2"] if have_smol else []) + ["llama2-7b"] + ([] if args.quick else ["llama2-70b", "qwen3-moe-30b"])
    cases += [f"llama2-70b-L{n}" for n in layers]
    if not have_smol:
        print(f"[smollm2] skipped: {why_not}", flush=True)

    probe_before = memory_touch_probe()
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for i in range(args.repeats):  # round-robin, so slow drifts of the machine hit every case alike
        for name in cases:
            runs[name].append(_run_in_subprocess(name, f" {i + 1}/{args.repeats}" if args.repeats > 1 else ""))
    wall = time.perf_counter() - started
    results = {name: combine_runs(rs) for name, rs in runs.items()}
    probe_after = memory_touch_probe()

    scaling = None
    points = [(n, results[f"llama2-70b-L{n}"]) for n in layers if "error" not in results[f"llama2-70b-L{n}"]]
    if len(points) >= 2:
        xs = [n for n, _ in points]
        scaling = {"layers": xs, "total": linear_fit(xs, [r["total_s"] for _, r in points])}
        for stage in STAGES:
            scaling[stage] = linear_fit(xs, [r["seconds"][stage] for _, r in points])
        scaling["peak_rss_mib"] = linear_fit(xs, [r["peak_rss_mib"] for _, r in points])
        scaling["peak_rss_mib"]["slope_mib_per_layer"] = scaling["peak_rss_mib"].pop("slope_s_per_layer")
        scaling["peak_rss_mib"]["intercept_mib"] = scaling["peak_rss_mib"].pop("intercept_s")

    report = {
        "command": COMMAND + (" --quick" if args.quick else ""),
        "machine": {**machine_info(), "memory_touch_gib_s_before": probe_before, "memory_touch_gib_s_after": probe_after},
        "repeats": args.repeats,
        "ratio": RATIO,
        "benchmark_wall_s": wall,
        "results": results,
        "scaling": scaling,
        "smollm2_skipped": why_not or None,
    }
    report["targets"] = evaluate_targets(results, scaling)

    print()
    print(plain_table(results))
    if scaling:
        fit = scaling["total"]
        print(f"\ngrowth (70B config, layers {scaling['layers']}): {fit['slope_s_per_layer']:.3f} s/layer "
              f"+ {fit['intercept_s']:.2f} s, R^2 = {fit['r2']:.4f}")
    print()
    for t in report["targets"]:
        verdict = "not run" if t["pass"] is None else ("pass" if t["pass"] else "FAIL")
        print(f"{verdict:>8}  {t['target']}: {t['measured']}")
    print(f"\nbenchmark wall time {wall:.0f} s")

    if write_docs:
        from graphprune.plan import atomic_write_text

        atomic_write_text(JSON_PATH, json.dumps(report, indent=1) + "\n")
        write_section(doc_section(report))
        print(f"wrote {JSON_PATH.relative_to(REPO)} and {PERFORMANCE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
