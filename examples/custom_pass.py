"""A custom scoring pass and a custom op rule, registered by name: used from Python here, and from
the command line by loading this file as a plugin (below).

1. A scoring pass is a ``ScoringPass`` subclass with a frozen ``Config`` and one method,
   ``score(ctx) -> {group name: importance per unit}``; ``@graphprune.register_pass("name")``
   makes it ``method="name"``.
2. An op rule teaches the dependency analysis an ATen op it does not know. Here the model uses a
   custom op (``torch.library``), ``demo::squared_relu``: without a rule, graphprune cannot know
   how channels flow through it, so it would freeze them (and name the op in ``inspect`` and the
   report); with the one-line rule
   "output channels are the input channels", the MLP channels become prunable.

From the command line, load this file as a plugin::

    graphprune compile MODEL --plugin examples/custom_pass.py --method l1 --out out/l1

Run it:  python examples/custom_pass.py [--ratio 0.5]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphprune


# ---------------------------------------------------------------- 1. a scoring pass
@graphprune.register_pass("l1")
class L1(graphprune.ScoringPass):
    """Sum of |w| over the weights a unit owns; optionally divided by the group's mean, so that
    layers with larger weights do not win every unit under global allocation."""

    @dataclass(frozen=True)
    class Config:
        normalize: bool = True

    def score(self, ctx):
        scores = {}
        for group in ctx.groups:
            s = ctx.unit_reduce(group, lambda w, dim: w.abs())  # sums over each unit's weights
            scores[group.name] = s / s.mean().clamp_min(1e-12) if self.config.normalize else s
        return scores


# ---------------------------------------------------------------- 2. a new op and its rule
@torch.library.custom_op("demo::squared_relu", mutates_args=())
def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


@squared_relu.register_fake
def _(x):
    return torch.empty_like(x)


def same_channels(walk, node):
    """Propagation rule of an elementwise op: every output dimension is the input's."""
    return walk.of(node.args[0])


graphprune.register_op_rule("demo.squared_relu", same_channels)


class SquaredReluLM(nn.Module):
    """A small language model whose MLPs use the custom op (a plain nn.Module, not Hugging Face)."""

    def __init__(self, vocab: int = 96, d: int = 32, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(d, hidden), "down": nn.Linear(hidden, d)}) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block["down"](torch.ops.demo.squared_relu(block["up"](x)))
        return self.head(x)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = SquaredReluLM().eval()
    ids = torch.randint(0, 96, (2, 12))
    print("methods available:", graphprune.available_passes())
    print("groups found:", [g.name for g in graphprune.analyze(model, example_inputs=(ids,)).groups])

    small = graphprune.compile(model, ratio=args.ratio, method="l1", example_inputs=(ids,), allocation="global", progress=False)
    print(small.report)
    check = graphprune.verify(small)
    print(check)
    assert check.ok and small.report.achieved_ratio > 0, "the custom op's channels should be prunable"


if __name__ == "__main__":
    main()
