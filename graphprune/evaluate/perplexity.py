"""Perplexity over non-overlapping windows of a corpus (LLM-Pruner's protocol and a long one).

The split's text is tokenized once (no special tokens), cut into consecutive windows of
``seq_len`` tokens (the last, partial window is dropped) and each window is scored on its own:
its ``seq_len - 1`` next-token predictions, with no context carried over from the previous
window. Perplexity = exp(mean negative log-likelihood over every scored token).
LLM-Pruner's tables use ``seq_len=128``; ``LONG_CONTEXT`` (1024, or the model's limit) is the
long-context protocol.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import as_tokenizer, check_seq_len, check_size, check_token_ids, corpus_text, load_tokenizer, tokenize
from ..errors import GraphpruneError
from .runner import LogitsRunner

LONG_CONTEXT = 1024
# the split each corpus is reported on (METHODS.md: PTB on its validation split)
DEFAULT_SPLIT = {"wikitext2": "test", "ptb": "valid", "tinystories": "valid"}


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    corpus: str
    split: str
    seq_len: int
    windows: int
    tokens_scored: int
    tokens_available: int  # tokens in the whole split
    seconds: float

    def __float__(self) -> float:
        return self.ppl

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.corpus}/{self.split} PPL {self.ppl:.3f} (window {self.seq_len}, {self.windows} windows, "
                f"{self.tokens_scored:,} scored tokens of {self.tokens_available:,})")


def resolve_seq_len(runner: LogitsRunner, seq_len: int | str) -> int:
    """An int window, or ``"long"``: 1024 or the model's limit when it is shorter."""
    if seq_len == "long":
        limit = runner.max_length()
        return min(LONG_CONTEXT, limit) if limit else LONG_CONTEXT
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise GraphpruneError(f"seq_len must be an integer >= 2 or 'long', got {seq_len!r}")
    return check_seq_len(seq_len, runner.max_length())


def perplexity(
    model,
    tokenizer=None,
    corpus: str = "wikitext2",
    split: str | None = None,
    seq_len: int | str = 128,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    *,
    text: str | None = None,
    ids: torch.Tensor | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a corpus split (``"wikitext2"``, ``"ptb"``, ``"tinystories"`` or a text file).

    ``model``: an ``nn.Module``, a ``CompiledModel``/``GraphModule``, or an ONNX Runtime session.
    ``seq_len``: window length (128 = LLM-Pruner's protocol; ``"long"`` = 1024 or the model's limit).
    ``max_tokens`` keeps only the first that many tokens (quick runs). ``text`` or ``ids`` replace
    the corpus (then ``corpus`` is only a label). Windows are scored ``batch_size`` at a time.
    """
    t0 = time.perf_counter()
    runner = LogitsRunner(model)
    seq_len = resolve_seq_len(runner, seq_len)
    check_size(batch_size, "batch_size")
    tokenizer = as_tokenizer(tokenizer)  # a path: the tokenizer saved there
    split = split or DEFAULT_SPLIT.get(corpus, "test")
    if ids is None:
        if tokenizer is None:
            tokenizer = load_tokenizer(model if isinstance(model, torch.nn.Module) else _name_or_path(runner))
        ids = tokenize(text if text is not None else corpus_text(corpus, split), tokenizer)
    ids = torch.as_tensor(ids)
    check_token_ids(ids, runner.config.get("vocab_size"), "ids")  # a float tensor must not be truncated to ids
    ids = ids.long().flatten()
    available = ids.numel()
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise GraphpruneError(f"max_tokens={max_tokens} is shorter than one window of {seq_len} tokens")
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise GraphpruneError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    total_nll, scored = 0.0, 0
    bar = tqdm(total=n_windows, desc=f"ppl {corpus}@{seq_len}", disable=not progress, leave=False)
    for start in range(0, n_windows, batch_size):
        batch = windows[start : start + batch_size]
        logits = runner(batch)  # on the model's device: a [batch, seq, vocab] copy on the host would be large
        targets = batch[:, 1:].reshape(-1).to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, reduction="sum")
        total_nll += float(nll)
        scored += batch[:, 1:].numel()
        bar.update(len(batch))
    bar.close()
    mean = total_nll / scored
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, corpus=corpus, split=split, seq_len=seq_len, windows=n_windows,
        tokens_scored=scored, tokens_available=available, seconds=time.perf_counter() - t0,
    )


def _name_or_path(runner: LogitsRunner) -> str:
    path = runner.config.get("_name_or_path") or runner.config.get("name_or_path")
    if not path:
        raise GraphpruneError("this model does not say where its tokenizer is: pass tokenizer=...")
    return path
