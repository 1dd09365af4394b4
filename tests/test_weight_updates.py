"""A pass may hand new dense weights to the rewrite (merged LoRA, merged HSMs)."""
from dataclasses import dataclass

import pytest
import torch
from conftest import analysed

import graphprune
from graphprune.registry import PASSES


@pytest.fixture()
def doubling_pass():
    @graphprune.register_pass("test_double_down")
    class DoubleDown(graphprune.ScoringPass):
        """Magnitude scores, and every MLP down-projection weight doubled."""

        @dataclass(frozen=True)
        class Config:
            factor: float = 2.0

        def score(self, ctx):
            for name in ctx.dg.params:
                if name.endswith("down_proj.weight"):
                    ctx.update_weight(name, ctx.param(name) * self.config.factor)
            return {g.name: ctx.unit_reduce(g, lambda w, d: w.abs()) for g in ctx.groups}

    yield "test_double_down"
    PASSES.pop("test_double_down")


def test_updated_weights_reach_the_pruned_graph_and_verify(doubling_pass):
    model, _, _ = analysed("llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = graphprune.compile(model, ratio=0.5, method=doubling_pass, progress=False)
    plain = graphprune.compile(model, ratio=0.5, plan=small.plan, progress=False)
    name = next(n for n in small.weights if n.endswith("down_proj.weight"))
    assert torch.allclose(graphprune.analysis.walk.fetch_attr(small.module, name), 2 * graphprune.analysis.walk.fetch_attr(plain.module, name))
    assert graphprune.verify(small).ok  # against the dense graph with the updated weights
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller untouched


def test_update_weight_checks_name_and_shape():
    _, _, dg = analysed("llama_gqa")
    ctx = graphprune.ScoringContext(dg, dg.groups)
    name = next(iter(dg.params))
    with pytest.raises(graphprune.GraphpruneError, match="shape"):
        ctx.update_weight(name, torch.zeros(1))
    with pytest.raises(graphprune.GraphpruneError, match="not a parameter"):
        ctx.update_weight("nope.weight", torch.zeros(1))
