"""Bernoulli policy-gradient masks: finds planted useless units, forward passes only, exact budget."""
from __future__ import annotations

import pytest
import torch
from conftest import analysed

import graphprune
from graphprune.passes.bernoulli import Bernoulli, project_to_budget
from graphprune.plan import make_plan

HIDDEN = 16
USELESS = {0: list(range(0, HIDDEN, 4)), 1: list(range(1, HIDDEN, 4))}  # a quarter of each layer's channels


def planted_model():
    """TinyMLPLM whose planted channels write nothing (zero input rows); the others are made strong."""
    import zoo

    torch.manual_seed(0)
    model = zoo.TinyMLPLM(hidden=HIDDEN).eval()
    with torch.no_grad():
        for layer, idx in USELESS.items():
            block = model.blocks[layer]
            block.up.weight.mul_(3)
            block.down.weight.mul_(4)
            block.up.weight[idx] = 0
            block.up.bias[idx] = 0
            block.down.weight[:, idx] = 0  # (same function; lets a weight metric see them too)
    return model


def _ids():
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))


def _target_ratio(model, ids):
    """A ratio that removes exactly the planted number of channels (uniform plan's achieved ratio)."""
    dg = graphprune.analyze(graphprune.trace(model, example_kwargs={"input_ids": ids[:2]}))
    flat = {g.name: torch.ones(g.size) for g in dg.groups if g.kind == "channels"}
    return make_plan(dg, flat, 0.25, kinds=("channels",)).achieved_ratio


def test_policy_gradient_finds_the_planted_units(one_thread):
    model, ids = planted_model(), _ids()
    ratio = _target_ratio(model, ids)
    records = []
    small = graphprune.compile(
        model, ratio=ratio, method="bernoulli", kinds=("channels",), calib=ids, example_kwargs={"input_ids": ids[:2]},
        init=None, objective="kl", samples=8, steps=600, lr=10.0, seed=1, on_done=records.append, progress=False,
    )
    (record,) = records
    assert record.budget == {"channels": [2 * HIDDEN - 8, 2 * HIDDEN]}
    assert not record.grad_enabled
    for g in small.plan.groups:
        layer = int(g.name.split(".")[1].split(":")[0])
        assert not set(USELESS[layer]) & set(g.keep), f"{g.name} kept planted useless channels"
    # the learned hard mask spends exactly the budget, so the ratio is the target
    assert sum(len(g.keep) for g in small.plan.groups) == record.budget["channels"][0]
    assert small.plan.achieved_ratio == pytest.approx(ratio)
    assert record.losses[-1] < record.losses[0]
    assert graphprune.verify(small).ok
    assert small.report.scoring["bernoulli"]["forwards"] == 4800


def test_initialisation_from_a_scoring_pass(one_thread):
    """With no steps the mask is the initial one: magnitude already sees the zeroed channels."""
    model, ids = planted_model(), _ids()
    small = graphprune.compile(model, ratio=_target_ratio(model, ids), method="bernoulli", kinds=("channels",), calib=ids,
                               example_kwargs={"input_ids": ids[:2]}, init="magnitude", steps=0, progress=False)
    for g in small.plan.groups:
        layer = int(g.name.split(".")[1].split(":")[0])
        assert not set(USELESS[layer]) & set(g.keep)
    with pytest.raises(graphprune.GraphpruneError, match="unknown scoring method"):
        graphprune.compile(model, ratio=0.2, method="bernoulli", calib=ids, init="nope", progress=False,
                           example_kwargs={"input_ids": ids[:2]})


def test_search_is_forward_only_and_leaves_the_model_alone(one_thread):
    model, traced, _ = analysed("llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    records = []
    small = graphprune.compile(model, ratio=0.3, method="bernoulli", calib=ids, example_kwargs=traced.example_kwargs,
                               steps=4, on_done=records.append, progress=False)
    assert not records[0].grad_enabled  # no forward pass ran with autograd on: no graph through the weights
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert small.plan.allocation == "global"
    assert graphprune.verify(small).ok


def test_whole_blocks_are_units_too(one_thread):
    model, traced, _ = analysed("llama_gqa")
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    records = []
    small = graphprune.compile(model, ratio=0.4, method="bernoulli", kinds=("channels", "mlp_block"), calib=ids,
                               example_kwargs=traced.example_kwargs, steps=3, on_done=records.append, progress=False)
    assert set(records[0].budget) == {"channels", "mlp_block"}
    assert graphprune.verify(small).ok
    assert small.num_parameters() == small.plan.params_after


def test_projection_hits_the_budget_and_bounds():
    s = torch.tensor([3.0, -1.0, 0.5, 0.2, 0.9, 0.1], dtype=torch.float64)
    for k in (1.0, 2.5, 4.0):
        p = project_to_budget(s, k, 0.01, 0.99)
        assert p.sum().item() == pytest.approx(k, abs=1e-6)
        assert p.min() >= 0.01 and p.max() <= 0.99
        assert all(p[i] >= p[j] for i in range(6) for j in range(6) if s[i] >= s[j])  # order kept (ties at bounds)


def test_bad_options_fail_clearly():
    with pytest.raises(graphprune.GraphpruneError, match="gradient"):
        Bernoulli(gradient="nope")
    with pytest.raises(graphprune.GraphpruneError, match="samples"):
        Bernoulli(samples=1)



def test_mask_samples_follow_compiles_seed_unless_the_pass_has_its_own(one_thread):
    """compile(seed=...) governs every random choice of a run (the quality benchmark's seeds rely on it)."""
    model, ids = planted_model(), _ids()

    def losses(seed, own_seed=None):
        records = []
        method = Bernoulli(init=None, steps=3, seed=own_seed, on_done=records.append)
        graphprune.compile(model, ratio=0.2, method=method, kinds=("channels",), calib=ids, seed=seed,
                           example_kwargs={"input_ids": ids[:2]}, progress=False)
        return records[0].losses

    assert losses(0) == losses(0)
    assert losses(0) != losses(1)
    assert losses(1, own_seed=0) == losses(0)  # the same token ids: only the mask samples differ
