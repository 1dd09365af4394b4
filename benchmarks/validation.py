"""Choosing the quality benchmark's options on held-out text: never on the split it reports.

Each case compiles SmolLM2-135M with one method and its options and measures WikiText-2
*validation* perplexity (128-token windows, the first 8,192 tokens), without recovery and, for
each ``--recovery`` given, after that LoRA recovery. The recipe, the ``--method-config`` and the
recovery options of ``benchmarks/quality.py`` were chosen from these numbers;
``docs/validation.md`` says which number decided what. Calibration is the quality benchmark's
(32 × 128 tokens of WikiText-2 train); PAT trains on its recovery data, as there.

    python benchmarks/validation.py 'taylor:0.5:{"kinds": ["channels"], "protect_layers": [4, 2]}'
    python benchmarks/validation.py 'pat:0.2:{"steps": 80, "batch_size": 4, "lr": 2e-3, "mask_lr": 1e-2, "distill": true}'
    python benchmarks/validation.py 'taylor:0.2:{"kinds": ["channels"]}' --recovery '{"steps": 80}' \
        --recovery '{"steps": 80, "distill_positions": "all"}'

A case is ``method:ratio:options`` (options: JSON for ``graphprune.compile``; ``dense:0:{}`` for
the unpruned model). A recovery is JSON for ``graphprune.finetune`` over the quality benchmark's
defaults (its data — ``"data"`` names another, e.g. ``"wikitext2"`` for WikiText-2 train — batch,
sequence length, lr, LoRA rank, and distillation from the dense model for a pruned one); the model
is compiled once for all of them. Results are merged into ``docs/validation.json`` (by case) and
the table in ``docs/validation.md`` is rewritten; the prose above the table is not touched.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _docs import write_section
from _models import SMOLLM2_DIR, SMOLLM2_GGUF

DOCS = Path(__file__).resolve().parents[1] / "docs"
MAX_TOKENS = 8192
# what graphprune reads as WikiText-2 validation text; results measured before the library dropped
# the "<unk>" markers carry no such field and keep their own keys (see graphprune.data.DROPPED_MARKERS)
VALID_TEXT = "no <unk>"


def parse_case(text: str) -> tuple[str, float, dict]:
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise ValueError(f"{len(parts)} ':'-separated part(s), not 3")
    method, ratio, options = parts[0], float(parts[1]), json.loads(parts[2])
    if not isinstance(options, dict):
        raise ValueError(f"the options must be a JSON object, got {type(options).__name__}")
    return method, ratio, options


def case_key(text: str) -> str:
    """One spelling per case (the JSON's spacing and key order do not make a new one)."""
    method, ratio, options = parse_case(text)
    return f"{method}:{ratio:g}:{json.dumps(options, sort_keys=True)}"


def recovery_key(text: str) -> str:
    options = json.loads(text)
    if not isinstance(options, dict):
        raise ValueError("a recovery is a JSON object of graphprune.finetune options")
    return json.dumps(options, sort_keys=True)


def run(case: str, recoveries: list[str] = ()):
    """Yields the case's result without recovery, then after each recovery (one compile for all)."""
    import torch

    import graphprune
    from graphprune.data import calibration
    from graphprune.evaluate import perplexity
    from graphprune.io import load_model
    from graphprune.registry import get_pass
    from quality import Caps, finetune_data_path, head_commit, recovery_options, recovery_windows

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
        pruned = graphprune.compile(model, ratio, method=method, calib=calib, tokenizer=tok, n_samples=caps.calib_samples,
                                    seq_len=caps.calib_seq_len, progress=False, **options)
    seconds = time.perf_counter() - t0

    def valid_ppl(m) -> float:
        return perplexity(m, tok, corpus="wikitext2", split="valid", seq_len=128, max_tokens=MAX_TOKENS, progress=False).ppl

    common = {"case": case, "method": method, "ratio": ratio, "options": options, "params": pruned.num_parameters(),
              "compile_seconds": seconds, "commit": head_commit(), "valid_text": VALID_TEXT}
    yield {**common, "recovery": None, "valid_ppl": valid_ppl(pruned)}
    for recovery in map(json.loads, recoveries):
        t0 = time.perf_counter()
        kwargs = {**recovery_options(caps, None if method == "dense" else model), **recovery}
        data = kwargs.pop("data", finetune_data_path(caps))  # e.g. "wikitext2": its train split
        tuned = graphprune.finetune(pruned, data, tokenizer=tok, progress=False, **kwargs)
        yield {**common, "recovery": recovery, "finetune_seconds": time.perf_counter() - t0, "valid_ppl": valid_ppl(tuned)}


def result_key(result: dict) -> str:
    case = case_key(result["case"])
    key = case if result.get("recovery") is None else f"{case} + {json.dumps(result['recovery'], sort_keys=True)}"
    return f"{key} [{result['valid_text']}]" if result.get("valid_text") else key


def text_label(result: dict) -> str:
    return "without `<unk>`" if result.get("valid_text") else "with `<unk>`"


def table(results: dict) -> str:
    from quality import Caps

    caps = Caps()
    lines = ["## Measured (WikiText-2 validation, 128-token windows, first 8,192 tokens)", "",
             f"Recovery: `graphprune.finetune` options over the quality benchmark's defaults (`{caps.finetune_data}`, "
             f"{caps.finetune_batch} × {caps.finetune_seq_len} tokens a step, lr {caps.finetune_lr:g}, LoRA r={caps.lora_r}, "
             "KL to the dense model's logits on the response tokens).", "",
             "*text*: WikiText-2's validation file marks rare words `<unk>`; rows measured before the library dropped "
             "the markers (see `graphprune/data.py`) say *with `<unk>`* (both the text measured and the calibration).", "",
             "| method | ratio | options | recovery | text | params | valid PPL | commit |",
             "|---|---|---|---|---|---:|---:|---|"]

    def order(r):
        return (r["method"], r["ratio"], json.dumps(r["options"], sort_keys=True), json.dumps(r.get("recovery"), sort_keys=True),
                text_label(r))

    for r in sorted(results.values(), key=order):
        recovery = f"`{json.dumps(r['recovery'], sort_keys=True)}`" if r.get("recovery") is not None else "none"
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | `{json.dumps(r['options'], sort_keys=True)}` | {recovery} "
                     f"| {text_label(r)} | {r['params']:,} | {r['valid_ppl']:,.2f} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def _case_arg(text: str) -> str:
    try:
        return case_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad case {text!r} (want method:ratio:options-json): {' '.join(str(e).split())}") from None


def _recovery_arg(text: str) -> str:
    try:
        return recovery_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad --recovery {text!r} (want a JSON object of finetune options): "
                                         f"{' '.join(str(e).split())}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=_case_arg, help="method:ratio:options-json (options: a JSON object)")
    parser.add_argument("--recovery", action="append", default=[], metavar="JSON", type=_recovery_arg,
                        help="graphprune.finetune options; the case is also measured after this recovery (repeatable)")
    args = parser.parse_args()
    keys, recoveries = args.cases, args.recovery
    from graphprune.plan import atomic_write_text

    out_json = DOCS / "validation.json"
    for case in keys:
        for result in run(case, recoveries):
            print(f"{result_key(result)}  valid PPL {result['valid_ppl']:.2f}  ({result['compile_seconds']:.0f} s)", flush=True)
            # re-read: another run may have added cases meanwhile
            results = json.loads(out_json.read_text()) if out_json.exists() else {}
            results[result_key(result)] = result
            atomic_write_text(out_json, json.dumps(results, indent=1) + "\n")
            write_section(table(results), DOCS / "validation.md")


if __name__ == "__main__":
    main()
