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


def test_deferred_weight_is_computed_when_read_and_checked():
    _, _, dg = analysed("llama_gqa")
    ctx = graphprune.ScoringContext(dg, dg.groups)
    name = next(n for n in dg.params if n.endswith("down_proj.weight"))
    calls = []

    def doubled():
        calls.append(1)
        return ctx.dg.gm.get_parameter(name) * 2

    ctx.update_weight(name, doubled)
    assert calls == []  # nothing computed until the weight is read
    scores = graphprune.Scores({}, ctx.weights)
    assert torch.equal(scores.weights[name], 2 * dg.gm.get_parameter(name))
    assert len(calls) == 1 and list(scores.weights) == [name]
    ctx.update_weight(name, lambda: torch.zeros(3))  # a wrong shape is caught when it is read
    with pytest.raises(graphprune.GraphpruneError, match="shape"):
        ctx.weights[name]


def test_masked_copy_shares_the_weights_read_only():
    _, _, dg = analysed("llama_gqa")
    masked = graphprune.insert_masks(dg)
    name = next(n for n in dg.params if n.endswith("down_proj.weight"))
    theirs, mine = dg.gm.get_parameter(name), masked.module.get_parameter(name)
    assert mine.data_ptr() == theirs.data_ptr() and not mine.requires_grad
    new = torch.ones_like(theirs)
    other = graphprune.insert_masks(dg, weights={name: new})  # given weights are the copy's own
    assert torch.equal(other.module.get_parameter(name), new)
    assert not torch.equal(dg.gm.get_parameter(name), new)
