"""Module-level application of a plan: a sliced copy of the original module equals the pruned graph."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import analysed, fresh_inputs, outputs

import graphprune
from graphprune.module_apply import ModuleApplyError, apply_plan_to_module
from graphprune.plan import PlanGroup, PruningPlan, fill_counts


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


def random_plan(dg, kinds, seed: int, keep_fraction: float = 0.5) -> PruningPlan:
    """Random kept units per group (same count in every group of a kind, so the config can follow)."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in dg.groups:
        if g.kind not in kinds:
            continue
        n = max(1, int(g.size * keep_fraction))
        keep = sorted(torch.randperm(g.size, generator=gen)[:n].tolist())
        groups.append(PlanGroup(g.name, g.kind, g.size, keep, [[m.param, m.dim] for m in g.members]))
    plan = PruningPlan(fingerprint=dg.fingerprint(), groups=groups)
    fill_counts(plan, dg)
    return plan


@pytest.mark.parametrize("arch, kinds", [
    ("llama_gqa", ("heads", "channels")),
    ("llama_gqa", ("query_heads",)),
    ("qwen2", ("heads", "channels")),
    ("gpt2", ("heads", "channels", "head_dim")),
    ("opt", ("heads", "channels")),
    ("tiny_mlp_lm", ("channels",)),
])
def test_module_level_equals_graph(arch, kinds):
    model, traced, dg = analysed(arch)
    before = copy.deepcopy(model.state_dict())
    plan = random_plan(dg, kinds, seed=len(arch))
    graph = graphprune.rewrite(dg, plan.leaf_keep(dg))
    small = apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs, check=False)
    small.eval()
    for seed, (batch, seq) in enumerate([(2, 5), (3, 11)]):
        kwargs = fresh_inputs(arch, traced, batch, seq, seed)
        with torch.no_grad():
            for a, b in zip(outputs(small(**kwargs)), outputs(graph(**kwargs))):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) == plan.params_after
    for module in small.modules():  # size attributes follow the sliced weights
        if isinstance(module, torch.nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
    # the caller's model is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_uniform_widths_update_the_hf_config():
    model, traced, dg = analysed("llama_gqa")
    plan = random_plan(dg, ("heads", "channels"), seed=3)
    small = apply_plan_to_module(model, plan=plan, dg=dg)
    assert small.config.intermediate_size == 48 and small.config.num_key_value_heads == 1
    assert small.config.num_attention_heads == 2  # two query heads per KV head stay with it
    assert model.config.intermediate_size == 96 and model.config.num_key_value_heads == 2
    # the config now describes the weights: a fresh model built from it has the same shapes
    rebuilt = type(model)(small.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}


def test_from_compiled_model_takes_the_graph_weights(stories_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    compiled = graphprune.compile(model, ratio=0.5, progress=False)
    small = apply_plan_to_module(model, compiled)  # checked against compiled.module
    ids = torch.tensor([[1, 403, 407, 261, 378, 432]])
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids, use_cache=False).logits, compiled(input_ids=ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)
    assert small.num_parameters() == compiled.num_parameters()


@pytest.mark.parametrize("arch, kinds, why", [
    ("llama_gqa", ("hidden",), "differs from the pruned graph"),  # RMSNorm divides by the new width
    ("fused_qkv_attn", ("heads",), "cannot run at module level"),  # reshapes by a stored width
])
def test_refuses_clearly_where_code_does_not_follow_weights(arch, kinds, why):
    model, traced, dg = analysed(arch)
    plan = random_plan(dg, kinds, seed=1)
    with pytest.raises(ModuleApplyError, match=why) as info:
        apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs)
    assert "graph" in str(info.value)  # says what to do instead
    assert isinstance(info.value, graphprune.GraphpruneError)


def test_needs_a_plan():
    model, _, _ = analysed("llama_gqa")
    with pytest.raises(ModuleApplyError, match="needs a CompiledModel or a plan"):
        apply_plan_to_module(model)
