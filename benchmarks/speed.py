"""Speed benchmark: is a pruned model actually faster, in PyTorch eager and in ONNX Runtime?

What is measured
----------------
For each model, the dense model and its pruned variants (25% and 50% of the transformer-block
parameters removed by ``graphprune.compile``, magnitude scores, heads + channels; plus 50% with
channel widths rounded to multiples of 64 to show the effect of hardware-friendly widths) are each
run in a fresh subprocess, in the same benchmark run:

* prefill latency (ms): one forward pass over batch 1 x 512 tokens and batch 8 x 128 tokens;
* decode throughput (tokens/s) with the KV cache, batch 1 and batch 16: prefill a 16-token prompt,
  then time 32 single-token steps (4 with ``--quick``; greedy); tokens/s = batch x steps / seconds;
* ONNX file size (``.onnx`` + external ``.data``);
* peak resident memory while measuring each engine (the kernel's RSS high-water mark, reset after
  set-up; it includes the Python interpreter with torch imported).

Both engines run the same KV-cache graph (``compiled.export_onnx(path, cache=True)`` /
``graphprune.cached_graph``): prefill is a call with a past of length 0. Every figure is the median
of ``--repeats`` timed runs after one warm-up. The *ideal* speed-up is dense block parameters /
pruned block parameters; a speed-up under 1.05x is called out, with the likely reason.

Models: SmolLM2-135M (real weights, GGUF de-quantised to float32; fetched by
``../shared/data/fetch_smollm2.sh``) and a random-weight Llama with Llama-3.2-1B-like shapes (GQA:
32 query heads, 8 KV heads, hidden 2048, 16 layers, MLP 8192; vocabulary 32000).

Usage
-----
    python benchmarks/speed.py                 # full run on ONNX Runtime's best provider; writes the docs
    python benchmarks/speed.py --quick         # smoke run: a tiny Llama, short inputs; writes nothing
    python benchmarks/speed.py --provider CUDAExecutionProvider   # GPU machine (torch runs on cuda too)
    python benchmarks/speed.py --optimize      # ONNX files with ONNX Runtime's fusions (kept only with parity)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _args import positive_int
from _docs import PERFORMANCE, write_section
from _memory import peak_rss_mib, reset_peak
from _models import NAMES, SMOLLM2_DIR, SMOLLM2_GGUF, build

REPO = Path(__file__).resolve().parents[1]
JSON_PATH = REPO / "docs" / "speed.json"
COMMAND = "python benchmarks/speed.py"

VARIANTS = {"dense": (0.0, 1), "25%": (0.25, 1), "50%": (0.5, 1), "50% r64": (0.5, 64)}  # (ratio, round_to)
FULL = dict(prefill=[(1, 512), (8, 128)], decode=[1, 16], prompt=16, steps=32, repeats=5)
QUICK = dict(prefill=[(1, 64), (2, 32)], decode=[1, 4], prompt=8, steps=4, repeats=2)
TARGETS = {"25%": 1.25, "50%": 1.7}  # ONNX Runtime prefill speed-up on CPU
SLOW_BELOW = 1.05


# ================================================================ one variant (runs in a subprocess)
def _median_time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_variant(model_name: str, variant: str, settings: dict, provider: str, workdir: Path) -> dict:
    import numpy as np
    import torch

    import graphprune
    from graphprune.runtime import OnnxSession, _BoundSteps, _HostSteps

    device = "cuda" if provider == "CUDAExecutionProvider" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ratio, round_to = VARIANTS[variant]
    out = {"model": model_name, "variant": variant, "ratio": ratio, "round_to": round_to, "torch_device": device}
    model = build(model_name, device)
    vocab = model.config.vocab_size
    small = graphprune.compile(model, ratio, round_to=round_to, progress=False)
    out.update(params=small.plan.params_after, block_params=small.plan.block_params_after,
               dense_params=small.plan.params_before, dense_block_params=small.plan.block_params_before)
    path = workdir / f"{model_name}-{variant.replace(' ', '-').replace('%', '')}.onnx"
    t = time.perf_counter()
    small.export_onnx(path, cache=True, optimize=settings.get("optimize", False))
    out["export_s"] = time.perf_counter() - t
    if settings.get("optimize"):
        out["onnx_fusions"] = graphprune.export.fusions(path)  # {} when parity failed (a warning says why)
    out["file_bytes"] = sum(p.stat().st_size for p in workdir.glob(path.name + "*"))
    graph = graphprune.cached_graph(small, model)
    del model, small
    gen = torch.Generator().manual_seed(0)

    def ids(b, s):
        return torch.randint(0, vocab, (b, s), generator=gen).to(device)

    # ---- PyTorch eager (the pruned fx graph, ATen ops run one by one)
    reset_peak()
    torch_res = {}
    with torch.no_grad():
        for b, s in settings["prefill"]:
            x = ids(b, s)
            torch_res[f"prefill_b{b}x{s}_ms"] = 1e3 * _median_time(lambda: graph(x), settings["repeats"], sync)
        for b in settings["decode"]:
            prompt = ids(b, settings["prompt"])

            def decode():
                logits, past = graph(prompt)
                for _ in range(settings["steps"]):
                    logits, past = graph(logits[:, -1:].argmax(-1), past)
            torch_res[f"decode_b{b}_tok_s"] = b * settings["steps"] / _median_time(decode, settings["repeats"], sync)
    torch_res["peak_rss_mib"] = peak_rss_mib()
    out["torch"] = torch_res
    del graph

    # ---- ONNX Runtime
    reset_peak()
    sess = OnnxSession.open(path, provider, quiet=True)
    out["ort_provider"] = sess.provider
    ort_res = {}
    steps_cls = _BoundSteps if sess.on_cuda else _HostSteps
    for b, s in settings["prefill"]:
        x = ids(b, s).cpu().numpy()
        ort_res[f"prefill_b{b}x{s}_ms"] = 1e3 * _median_time(lambda: steps_cls(sess, x).step(None), settings["repeats"], lambda: None)
    for b in settings["decode"]:
        prompt = ids(b, settings["prompt"]).cpu().numpy()

        def decode():
            steps = steps_cls(sess, prompt)
            logits = steps.step(None)
            for _ in range(settings["steps"]):
                logits = steps.step(logits.argmax(-1)[:, None].astype(np.int64))
        ort_res[f"decode_b{b}_tok_s"] = b * settings["steps"] / _median_time(decode, settings["repeats"], lambda: None)
    ort_res["peak_rss_mib"] = peak_rss_mib()
    out["ort"] = ort_res
    return out


# ================================================================ orchestration
def _run_subprocess(model_name, variant, settings, provider, workdir) -> dict:
    cmd = [sys.executable, __file__, "--variant", model_name, variant, "--settings", json.dumps(settings),
           "--provider", provider, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{model_name} {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _speedups(rows: list[dict]) -> None:
    """Add, to every row, its speed-up over the dense row of the same model (per engine and metric)."""
    dense = {r["model"]: r for r in rows if r["variant"] == "dense"}
    for r in rows:
        d = dense[r["model"]]
        r["ideal"] = d["dense_block_params"] / r["block_params"]
        r["ideal_all_params"] = d["params"] / r["params"]
        for engine in ("torch", "ort"):
            r[f"{engine}_speedup"] = {}
            for k, v in r[engine].items():
                if k.endswith("_ms"):
                    r[f"{engine}_speedup"][k] = d[engine][k] / v
                elif k.endswith("_tok_s"):
                    r[f"{engine}_speedup"][k] = v / d[engine][k]


def _why_slow(metric: str, row: dict) -> str:
    if metric.startswith("decode_b1_"):
        return ("batch-1 decode reads every weight once per token: it is bound by memory bandwidth and per-op "
                "overheads (about 10 ops per layer regardless of width), not by arithmetic")
    if metric.startswith("decode"):
        return "decode steps are short; fixed per-step costs (LM head over the whole vocabulary, cache copies, op dispatch) dominate"
    if row["ideal_all_params"] < 0.8 * row["ideal"]:
        return (f"the unpruned embedding and LM head are a large share of the model (ideal over all parameters is only "
                f"{row['ideal_all_params']:.2f}x)")
    return "widths that map poorly to the kernels' tiles, or a time dominated by non-matmul ops"


def _fmt_metric(m: str) -> str:
    m = m.replace("prefill_", "prefill ").replace("decode_", "decode ").replace("_ms", " ms").replace("_tok_s", " tok/s")
    return m


def markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    label = "CUDA" if "CUDA" in meta["provider"] else "CPU"
    lines = [f"## Speed ({label})", "",
             f"{meta['provider']}, one model per run (`--models`), each measured with the command shown under it. "
             f"Median of the repeats after a warm-up; decode = {meta['settings']['steps']} greedy steps after a "
             f"{meta['settings']['prompt']}-token prompt, with the KV cache. Speed-ups are over the dense model of the same run; "
             "*ideal* = dense block parameters / pruned block parameters. `r64` = channel widths rounded to multiples of 64.", ""]
    metrics = [k for k in rows[0]["ort"] if k != "peak_rss_mib"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        m = mine[0].get("measured", meta)
        lines += [f"### {model}", "",
                  f"Measured {m['date']} on {m['machine']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
                  f"median of {m['settings']['repeats']}:", "", "```", m["command"], "```", ""]
        head = ["variant", "params", "ideal", "file MiB"]
        for engine, name in (("ort", "ORT"), ("torch", "PyTorch")):
            head += [f"{name} {_fmt_metric(m)}" for m in metrics] + [f"{name} peak RSS MiB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mine:
            cells = [r["variant"], f"{r['params'] / 1e6:.1f} M", f"{r['ideal']:.2f}x", f"{r['file_bytes'] / 2**20:.0f}"]
            for engine in ("ort", "torch"):
                for m in metrics:
                    v, s = r[engine][m], r[f"{engine}_speedup"][m]
                    cells.append(f"{v:.1f}" + ("" if r["variant"] == "dense" else f" ({s:.2f}x)"))
                cells.append(f"{r[engine]['peak_rss_mib']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        slow = [(r, e, m) for r in mine if r["variant"] != "dense" for e in ("ort", "torch") for m in metrics
                if r[f"{e}_speedup"][m] < SLOW_BELOW]
        if slow:
            lines.append("Less than 5% faster than dense:")
            lines.append("")
            for r, e, m in slow:
                lines.append(f"- {r['variant']}, {'ONNX Runtime' if e == 'ort' else 'PyTorch'} {_fmt_metric(m)}: "
                             f"{r[f'{e}_speedup'][m]:.2f}x (ideal {r['ideal']:.2f}x) — {_why_slow(m, r)}.")
            lines.append("")
    if label == "CPU":
        lines += ["### Targets (ONNX Runtime prefill, CPU)", "", "| model | variant | prefill | speed-up | target | result |",
                  "|---|---|---|---:|---:|---|"]
        for r in rows:
            if r["variant"] in TARGETS:
                for m in metrics:
                    if m.startswith("prefill"):
                        s = r["ort_speedup"][m]
                        ok = "**pass**" if s >= TARGETS[r["variant"]] else "**fail**"
                        lines.append(f"| {r['model']} | {r['variant']} | {_fmt_metric(m)} | {s:.2f}x | {TARGETS[r['variant']]}x | {ok} |")
        lines.append("")
    return "\n".join(lines)


def _provider(name: str) -> str:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if name != "auto" and name not in available:
        raise argparse.ArgumentTypeError(f"ONNX Runtime has no {name!r} here; choose auto or one of: {', '.join(available)}")
    return name


def _model(name: str) -> str:
    if name not in NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from {', '.join(NAMES)}")
    return name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny Llama, short inputs, 2 repeats; writes nothing")
    ap.add_argument("--provider", default="auto", type=_provider, help="ONNX Runtime provider (default: CUDA if available, else CPU)")
    ap.add_argument("--models", nargs="*", type=_model, help="subset of: smollm2 llama-1b (tiny with --quick)")
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                    help="write docs/speed.json and the Speed section of docs/performance.md (default: yes unless --quick)")
    ap.add_argument("--repeats", type=positive_int, help="timed runs per measurement (default 5; 2 with --quick)")
    ap.add_argument("--optimize", action="store_true",
                    help="export with ONNX Runtime's fusions (graphprune.export_onnx(optimize=True), kept only with parity)")
    ap.add_argument("--variant", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from graphprune.runtime import choose_provider

    provider = choose_provider(args.provider)[0]
    if args.variant:  # a child process
        print(json.dumps(run_variant(*args.variant, json.loads(args.settings), provider, Path(args.workdir))))
        return
    settings = dict(QUICK if args.quick else FULL, optimize=args.optimize)
    if args.repeats is not None:
        settings["repeats"] = args.repeats
    models = args.models or (["tiny"] if args.quick else ["smollm2", "llama-1b"])
    if "smollm2" in models and not (SMOLLM2_DIR / SMOLLM2_GGUF).exists():
        raise SystemExit(f"SmolLM2 is not at {SMOLLM2_DIR}; run ../shared/data/fetch_smollm2.sh first")
    import onnxruntime
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="graphprune-speed-") as workdir:
        for model in models:
            for variant in VARIANTS:
                print(f"{model} {variant} ...", file=sys.stderr, flush=True)
                rows.append(_run_subprocess(model, variant, settings, provider, Path(workdir)))
    _speedups(rows)
    cmd = (COMMAND + " " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": cmd,
            "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})", "provider": provider,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "settings": settings, "torch_threads": torch.get_num_threads()}
    for r in rows:
        r["measured"] = meta
    result = {"meta": meta, "rows": rows}
    write = args.write if args.write is not None else not args.quick
    data = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    key = "cuda" if "CUDA" in provider else "cpu"
    if write and key in data:  # the models not measured now keep their rows (and say when they were measured)
        old = data[key]
        kept = [{**r, "measured": r.get("measured", old["meta"])} for r in old["rows"] if r["model"] not in models]
        result["rows"] = kept + rows
    section = markdown(result)
    print(section)
    if write:
        from graphprune.plan import atomic_write_text

        data[key] = result
        atomic_write_text(JSON_PATH, json.dumps(data, indent=1))
        write_section(section)
        print(f"wrote {JSON_PATH.relative_to(REPO)} and {PERFORMANCE.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
