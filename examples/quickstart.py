"""Quickstart: prune a causal LM, check it, generate with it, save it.

Run it:  python examples/quickstart.py [--model PATH] [--ratio 0.2] [--out out/quickstart]
(default model: the tiny stories260K Llama in the shared data folder; any local Hugging Face
folder works, e.g. SmolLM2-135M.)
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import graphprune
from graphprune.data import data_dir


def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a KV cache (the pruned graph is called like the original model)."""
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(data_dir() / "models" / "stories260K"))
    parser.add_argument("--ratio", type=float, default=0.2)  # at 0.5, see lora_recovery.py to recover quality
    parser.add_argument("--prompt", default="Once upon a time, there was a little")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args(argv)

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    small = graphprune.compile(model, ratio=args.ratio)  # trace -> analyse -> score -> plan -> rewrite
    print(small.report)                                   # params/FLOPs before and after, widths per layer
    print(graphprune.verify(small))                       # pruned graph == masked dense graph

    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for name, m in (("dense ", model), ("pruned", small)):
            print(f"{name}: {tokenizer.decode(greedy(m, ids, args.new_tokens)[0])!r}")

    small.save(args.out)  # model.pt2, plan.json, report.json, widths.png, a transformers checkpoint
    again = graphprune.load(args.out)
    print(f"saved to {args.out}; reloaded: {again.plan.achieved_ratio:.1%} of block parameters removed")


if __name__ == "__main__":
    main()
