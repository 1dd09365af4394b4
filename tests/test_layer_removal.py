"""Whole-block removal: attention / MLP sub-blocks and full layers go, the residual passes through.

Pruned == masked and parameter count == plan, on a representative subset by default and on the
whole zoo under ``-m slow``; the removed block's nodes and weights are really gone.
"""
from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, analysed, fresh_inputs, outputs

import graphprune
from graphprune.analysis.groups import BLOCK_KINDS
from graphprune.plan import PlanGroup, PruningPlan, fill_counts

DEFAULT_SUBSET = ["llama_gqa", "gpt2", "mixtral", "qwen2_moe", "opt", "falcon"]


def _plan(dg, keep: dict[str, list[int]]) -> PruningPlan:
    groups = [PlanGroup(name, dg.group(name).kind, dg.group(name).size, sorted(k)) for name, k in keep.items()]
    plan = PruningPlan(fingerprint=dg.fingerprint(), groups=groups)
    fill_counts(plan, dg)
    return plan


def _check(name, plan, seed=0):
    _, traced, dg = analysed(name)
    pruned = graphprune.rewrite(dg, plan.leaf_keep(dg))
    masked = graphprune.insert_masks(dg, [dg.group(g.name) for g in plan.groups])
    masked.set_keep({g.name: g.keep for g in plan.groups})
    for batch, seq in [(2, 5), (3, 8)]:
        kwargs = fresh_inputs(name, traced, batch, seq, seed)
        with torch.no_grad():
            for a, b in zip(outputs(pruned(**kwargs)), outputs(masked(**kwargs))):
                assert a.shape == b.shape
                assert (a - b).abs().max() / b.abs().max().clamp_min(1e-6) <= 1e-5, name
    n = sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values())
    assert n == plan.params_after, (name, n, plan.params_after)
    return pruned


def _block_cases(name):
    _, _, dg = analysed(name)
    blocks = [g for g in dg.groups if g.kind in BLOCK_KINDS]
    assert blocks or name in ("tiny_mlp_lm",), f"{name}: no block group found"
    return dg, blocks


def _removal_matrix(name):
    dg, blocks = _block_cases(name)
    for g in blocks:  # each block kind alone: remove the first block
        _check(name, _plan(dg, {g.name: list(range(1, g.size))}))
    # blocks together with channel, head and hidden pruning (random, seeded)
    gen = torch.Generator().manual_seed(1)
    keep = {}
    for g in dg.groups:
        if g.kind in ("heads", "channels", "hidden", "attn_block"):
            k = (torch.rand(g.size, generator=gen) < 0.6).nonzero().flatten().tolist()
            keep[g.name] = k or [0]
    _check(name, _plan(dg, keep), seed=1)


@pytest.mark.parametrize("name", DEFAULT_SUBSET)
def test_block_removal_pruned_equals_masked(name):
    _removal_matrix(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ARCHS) - set(DEFAULT_SUBSET)))
def test_block_removal_pruned_equals_masked_whole_zoo(name):
    _removal_matrix(name)


def test_removed_block_leaves_no_node_or_weight():
    _, _, dg = analysed("llama_gqa")
    layer = next(g for g in dg.groups if g.kind == "layer")
    pruned = _check("llama_gqa", _plan(dg, {layer.name: [1]}))
    names = set(dict(pruned.named_parameters()))
    assert not any(n.startswith("model.layers.0.") for n in names), "layer 0's weights (norms included) must go"
    assert any(n.startswith("model.layers.1.") for n in names)
    linears = [n for n in pruned.graph.nodes if n.target == torch.ops.aten.linear.default]
    dense = [n for n in dg.gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == len(dense) - 7  # q, k, v, o, gate, up, down of layer 0


def test_block_groups_are_found_from_the_graph():
    _, _, dg = analysed("llama_gqa")
    attn = next(g for g in dg.groups if g.kind == "attn_block")
    mlp = next(g for g in dg.groups if g.kind == "mlp_block")
    assert attn.size == mlp.size == 2
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert attn.units == [[h.axis] for h in heads]
    o_proj = next(m for m in attn.members if m.param == "model.layers.1.self_attn.o_proj.weight")
    assert o_proj.dim == 1 and set(o_proj.coords.tolist()) == {1}
    # BLOOM's heads are frozen (ALiBi), so it has no attention block, only MLP blocks
    _, _, bloom = analysed("bloom")
    assert {g.kind for g in bloom.groups} & set(BLOCK_KINDS) == {"mlp_block", "layer"}


def test_compile_removes_layers_at_a_ratio():
    model, traced, _ = analysed("llama_gqa")
    small = graphprune.compile(model, ratio=0.4, kinds=("layer",), example_kwargs=traced.example_kwargs, progress=False)
    (g,) = small.plan.groups
    assert g.kind == "layer" and len(g.keep) == 1  # one of two layers: ~50% of the block params
    assert graphprune.verify(small).ok
    assert small.num_parameters() == small.plan.params_after
