"""Scoring-cost benchmark: peak memory and wall time of the gradient-based passes on SmolLM2-135M.

What is measured
----------------
For each method (``taylor``, ``hywia``, ``loraprune``) a fresh ``python`` subprocess loads
SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised to float32), traces and analyses it, draws the
calibration set (WikiText-2 train windows, the model's tokenizer, ``--n-samples`` x ``--seq-len``
tokens, seed 0 — the same set for every method), and then runs only the scoring pass:

    graphprune.score(dg, method, calib=calibration, ratio=0.5, batch_size=B, ...)

Just before scoring, freed heap memory is returned to the OS (``malloc_trim``; the child runs
with a fixed ``MALLOC_MMAP_THRESHOLD_`` so big tensors are mapped and unmapped) and the process's
RSS high-water mark is reset (``/proc/self/clear_refs``,
"5"), so ``VmHWM`` read afterwards is the peak *during scoring*; ``rss_before`` is the RSS at
that moment (interpreter + torch + the model's weights). ``scoring_extra`` = peak - rss_before
is the memory the method itself needed (gradients, activations, LoRA state). Wall time is
``time.perf_counter`` around the same call. ``ru_maxrss`` (the whole process, loading included)
is recorded too. Memory of torch tensors is invisible to ``tracemalloc``, hence RSS.

Taylor and HyWIA take one backward pass per batch of ``B`` samples over the set (``--batch-size``
takes several values: 1 and 4 by default, one block of rows each). LoRAPrune
fine-tunes LoRA (r = 8) for ``--steps`` optimiser steps on batches of ``B`` samples, re-estimating
importance every step and updating masks every ``--update-every`` steps; its time therefore
grows with ``--steps``, its peak memory does not.

Target (issue 5): LoRAPrune's peak memory <= 60% of Taylor's (the paper reports 52.6% less
than LLM-Pruner on LLaMA-7B).

Usage
-----
    python benchmarks/scoring_cost.py             # 8 x 128 tokens, batches of 1 and 4, LoRAPrune 8 steps; writes the docs
    python benchmarks/scoring_cost.py --quick     # 4 x 64 tokens, batch 2, LoRAPrune 2 steps; prints, writes nothing
    python benchmarks/scoring_cost.py --case taylor   # one method in this process, JSON on stdout
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import os
import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path.home() / ".cache" / "graphprune" / "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_SCRIPT = REPO.parent / "shared" / "data" / "fetch_smollm2.sh"
JSON_PATH = REPO / "docs" / "scoring_cost.json"
DOC_PATH = REPO / "docs" / "performance.md"
SECTION = "## Scoring cost"
METHODS = ("taylor", "hywia", "loraprune")
RATIO = 0.5
TARGET_FRACTION = 0.60  # LoRAPrune peak <= 60% of Taylor's
CASE_TIMEOUT_S = 3600
MIB = 2**20


# ================================================================ one case (child process)
def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give memory freed while loading back to the OS, so RSS counts live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_case(method: str, n_samples: int, seq_len: int, batch_size: int, steps: int, update_every: int) -> dict:
    import torch
    import transformers

    import graphprune
    from graphprune.data import calibration, load_tokenizer

    gc.collect()
    _release_free_heap()
    rss_interpreter = _proc_status("VmRSS")  # python + torch + transformers + graphprune, no model yet
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(SMOLLM2_DIR / SMOLLM2_GGUF)
    traced = graphprune.trace(model)
    dg = graphprune.analyze(traced)
    calib = calibration("wikitext2", tokenizer, n_samples=n_samples, seq_len=seq_len, seed=0)
    setup_s = time.perf_counter() - t0
    config = {"batch_size": batch_size}
    if method == "loraprune":
        config.update(steps=steps, update_every=update_every)

    gc.collect()
    _release_free_heap()
    before_merge = {}
    if method == "loraprune":  # LoRAPrune's last act is folding LoRA into new weights: see its peak before that
        from graphprune.passes import loraprune as lp_module

        real_merge = lp_module.merged_weights

        def merge_and_record(lora):
            before_merge["peak"] = _proc_status("VmHWM")
            return real_merge(lora)

        lp_module.merged_weights = merge_and_record
    rss_before = _proc_status("VmRSS")
    resettable = _reset_peak()
    t0 = time.perf_counter()
    scores = graphprune.score(dg, method, calib=calib, ratio=RATIO, example_kwargs=traced.example_kwargs, **config)
    seconds = time.perf_counter() - t0
    peak = _proc_status("VmHWM")
    finite = all(bool(torch.isfinite(v).all()) for v in scores.values())
    info = scores.info.get(method, {})
    return {
        "method": method,
        "config": config,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seconds": round(seconds, 2),
        "setup_seconds": round(setup_s, 2),
        "rss_interpreter_mib": round(rss_interpreter / MIB, 1),
        "rss_before_mib": round(rss_before / MIB, 1),
        "peak_mib": round(peak / MIB, 1),
        "scoring_extra_mib": round((peak - rss_before) / MIB, 1),
        "model_and_scoring_mib": round((peak - rss_interpreter) / MIB, 1),
        "peak_before_merge_mib": round(before_merge["peak"] / MIB, 1) if before_merge else None,
        "peak_reset": resettable,
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "finite": finite,
        "calibration_loss": info.get("calibration_loss"),
        "lora_losses": [info["first_loss"], info["last_loss"]] if "first_loss" in info else None,
    }


# ================================================================ driver
def _child(method: str, batch_size: int, args) -> dict:
    cmd = [sys.executable, __file__, "--case", method, "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
           "--batch-size", str(batch_size), "--steps", str(args.steps), "--update-every", str(args.update_every)]
    # a fixed mmap threshold: big tensors are mapped and unmapped, so RSS follows live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    import torch
    import transformers

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(result: dict, command: str) -> str:
    env, rows = result["environment"], result["cases"]
    first = rows[0]
    lines = [
        SECTION, "",
        f"Measured {env['date']} on {env['cpus']} CPU cores (shared with other jobs: load average "
        f"{env['load_average'][0]} at the start), Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}. Reproduce with:", "", "```", command, "```", "",
        f"SmolLM2-135M-Instruct (float32, {first['params'] / 1e6:.1f} M parameters), one calibration set for every "
        f"method: {first['n_samples']} WikiText-2 train windows of {first['seq_len']} tokens (seed 0), target ratio "
        f"{RATIO}; *batch* = samples per backward pass (Taylor, HyWIA) or per optimiser step (LoRAPrune). Each row is "
        "a fresh subprocess; the RSS high-water mark is reset right before `graphprune.score(...)`. *peak* = largest "
        "RSS during scoring; *before* = RSS when scoring starts (interpreter, libraries, weights, traced graph); "
        f"*extra* = peak - before (what the method needs on top: gradients, activations, LoRA state, merged "
        f"weights); *model+scoring* = peak - the interpreter's RSS before the model was loaded "
        f"(about {first['rss_interpreter_mib']:.0f} MiB of Python, torch and transformers).", "",
        "| batch | method | wall s | before MiB | peak MiB | extra MiB | model+scoring MiB | peak / Taylor | extra / Taylor | model+scoring / Taylor |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets, merge_notes = [], []
    for batch in sorted({r["config"]["batch_size"] for r in rows}):
        mine = {r["method"]: r for r in rows if r["config"]["batch_size"] == batch}
        t = mine.get("taylor")

        def rel(r, key):
            return f"{r[key] / t[key]:.0%}" if t and t[key] > 0 else "-"

        for r in mine.values():
            name = r["method"] + (f" ({r['config']['steps']} steps, masks every {r['config']['update_every']})" if r["method"] == "loraprune" else "")
            lines.append(f"| {batch} | {name} | {r['seconds']:.1f} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | "
                         f"{r['scoring_extra_mib']:.0f} | {r['model_and_scoring_mib']:.0f} | {rel(r, 'peak_mib')} | "
                         f"{rel(r, 'scoring_extra_mib')} | {rel(r, 'model_and_scoring_mib')} |")
        lp = mine.get("loraprune")
        if lp and lp.get("peak_before_merge_mib") and t:
            pre = lp["peak_before_merge_mib"]
            merge_notes.append(f"- batch {batch}: LoRAPrune's peak *before* it merges LoRA into new weights: {pre:.0f} MiB "
                               f"(extra {pre - lp['rss_before_mib']:.0f} MiB = {(pre - lp['rss_before_mib']) / t['scoring_extra_mib']:.0%} "
                               f"of Taylor's extra; process peak {pre / t['peak_mib']:.0%} of Taylor's).")
        if t and "loraprune" in mine:
            lp = mine["loraprune"]
            for key, label in (("peak_mib", "process peak RSS"), ("model_and_scoring_mib", "model + scoring (interpreter excluded)")):
                frac = lp[key] / t[key]
                targets.append(f"| batch {batch}: {label} | {frac:.0%} ({lp[key]:.0f} vs {t[key]:.0f} MiB) | "
                               f"{'**pass**' if frac <= TARGET_FRACTION else '**miss**'} |")
    lines.append("")
    if targets:
        lines += [f"Target: LoRAPrune's peak memory <= {TARGET_FRACTION:.0%} of Taylor's.", "",
                  "| LoRAPrune / Taylor | measured | result |", "|---|---|---|", *targets, ""]
    if merge_notes:
        lines += ["Iterative phase only (LoRA fine-tuning, importance estimates, masks), without the final merge:", "", *merge_notes, ""]
    lines += result.get("notes", [])
    return "\n".join(lines).rstrip() + "\n"


def write_docs(result: dict, command: str) -> None:
    sys.path.insert(0, str(REPO))
    from graphprune.plan import atomic_write_text

    atomic_write_text(JSON_PATH, json.dumps(result, indent=1))
    text = DOC_PATH.read_text() if DOC_PATH.exists() else "# Performance\n"
    section = markdown(result, command)
    if SECTION in text:  # replace our section (up to the next "## " heading), keep the others
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    atomic_write_text(DOC_PATH, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small set (4 x 64, batch 2), LoRAPrune 2 steps; writes nothing")
    ap.add_argument("--case", choices=METHODS, help="run one method in this process and print JSON")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--n-samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, nargs="+", default=None,
                    help="samples per backward pass / optimiser step; one table block per value")
    ap.add_argument("--steps", type=int, default=None, help="LoRAPrune optimiser steps")
    ap.add_argument("--update-every", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print the table but do not write docs")
    args = ap.parse_args()
    args.n_samples = args.n_samples or (4 if args.quick else 8)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 8)
    args.update_every = args.update_every or (1 if args.quick else 2)
    args.batch_size = args.batch_size or ([2] if args.quick else [1, 4])
    if not (SMOLLM2_DIR / SMOLLM2_GGUF).exists():
        sys.exit(f"SmolLM2-135M is not downloaded: run {FETCH_SCRIPT}")
    if args.case:
        print(json.dumps(run_case(args.case, args.n_samples, args.seq_len, args.batch_size[0], args.steps, args.update_every)))
        return
    result = {"environment": _environment(), "cases": []}
    for batch_size in args.batch_size:
        for method in args.methods:
            print(f"scoring_cost: {method}, batch {batch_size} ...", file=sys.stderr, flush=True)
            result["cases"].append(_child(method, batch_size, args))
    result["notes"] = [
        "Notes:", "",
        "- Times are wall-clock on a machine whose 2 cores were shared with other jobs at the time: read them as "
        "upper bounds; memory figures do not depend on the load.",
        "- LoRAPrune's time covers its whole iterative run (fine-tuning and mask updates included); Taylor and HyWIA "
        "take one backward pass per batch.",
        "- Why the 60% target is out of reach here: Taylor's gradients of the block weights (about 413 MiB in "
        "float32) are the only memory LoRAPrune avoids, and in this 135M model they are not the bulk. *before* "
        "(about 1 GB: interpreter, libraries, 540 MiB of float32 weights, the traced graph) is paid by both, the "
        "activations of the backward pass are the same for both, and LoRAPrune ends by writing the merged "
        "weights W0 + s·B·A as new tensors (the caller's weights are never written in place) — about as large as "
        "the gradients it saved. The paper's 52.6% is for LLaMA-7B on a GPU, where weights and their gradients "
        "dominate.",
    ]
    command = (f"python benchmarks/scoring_cost.py --n-samples {args.n_samples} --seq-len {args.seq_len} "
               f"--batch-size {' '.join(map(str, args.batch_size))} --steps {args.steps} --update-every {args.update_every}")
    print(markdown(result, command))
    if args.no_write:
        print(json.dumps(result["cases"]))
    if not args.quick and not args.no_write:
        write_docs(result, command)
        print(f"wrote {JSON_PATH.relative_to(REPO)} and the '{SECTION}' section of {DOC_PATH.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
