"""Zero-shot multiple-choice accuracy by log-likelihood, with lm-evaluation-harness' rules.

Each question becomes one request per choice, ``(context, continuation)``; the model scores
the continuation's tokens given the context. Like lm-eval:

- trailing spaces of the context move to the continuation, and the continuation's tokens are
  those of ``tok(context + continuation)`` after the tokens of ``tok(context)``;
- ``acc``: the choice with the highest summed log-likelihood is the answer;
- ``acc_norm``: the same, divided by the choice's length in characters;
- prompts follow lm-eval's task definitions, rebuilt from the local llm-foundry jsonl files
  (``boolq``: ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``" yes"``/``" no"``, ...);
- WinoGrande scores the shared ending after each filled-in sentence prefix ("partial scoring").

The LLM-Pruner convention reports acc for BoolQ, PIQA, WinoGrande, ARC-e and acc_norm for
HellaSwag, ARC-c and OpenBookQA (:data:`REPORTED_METRIC`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import data_dir, load_tokenizer
from ..errors import GraphpruneError
from .runner import LogitsRunner

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
REPORTED_METRIC = {
    "boolq": "acc", "piqa": "acc", "winogrande": "acc", "arc_easy": "acc",
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
}


@dataclass
class Question:
    """One multiple-choice item: a context per choice (usually the same) and a continuation per choice."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    # lengths used by acc_norm (lm-eval: the choice strings' characters)
    norm_lengths: list[int] = field(default_factory=list)

    def __post_init__(self):
        if len(self.contexts) != len(self.continuations) or not self.contexts:
            raise GraphpruneError("a question needs one context and one continuation per choice")
        if not 0 <= self.gold < len(self.contexts):
            raise GraphpruneError(f"gold index {self.gold} out of range for {len(self.contexts)} choices")
        if not self.norm_lengths:
            self.norm_lengths = [max(1, len(c.strip())) for c in self.continuations]


# ================================================================ tasks from local files
def _choices(ctx: str, choices: list[str], gold: int) -> Question:
    return Question([ctx] * len(choices), [" " + c for c in choices], gold, [max(1, len(c)) for c in choices])


def _boolq(row) -> Question:
    passage, _, question = row["query"].partition("\nQuestion: ")
    passage = passage.removeprefix("Passage: ")
    return _choices(f"{passage}\nQuestion: {question}\nAnswer:", row["choices"], row["gold"])


def _question_answer(row) -> Question:  # PIQA, ARC: "Question: ...\nAnswer:"
    return _choices(row["query"].rstrip("\n") + "\nAnswer:", row["choices"], row["gold"])


def _plain(row) -> Question:  # OpenBookQA, HellaSwag: the query is the context
    return _choices(row["query"], row["choices"], row["gold"])


def _winogrande(row) -> Question:
    cont = " " + row["continuation"].strip()
    n = len(row["context_options"])
    return Question(list(row["context_options"]), [cont] * n, row["gold"], [max(1, len(c)) for c in row["context_options"]])


TASK_FORMATS: dict[str, tuple[str, Callable[[dict], Question]]] = {
    "boolq": ("zeroshot/boolq.jsonl", _boolq),
    "piqa": ("zeroshot/piqa.jsonl", _question_answer),
    "arc_easy": ("zeroshot/arc_easy.jsonl", _question_answer),
    "arc_challenge": ("zeroshot/arc_challenge.jsonl", _question_answer),
    "openbookqa": ("zeroshot/openbookqa.jsonl", _plain),
    "hellaswag": ("zeroshot/hellaswag.jsonl", _plain),
    "winogrande": ("zeroshot/winogrande.jsonl", _winogrande),
}


