"""ONNX deployment: prune, export to ONNX (with a KV cache), and generate with ONNX Runtime.

The pruned graph is exported twice: once as a plain forward pass (checked against PyTorch) and
once with KV-cache inputs and outputs, which ``graphprune.generate`` decodes incrementally.
Batch size and sequence length stay dynamic in both files.

Run it:  python examples/onnx_deploy.py [--model PATH] [--ratio 0.3] [--out out/onnx]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import graphprune
from graphprune.data import data_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(data_dir() / "models" / "stories260K"))
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default="out/onnx")
    args = parser.parse_args(argv)
    out = Path(args.out)

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    small = graphprune.compile(model, ratio=args.ratio, progress=False)
    print(small.report)

    # 1. plain forward pass: ONNX Runtime must agree with PyTorch
    plain = small.export_onnx(out / "model.onnx")
    session = graphprune.OnnxSession.open(plain)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.repeat(2, 1)  # a batch of two
    onnx_logits = torch.from_numpy(session(input_ids=ids)["logits"])
    with torch.no_grad():
        torch_logits = small(input_ids=ids, use_cache=False).logits
    print(f"ONNX Runtime vs PyTorch: max abs difference {(onnx_logits - torch_logits).abs().max():.2e}")

    # 2. with a KV cache, for generation
    cached = small.export_onnx(out / "model_cached.onnx", cache=True)
    session = graphprune.OnnxSession.open(cached)
    t0 = time.perf_counter()
    tokens = graphprune.generate(session, ids[:1], max_new_tokens=args.new_tokens)
    seconds = time.perf_counter() - t0
    print(f"generated {args.new_tokens} tokens in {seconds:.2f}s: {tokenizer.decode(tokens[0])!r}")


if __name__ == "__main__":
    main()
