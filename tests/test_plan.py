"""Plans: ratios, allocation, rounding, protection, JSON, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import analysed

import graphprune
from graphprune.plan import PruningPlan, make_plan


@pytest.fixture(scope="module")
def medium():
    """A Llama-shaped model wide enough for ratios to be met closely (8 KV heads, 344 channels)."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    dg = graphprune.analyze(model)
    return model, dg, graphprune.score(dg, "magnitude")


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_achieved_ratio_within_two_points(medium, ratio, allocation):
    _, dg, scores = medium
    plan = graphprune.make_plan(dg, scores, ratio, allocation=allocation)
    assert abs(plan.achieved_ratio - ratio) <= 0.02, plan.achieved_ratio
    assert plan.params_after < plan.params_before


def test_global_allocation_lets_layers_differ(medium):
    _, dg, scores = medium
    scores = dict(scores)
    # make layer 0's MLP channels clearly more important than the others
    scores["model.layers.0.mlp:channels"] = scores["model.layers.0.mlp:channels"] * 100
    plan = graphprune.make_plan(dg, scores, 0.5, allocation="global")
    widths = {g.name: len(g.keep) for g in plan.groups if g.kind == "channels"}
    assert widths["model.layers.0.mlp:channels"] > widths["model.layers.1.mlp:channels"]


def test_round_to_keeps_multiples(medium):
    _, dg, scores = medium
    plan = graphprune.make_plan(dg, scores, 0.3, round_to=16)
    assert all(len(g.keep) % 16 == 0 for g in plan.groups if g.kind == "channels")


def test_round_to_per_kind(medium):
    _, dg, scores = medium
    plan = graphprune.make_plan(dg, scores, 0.4, round_to={"channels": 32, "heads": 2})
    widths = [len(g.keep) for g in plan.groups if g.kind == "heads"]
    assert all(len(g.keep) % 32 == 0 for g in plan.groups if g.kind == "channels")
    assert all(len(g.keep) % 2 == 0 for g in plan.groups if g.kind == "heads"), widths
    assert abs(plan.achieved_ratio - 0.4) <= 0.05


@pytest.mark.parametrize("bad, match", [(0, "positive"), ({"channels": 0}, "positive"), ({"rows": 8}, "unknown kinds")])
def test_bad_round_to_raises(medium, bad, match):
    _, dg, scores = medium
    with pytest.raises(graphprune.PlanError, match=match):
        graphprune.make_plan(dg, scores, 0.3, round_to=bad)


def test_ignore_protects_modules(medium):
    _, dg, scores = medium
    plan = graphprune.make_plan(dg, scores, 0.3, ignore=["model.layers.0.*"])
    assert not [g for g in plan.groups if g.name.startswith("model.layers.0.")]


def test_end_block_patterns_name_the_first_and_last_blocks(medium):
    _, dg, _ = medium
    from graphprune.analysis.groups import end_block_patterns

    assert end_block_patterns(dg.groups, 1, 1) == ["model.layers.0.*", "model.layers.3.*"]
    assert end_block_patterns(dg.groups, 0, 2) == ["model.layers.2.*", "model.layers.3.*"]
    assert end_block_patterns(dg.groups, 0, 0) == []
    assert len(end_block_patterns(dg.groups, 9, 9)) == 4  # more than there are: every block, once


def test_protect_layers_leaves_the_end_blocks_whole_and_still_meets_the_ratio(medium):
    model, _, _ = medium
    small = graphprune.compile(model, 0.3, protect_layers=(1, 1), progress=False)
    pruned_blocks = {g.name.split(":")[0].rsplit(".", 1)[0] for g in small.plan.groups if len(g.keep) < g.size}
    assert pruned_blocks and pruned_blocks <= {"model.layers.1", "model.layers.2"}, pruned_blocks
    assert abs(small.report.achieved_ratio - 0.3) <= 0.02


def test_protecting_every_block_is_a_clear_error(medium):
    model, _, _ = medium
    with pytest.raises(graphprune.PlanError, match="nothing left to prune"):
        graphprune.compile(model, 0.3, method="taylor", calib=torch.randint(0, 128, (2, 16)), protect_layers=(2, 2), progress=False)


@pytest.mark.parametrize("bad", [(-1, 0), (1,), "4,2", (True, 0), (1.5, 2), None])
def test_bad_protect_layers_raise(medium, bad):
    model, _, _ = medium
    with pytest.raises(graphprune.GraphpruneError, match="protect_layers"):
        graphprune.compile(model, 0.3, protect_layers=bad, progress=False)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_ratios_raise(medium, bad):
    model, dg, scores = medium
    with pytest.raises(graphprune.PlanError, match="ratio"):
        graphprune.make_plan(dg, scores, bad)
    with pytest.raises(graphprune.PlanError, match="ratio"):
        graphprune.compile(model, ratio=bad, progress=False)


def test_plan_json_round_trip_and_replay(medium, tmp_path):
    model, dg, scores = medium
    plan = graphprune.make_plan(dg, scores, 0.5, method="magnitude")
    plan.save(tmp_path / "plan.json")
    again = PruningPlan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    replayed = graphprune.compile(model, plan=again, progress=False)
    direct = graphprune.compile(model, ratio=0.5, progress=False)
    x = torch.randint(0, 128, (2, 6))
    assert torch.equal(replayed(input_ids=x, use_cache=False).logits, direct(input_ids=x, use_cache=False).logits)


def test_plan_for_another_model_is_rejected(medium):
    _, dg, scores = medium
    plan = graphprune.make_plan(dg, scores, 0.5)
    _, _, other = analysed("llama_gqa")
    with pytest.raises(graphprune.PlanError, match="another model"):
        plan.leaf_keep(other)


def test_invalid_plans_raise(medium):
    _, dg, scores = medium
    plan = graphprune.make_plan(dg, scores, 0.5)
    plan.groups[0].keep = [0, 0]
    with pytest.raises(graphprune.PlanError, match="invalid kept indices"):
        plan.leaf_keep(dg)
    plan.groups[0].keep = []
    with pytest.raises(graphprune.PlanError, match="keeps no unit"):
        plan.leaf_keep(dg)


def test_corrupt_and_newer_plan_files(tmp_path, medium):
    _, dg, scores = medium
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(graphprune.LoadError, match="corrupt"):
        PruningPlan.load(tmp_path / "a.json")
    data = graphprune.make_plan(dg, scores, 0.5).to_dict()
    data["version"] = 99
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(graphprune.LoadError, match="newer"):
        PruningPlan.load(tmp_path / "b.json")
    with pytest.raises(graphprune.LoadError, match="no plan"):
        PruningPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_uniform_allocation_hits_the_target_with_few_kv_heads(ratio):
    # 2 KV heads per layer: heads alone move the ratio in 50% steps; channels must take up the rest
    _, _, dg = analysed("llama_gqa")
    assert min(g.size for g in dg.groups if g.kind == "heads") <= 2
    plan = make_plan(dg, graphprune.score(dg, "magnitude"), ratio)
    assert abs(plan.achieved_ratio - ratio) < 0.005
    widths = {len(g.keep) for g in plan.groups if g.kind == "channels"}
    assert len(widths) == 1  # still uniform across layers
