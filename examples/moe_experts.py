"""Mixture of experts: remove whole experts (with their router rows) as well as heads and channels.

Run it:  python examples/moe_experts.py [--model PATH] [--ratio 0.3] [--out out/moe]
(default model: a small random-weight Mixtral built from its config, so nothing is downloaded; any
local Hugging Face MoE folder works, e.g. an OLMoE or Qwen3-MoE checkpoint.)
"""
from __future__ import annotations

import argparse

import torch
import transformers

import graphprune


def small_mixtral() -> transformers.MixtralForCausalLM:
    """Four experts per layer, two chosen per token; transformers' default experts kernel."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=256)
    return transformers.MixtralForCausalLM(config).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local Hugging Face MoE folder (default: a small random Mixtral)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", default="out/moe")
    args = parser.parse_args(argv)

    model = (transformers.AutoModelForCausalLM.from_pretrained(args.model).eval() if args.model else small_mixtral())
    dg = graphprune.analyze(model)
    experts = [g for g in dg.groups if g.kind == "experts"]
    if not experts:
        raise SystemExit(f"no whole experts found in {type(model).__name__}; `graphprune inspect` says what froze them")
    g = experts[0]
    print(f"{len(experts)} expert groups, e.g. {g.name}: {g.size} experts, at least {g.min_units} stay "
          f"(members: {', '.join(m.param for m in g.members)})")

    small = graphprune.compile(model, args.ratio, kinds=("heads", "channels", "experts"), progress=False)
    print(small.report)
    print(graphprune.verify(small))  # pruned graph == dense graph with the removed experts never chosen

    folder = small.save(args.out)
    reloaded = graphprune.load_hf(folder)  # plain from_pretrained too, when every layer kept as many experts
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (reloaded(input_ids=ids).logits - small(input_ids=ids, use_cache=False).logits).abs().max()
    counts = {k: kept for k, (kept, _) in small.plan.kept_widths().items() if k.endswith(":experts")}
    print(f"experts kept per layer: {counts}")
    print(f"saved to {folder}; reloaded checkpoint vs pruned graph: max abs difference {float(difference):.2e}")


if __name__ == "__main__":
    main()
