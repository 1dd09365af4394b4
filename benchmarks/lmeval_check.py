"""Check graphprune's zero-shot scorer against lm-evaluation-harness on a dense model, offline.

lm-eval is not a graphprune dependency (install it beside: ``pip install lm-eval``). The bundled
task files are converted to lm-eval *local* task definitions (``dataset_path: json`` on a
temporary jsonl holding the exact contexts/choices graphprune scores, so the comparison is about
the scoring — tokenization split, log-likelihoods, acc / acc_norm — not about prompt wording),
both run on the same model, and the per-request log-likelihoods and accuracies are compared.

    python benchmarks/lmeval_check.py --model ../shared/data/models/stories260K --limit 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from _args import positive_int  # noqa: E402
from graphprune.evaluate import LogitsRunner, load_task, score_questions  # noqa: E402
from graphprune.evaluate.zeroshot import TASK_FORMATS, TASKS, encode_pair, loglikelihoods  # noqa: E402
from graphprune.io import load_model  # noqa: E402

YAML = """task: gp_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{target}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_tasks(folder: Path, tasks, limit: int) -> None:
    for name in tasks:
        rows = []
        for q in load_task(name, limit):
            if len(set(q.contexts)) == 1:  # one context, several continuations
                rows.append({"context": q.contexts[0], "choices": [c[1:] for c in q.continuations], "gold": q.gold})
            else:  # WinoGrande: several contexts, one continuation (lm-eval's "multiple input")
                rows.append({"context": q.gold, "choices": q.contexts, "target": q.continuations[0][1:], "gold": q.gold})
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        multiple_input = isinstance(rows[0]["context"], int)
        text = "{{gold}}" if multiple_input else "{{context}}"
        target = "{{target}}" if multiple_input else "{{gold}}"
        (folder / f"gp_{name}.yaml").write_text(YAML.format(name=name, path=data, text=text, target=target))


def _model_arg(text: str) -> str:
    path = Path(text)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hugging Face folder or a .gguf file")
    return text


def _tasks_arg(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASK_FORMATS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(bad) or repr(text)}; choose from {', '.join(TASK_FORMATS)}")
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=_model_arg, default=str(Path(__file__).resolve().parents[2] / "shared/data/models/stories260K"),
                        help="a Hugging Face folder or a .gguf file")
    parser.add_argument("--limit", type=positive_int, default=50, help="questions per task (at least 1)")
    parser.add_argument("--tasks", type=_tasks_arg, default=list(TASKS), help=f"comma list of {','.join(TASK_FORMATS)} (default: all)")
    parser.add_argument("--add-bos", action="store_true", help="prepend BOS (lm-eval: add_bos_token=True)")
    args = parser.parse_args()

    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        parser.error(f"lm-eval is not installed ({exc}): pip install lm-eval (e.g. in a venv with --system-site-packages)")

    tasks = args.tasks
    loaded = load_model(args.model)  # a Hugging Face folder or a .gguf file
    model, tok = loaded.model, loaded.tokenizer()
    report = {"model": args.model, "limit": args.limit, "add_bos": args.add_bos, "lm_eval": lm_eval.__version__, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(Path(tmp), tasks, args.limit)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, add_bos_token=args.add_bos, max_length=tok.model_max_length if tok.model_max_length < 10**6 else None)
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"gp_{t}" for t in tasks], task_manager=TaskManager(include_path=tmp),
                                      log_samples=True, limit=args.limit)
    runner = LogitsRunner(model)
    worst_ll = 0.0
    for name in tasks:
        questions = load_task(name, args.limit)
        acc, acc_norm, _, _ = score_questions(runner, tok, questions, add_bos=args.add_bos)
        theirs = out["results"][f"gp_{name}"]
        # per-request log-likelihoods, in lm-eval's document order
        ours_ll = loglikelihoods(runner, [encode_pair(tok, c, k, args.add_bos) for q in questions for c, k in zip(q.contexts, q.continuations)], max_length=runner.max_length())
        their_ll = [float(r[0][0]) for s in sorted(out["samples"][f"gp_{name}"], key=lambda s: s["doc_id"]) for r in s["resps"]]
        diff = max(abs(a - b) for a, b in zip(ours_ll, their_ll))
        worst_ll = max(worst_ll, diff)
        row = {"ours": {"acc": acc, "acc_norm": acc_norm}, "lm_eval": {"acc": theirs["acc,none"], "acc_norm": theirs["acc_norm,none"]},
               "requests": len(ours_ll), "max_abs_loglikelihood_diff": diff}
        report["tasks"][name] = row
        print(f"{name:14s} acc {acc:.4f} vs {theirs['acc,none']:.4f}   acc_norm {acc_norm:.4f} vs {theirs['acc_norm,none']:.4f}   "
              f"max |ll diff| {diff:.2e} over {len(ours_ll)} requests")
    report["max_abs_loglikelihood_diff"] = worst_ll
    print(json.dumps(report, indent=1))
    same = all(abs(r["ours"][m] - r["lm_eval"][m]) < 1e-9 for r in report["tasks"].values() for m in ("acc", "acc_norm"))
    sys.exit(0 if same and worst_ll < 1e-3 else 1)


if __name__ == "__main__":
    main()
