"""Choosing the quality benchmark's options on held-out text: never on the split it reports.

Each case compiles SmolLM2-135M with one method and its options and measures WikiText-2
*validation* perplexity (128-token windows, the first 8,192 tokens), without recovery. The recipe
and the ``--method-config`` of ``benchmarks/quality.py`` were chosen from these numbers;
``docs/validation.md`` says which number decided what. Calibration is the quality benchmark's
(32 × 128 tokens of WikiText-2 train); PAT trains on its recovery data, as there.

    python benchmarks/validation.py 'taylor:0.5:{"kinds": ["channels"], "protect_layers": [4, 2]}'
    python benchmarks/validation.py 'pat:0.2:{"steps": 40, "batch_size": 4, "lr": 1e-4, "mask_lr": 1e-2}'

A case is ``method:ratio:options`` (options: JSON for ``graphprune.compile``; ``dense:0:{}`` for
the unpruned model). Results are merged into ``docs/validation.json`` (by case) and the table in
``docs/validation.md`` is rewritten; the prose above the table is not touched.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _docs import write_section
from _models import SMOLLM2_DIR, SMOLLM2_GGUF

DOCS = Path(__file__).resolve().parents[1] / "docs"
MAX_TOKENS = 8192


def parse_case(text: str) -> tuple[str, float, dict]:
    method, ratio, options = text.split(":", 2)
    return method, float(ratio), json.loads(options)


def case_key(text: str) -> str:
    """One spelling per case (the JSON's spacing and key order do not make a new one)."""
    method, ratio, options = parse_case(text)
    return f"{method}:{ratio:g}:{json.dumps(options, sort_keys=True)}"


def run(case: str) -> dict:
    import torch

    import graphprune
    from graphprune.data import calibration
    from graphprune.evaluate import perplexity
    from graphprune.io import load_model
    from graphprune.registry import get_pass
    from quality import Caps, head_commit, recovery_windows

    method, ratio, options = parse_case(case)
    caps = Caps()  # the quality benchmark's calibration and recovery data
    torch.manual_seed(0)
    loaded = load_model(SMOLLM2_DIR / SMOLLM2_GGUF)
    model, tok = loaded.model, loaded.tokenizer()
    t0 = time.perf_counter()
    if method == "dense":
        pruned = model
    else:
        if method == "pat":
            pat = get_pass("pat").Config(**{k: options[k] for k in ("steps", "batch_size") if k in options})
            calib = recovery_windows(caps, tok, pat.steps, pat.batch_size)
        else:
            calib = calibration("wikitext2", tok, n_samples=caps.calib_samples, seq_len=caps.calib_seq_len, seed=0)
        pruned = graphprune.compile(model, ratio, method=method, calib=calib, progress=False, **options)
    seconds = time.perf_counter() - t0
    ppl = perplexity(pruned, tok, corpus="wikitext2", split="valid", seq_len=128, max_tokens=MAX_TOKENS, progress=False)
    params = pruned.num_parameters()
    return {"case": case, "method": method, "ratio": ratio, "options": options, "valid_ppl": ppl.ppl,
            "params": params, "compile_seconds": seconds, "commit": head_commit()}


def table(results: dict) -> str:
    lines = ["## Measured (WikiText-2 validation, 128-token windows, first 8,192 tokens, no recovery)", "",
             "| method | ratio | options | params | valid PPL | commit |", "|---|---|---|---:|---:|---|"]
    for r in sorted(results.values(), key=lambda r: (r["method"], r["ratio"], json.dumps(r["options"], sort_keys=True))):
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | `{json.dumps(r['options'], sort_keys=True)}` | {r['params']:,} "
                     f"| {r['valid_ppl']:,.2f} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="method:ratio:options-json")
    args = parser.parse_args()
    keys = []
    for case in args.cases:
        try:
            keys.append(case_key(case))
        except ValueError as e:
            sys.exit(f"validation.py: bad case {case!r} (want method:ratio:options-json): {e}")
    from graphprune.plan import atomic_write_text

    out_json = DOCS / "validation.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    for case in keys:
        result = run(case)
        print(f"{case}  valid PPL {result['valid_ppl']:.2f}  ({result['compile_seconds']:.0f} s)", flush=True)
        results[case] = result
        atomic_write_text(out_json, json.dumps(results, indent=1) + "\n")
        write_section(table(results), DOCS / "validation.md")


if __name__ == "__main__":
    main()