def load_task(name: str, max_examples: int | None = None, path: str | Path | None = None) -> list[Question]:
    """The questions of a bundled task (the first ``max_examples`` of the file, in file order)."""
    if name not in TASK_FORMATS:
        raise GraphpruneError(f"unknown zero-shot task {name!r}; available: {sorted(TASK_FORMATS)}")
    rel, convert = TASK_FORMATS[name]
    path = Path(path) if path is not None else data_dir() / rel
    if not path.is_file():
        raise GraphpruneError(f"task file missing: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if max_examples is not None and len(out) >= max_examples:
                break
            if not line.strip():
                continue
            try:
                out.append(convert(json.loads(line)))
            except (KeyError, json.JSONDecodeError) as exc:
                raise GraphpruneError(f"{path}:{i + 1}: not a {name} record ({exc})") from exc
    return out


# ================================================================ scoring
@dataclass
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    n: int
    metric: str  # the one reported (LLM-Pruner convention)
    seconds: float

    @property
    def score(self) -> float:
        return self.acc_norm if self.metric == "acc_norm" else self.acc

    def to_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    max_examples: int | None

    @property
    def average(self) -> float:
        return sum(t.score for t in self.tasks.values()) / len(self.tasks) if self.tasks else float("nan")

    def to_dict(self) -> dict:
        return {"tasks": {k: v.to_dict() for k, v in self.tasks.items()}, "average": self.average,
                "max_examples": self.max_examples}

    def __str__(self) -> str:
        cells = [f"{k} {v.score:.4f} ({v.metric}, n={v.n})" for k, v in self.tasks.items()]
        return "zero-shot: " + "; ".join(cells) + f"; average {self.average:.4f}"


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-eval does."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise GraphpruneError("add_bos=True but the tokenizer has no BOS token")
        whole, ctx = [tokenizer.bos_token_id, *whole], [tokenizer.bos_token_id, *ctx]
    cont = whole[len(ctx):]
    if not cont:
        raise GraphpruneError(f"the continuation {continuation!r} encodes to no tokens")
    return whole[: len(ctx)], cont


def _default_add_bos(tokenizer) -> bool:
    """Follow the tokenizer: prepend BOS when it adds one by default (Llama-style), not otherwise."""
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def loglikelihoods(
    runner: LogitsRunner,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[float]:
    """Summed log-probability of each continuation given its context (right-padded batches).

    Requests are scored longest first so a batch wastes little padding; sequences longer than
    ``max_length`` keep their last tokens (lm-eval's left truncation). A continuation longer than
    ``max_length`` itself (lm-eval refuses it) is scored in consecutive windows, each token with as
    much preceding text as fits, so every one of its tokens counts.
    """
    seqs, owner = [], []  # (input tokens, the tokens its last positions predict), request index
    for i, (ctx, cont) in enumerate(requests):
        for piece in _pieces(ctx + cont, len(ctx), max_length):
            seqs.append(piece)
            owner.append(i)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    pieces = [0.0] * len(seqs)
    bar = tqdm(total=len(seqs), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            tokens = seqs[i][0]
            batch[row, : len(tokens)] = torch.tensor(tokens)
        logits = runner(batch)
        for row, i in enumerate(idx):
            tokens, cont = seqs[i]
            end = len(tokens)
            # only the continuation's positions need a softmax over the vocabulary
            logprobs = F.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)
            pieces[i] = float(logprobs[torch.arange(len(cont)), torch.tensor(cont, device=logits.device)].sum())
        bar.update(len(idx))
    bar.close()
    out = [0.0] * len(requests)
    for i, value in zip(owner, pieces):
        out[i] += value
    return out


def _pieces(tokens: list[int], first: int, max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """Windows that score ``tokens[first:]``: (input, targets), the input's last positions
    predicting the targets. One window unless the targets alone exceed ``max_length``."""
    if not max_length:
        return [(tokens[:-1], tokens[first:])]
    pieces, end = [], len(tokens)
    while end > first:
        start = max(first, end - max_length)
        pieces.append((tokens[max(0, end - 1 - max_length) : end - 1], tokens[start:end]))
        end = start
    return pieces


def score_questions(
    runner: LogitsRunner | object,
    tokenizer,
    questions: list[Question],
    batch_size: int = 8,
    add_bos: bool | None = None,
    progress: bool = False,
    desc: str = "zero-shot",
) -> tuple[float, float, list[int], list[int]]:
    """(acc, acc_norm, predictions by acc, predictions by acc_norm) over ``questions``."""
    runner = runner if isinstance(runner, LogitsRunner) else LogitsRunner(runner)
    add_bos = _default_add_bos(tokenizer) if add_bos is None else add_bos
    requests, spans = [], []
    for q in questions:
        spans.append((len(requests), len(q.contexts)))
        requests += [encode_pair(tokenizer, c, k, add_bos) for c, k in zip(q.contexts, q.continuations)]
    lls = loglikelihoods(runner, requests, batch_size, runner.max_length(), progress, desc)
    pred, pred_norm = [], []
    for q, (start, n) in zip(questions, spans):
        ll = torch.tensor(lls[start : start + n], dtype=torch.float64)
        pred.append(int(ll.argmax()))
        pred_norm.append(int((ll / torch.tensor(q.norm_lengths, dtype=torch.float64)).argmax()))
    n = max(len(questions), 1)
    acc = sum(p == q.gold for p, q in zip(pred, questions)) / n
    acc_norm = sum(p == q.gold for p, q in zip(pred_norm, questions)) / n
    return acc, acc_norm, pred, pred_norm


def zeroshot(
    model,
    tokenizer=None,
    tasks=TASKS,
    max_examples: int | None = None,
    batch_size: int = 8,
    add_bos: bool | None = None,
    progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on the bundled tasks (all of ``TASKS`` by default).

    ``max_examples`` scores only the first that many questions of each task (quick runs).
    ``add_bos``: prepend the BOS token to every request; by default only when the tokenizer
    adds it on its own.
    """
    runner = LogitsRunner(model)
    if tokenizer is None:
        path = runner.config.get("_name_or_path") or runner.config.get("name_or_path")
        if not path:
            raise GraphpruneError("this model does not say where its tokenizer is: pass tokenizer=...")
        tokenizer = load_tokenizer(path)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    results = {}
    for name in tasks:
        t0 = time.perf_counter()
        questions = load_task(name, max_examples)
        acc, acc_norm, _, _ = score_questions(runner, tokenizer, questions, batch_size, add_bos, progress, name)
        results[name] = TaskResult(name, acc, acc_norm, len(questions), REPORTED_METRIC[name], time.perf_counter() - t0)
    return ZeroShotResult(results, max_examples)
