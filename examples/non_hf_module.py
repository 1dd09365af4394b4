"""Pruning a plain ``nn.Module`` (no Hugging Face): give graphprune an example input, that is all.

The model below is a small pre-norm transformer written by hand: fused QKV projection split with
``chunk``, multi-head attention through ``scaled_dot_product_attention``, a GELU MLP. graphprune
finds its heads and MLP channels from the traced graph, prunes them, and the result is checked
against the masked dense model.

Run it:  python examples/non_hf_module.py [--ratio 0.4]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 48, heads: int = 4, hidden: int = 128, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 100, (2, 16))  # batch >= 2 so that batch and sequence stay dynamic
    print(graphprune.analyze(model, example_inputs=(ids,)).summary())

    small = graphprune.compile(model, ratio=args.ratio, example_inputs=(ids,), progress=False)
    print(small.report)
    print(graphprune.verify(small))

    longer = torch.randint(0, 100, (3, 40))  # another batch size and length
    with torch.no_grad():
        print("output shape:", tuple(small(input_ids=longer).shape))
    with tempfile.TemporaryDirectory() as tmp:
        small.save(tmp)  # no transformers checkpoint for a plain module: model.pt2 + plan.json
        again = graphprune.load(tmp)
        with torch.no_grad():
            same = torch.equal(again(input_ids=longer), small(input_ids=longer))
        print("reloaded, identical outputs:", same)


if __name__ == "__main__":
    main()
