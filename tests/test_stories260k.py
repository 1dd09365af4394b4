"""Real weights: the shipped stories260K (a tiny Llama) pruned by 50% still runs as a language model."""
from __future__ import annotations

import gzip
import math

import pytest
import torch
import transformers

import graphprune


@pytest.fixture(scope="module")
def stories(stories_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
    text = gzip.open(stories_dir.parents[1] / "tinystories" / "valid_head.txt.gz", "rt", encoding="utf-8").read()
    ids = tok(text[:20000], return_tensors="pt").input_ids[0]
    return model, tok, ids


def perplexity(call, ids: torch.Tensor, window: int = 256) -> float:
    """exp(mean next-token NLL) over non-overlapping windows (no context carried across)."""
    n = (len(ids) // window) * window
    batch = ids[:n].view(-1, window)
    with torch.no_grad():
        logits = call(batch)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return math.exp(nll.item())


def greedy(call, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            nxt = call(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_stories260k_pruned_by_half_still_generates(stories):
    model, tok, ids = stories
    small = graphprune.compile(model, ratio=0.5, progress=False)
    assert abs(small.report.achieved_ratio - 0.5) < 0.1
    assert graphprune.verify(small).ok

    def dense(x):
        return model(input_ids=x, use_cache=False).logits

    def pruned(x):
        return small(input_ids=x, use_cache=False).logits

    ppl_dense, ppl_pruned = perplexity(dense, ids), perplexity(pruned, ids)
    print(f"\nstories260K perplexity (256-token windows): dense {ppl_dense:.2f}, 50% pruned {ppl_pruned:.2f}")
    assert math.isfinite(ppl_pruned) and ppl_pruned < model.config.vocab_size  # better than uniform guessing
    assert ppl_dense < ppl_pruned  # pruning costs quality: the numbers are real, not copied

    prompt = torch.tensor([[1] + tok("Once upon a time", add_special_tokens=False).input_ids] * 2)
    out = greedy(pruned, prompt, 20)
    text = tok.decode(out[0, prompt.shape[1]:])
    print("pruned continuation:", repr(text))
    assert out.shape == (2, prompt.shape[1] + 20) and len(text.strip()) > 0
