"""Whole experts of mixture-of-experts layers: found from the ops, pruned exactly, never below top-k."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import transformers
import zoo
from conftest import analysed, fresh_inputs, outputs

import graphprune
from graphprune.plan import PlanGroup, PruningPlan, fill_counts

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def experts_plan(dg, keep: dict[str, list[int]]) -> PruningPlan:
    plan = PruningPlan(fingerprint=dg.fingerprint(),
                       groups=[PlanGroup(g.name, g.kind, g.size, keep[g.name]) for g in dg.groups if g.name in keep])
    fill_counts(plan, dg)
    return plan


@pytest.mark.parametrize("name", MOE)
def test_experts_are_one_group_per_layer_with_router_and_expert_weights(name):
    model, _, dg = analysed(name)
    experts = [g for g in dg.groups if g.kind == "experts"]
    assert len(experts) == model.config.num_hidden_layers
    for g in experts:
        members = {m.param.rsplit(".", 2)[-2] + "." + m.param.rsplit(".", 1)[-1]: m.dim for m in g.members}
        assert members == {"gate.weight": 0, "experts.gate_up_proj": 0, "experts.down_proj": 0}
        assert g.size == model.config.num_experts_per_tok * 2 == 4
        assert g.min_units == model.config.num_experts_per_tok  # top-k needs k experts to choose from


@pytest.mark.parametrize("name", [*MOE, "glm4_moe", "deepseek_v3", "phimoe"])  # + sigmoid/gather, group-limited, top-2 by two max
@pytest.mark.parametrize("seed", range(3))
def test_removing_experts_equals_masking_their_router_scores(name, seed):
    _, traced, dg = analysed(name)
    gen = torch.Generator().manual_seed(seed)
    keep = {g.name: sorted(torch.randperm(g.size, generator=gen)[: g.min_units + seed % 2].tolist())
            for g in dg.groups if g.kind == "experts"}
    plan = experts_plan(dg, keep)
    pruned = graphprune.rewrite(dg, plan.leaf_keep(dg))
    masked = graphprune.insert_masks(dg, [dg.group(n) for n in keep])
    masked.set_keep(keep)
    kwargs = fresh_inputs(name, traced, 3, 7, seed)
    with torch.no_grad():
        for a, b in zip(outputs(pruned(**kwargs)), outputs(masked(**kwargs))):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after < plan.params_before


def test_top_2_chosen_by_two_max_ops_is_a_router_that_needs_two_experts():
    """PhiMoE's sparse mixer: a max over the experts, then another over the scores with the first choice
    at -inf, the two choices concatenated; inside torch.no_grad() (inlined by the trace)."""
    model, _, dg = analysed("phimoe")
    experts = [g for g in dg.groups if g.kind == "experts"]
    assert len(experts) == model.config.num_hidden_layers and not dg.walk.unsupported
    assert all(g.min_units == 2 for g in experts)  # two successive choices need two experts to choose from
    assert {m.param.rsplit(".", 2)[-2] for m in experts[0].members} == {"router", "experts"}


def test_pruned_mixtral_equals_a_smaller_mixtral_built_by_hand():
    """Independent of the masking pass: a Mixtral with 3 experts holding the kept experts' weights."""
    model, traced, dg = analysed("mixtral")
    keep = {g.name: [0, 2, 3] for g in dg.groups if g.kind == "experts"}
    pruned = graphprune.rewrite(dg, experts_plan(dg, keep).leaf_keep(dg))
    config = copy.deepcopy(model.config)
    config.num_local_experts = 3
    small = transformers.MixtralForCausalLM(config).eval()
    state = model.state_dict()
    for key in state:
        if key.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")):
            state[key] = state[key][[0, 2, 3]]
    small.load_state_dict(state)
    kwargs = fresh_inputs("mixtral", traced, 2, 6)
    with torch.no_grad():
        want = small(**zoo.call_kwargs(small, kwargs)).logits
        got = pruned(**kwargs).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, model(**zoo.call_kwargs(model, kwargs)).logits, atol=1e-3)


def test_group_limited_routing_prunes_whole_groups_of_experts():
    """DeepSeek-V3 routes to the best ``topk_group`` of ``n_group`` groups first: a unit is a group of
    experts (the scores are viewed as groups x experts), and at least ``topk_group`` groups stay."""
    model, _, dg = analysed("deepseek_v3")
    experts = [g for g in dg.groups if g.kind == "experts"]
    assert [(g.size, g.min_units) for g in experts] == [(4, 2)] * model.config.num_hidden_layers
    members = {m.param.rsplit(".", 2)[-2] + "." + m.param.rsplit(".", 1)[-1] for m in experts[0].members}
    assert {"gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj"} <= members


def test_plans_keep_at_least_the_routers_k_experts():
    _, _, dg = analysed("mixtral")
    scores = {g.name: torch.arange(g.size, dtype=torch.float) for g in dg.groups}
    plan = graphprune.make_plan(dg, scores, 0.6, kinds=("experts",))
    assert all(len(g.keep) == 2 for g in plan.groups)  # 4 experts, top-2: never fewer than 2
    assert plan.groups[0].keep == [2, 3]  # the highest scores
    bad = experts_plan(dg, {g.name: [1] for g in dg.groups if g.kind == "experts"})
    with pytest.raises(graphprune.PlanError, match="keeps 1 of its experts.*chooses 2"):
        bad.leaf_keep(dg)


def test_compile_prunes_experts_end_to_end_and_verifies():
    model = zoo.ALL["mixtral"]()
    before = copy.deepcopy(model.state_dict())
    small = graphprune.compile(model, 0.3, kinds=("experts", "channels"), progress=False)
    widths = small.plan.kept_widths()
    assert any(k.endswith(":experts") and kept < size for k, (kept, size) in widths.items())
    assert graphprune.verify(small, trials=2).ok
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_default_grouped_mm_kernel_traces_through_batched_mm_without_touching_the_callers_config():
    spec = {k: v for k, v in zoo._SPECS["mixtral"][2].items() if k != "experts_implementation"}
    config = transformers.MixtralConfig(**zoo._SPECIAL_TOKENS, **spec, use_cache=False)
    model = transformers.MixtralForCausalLM(config).eval()
    assert config._experts_implementation == "grouped_mm"
    before = dict(config.__dict__)
    dg = graphprune.analyze(model)
    kinds = {g.kind for g in dg.groups}
    assert {"experts", "channels", "hidden", "heads"} <= kinds  # grouped_mm is one opaque op: it froze all three
    assert dict(config.__dict__) == before


class TinyRouted(nn.Module):
    """A hand-written mixture of experts: router, top-1 choice, expert weights indexed by it."""

    def __init__(self, use_one_hot: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        self.router = nn.Linear(16, 6, bias=False)
        self.w_in = nn.Parameter(torch.randn(6, 24, 16) * 0.2)
        self.w_out = nn.Parameter(torch.randn(6, 16, 24) * 0.2)
        self.head = nn.Linear(16, 32)
        self.use_one_hot = use_one_hot

    def forward(self, ids):
        x = self.embed(ids)
        probs = self.router(x).softmax(-1)
        weight, choice = probs.topk(1, dim=-1)
        if self.use_one_hot:  # the choice used as numbers: the experts cannot be renumbered
            weight = weight * (nn.functional.one_hot(choice, 6).sum(-2) * probs).sum(-1, keepdim=True)
        h = torch.einsum("bsoi,bsi->bso", self.w_in[choice[..., 0]], x).relu()
        return self.head(x + weight * torch.einsum("bsoi,bsi->bso", self.w_out[choice[..., 0]], h))


def test_a_handwritten_moe_gets_expert_groups_from_its_ops_alone():
    ids = torch.randint(0, 32, (2, 5))
    dg = graphprune.analyze(TinyRouted(), example_inputs=(ids,))
    (experts,) = [g for g in dg.groups if g.kind == "experts"]
    assert {m.param for m in experts.members} == {"router.weight", "w_in", "w_out"}
    assert experts.min_units == 1


def test_routing_choices_used_as_numbers_freeze_the_experts():
    ids = torch.randint(0, 32, (2, 5))
    dg = graphprune.analyze(TinyRouted(use_one_hot=True), example_inputs=(ids,))
    assert not [g for g in dg.groups if g.kind == "experts"]
    assert any("router.weight" in what for what, _ in dg.frozen_report())


def test_uniformly_pruned_experts_save_a_checkpoint_plain_from_pretrained_loads(tmp_path):
    model = zoo.ALL["mixtral"]()
    small = graphprune.compile(model, 0.3, kinds=("experts", "heads"), progress=False)
    assert {w for k, w in small.plan.kept_widths().items() if k.endswith(":experts")} == {(3, 4)}
    small.save(tmp_path / "out")
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_local_experts == 3 and loaded.num_experts == 3
    assert model.config.num_local_experts == 4  # the caller's model keeps its experts
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, small(input_ids=ids, use_cache=False).logits, atol=1e-5)


def test_bernoulli_masks_keep_the_routers_k_experts_in_every_sample():
    """A sample with no expert left would make the router's softmax nan and the search with it."""
    from graphprune.passes.bernoulli import at_least

    s = torch.tensor([0.1, 0.6, 0.3, 0.2])
    assert at_least(torch.zeros(4), s, 2).tolist() == [0, 1, 1, 0]
    assert at_least(torch.tensor([1.0, 0, 0, 0]), s, 2).tolist() == [1, 1, 0, 0]
    calib = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    small = graphprune.compile(zoo.ALL["qwen3_moe"](), 0.3, method="bernoulli", kinds=("experts",), calib=calib,
                               progress=False, steps=20)
    assert all(kept >= 2 for kept, _ in small.plan.kept_widths().values())
    assert graphprune.verify(small, trials=1).ok


def test_experts_pruned_graph_runs_in_onnx_runtime(tmp_path):
    from graphprune.runtime import OnnxSession

    small = graphprune.compile(zoo.ALL["qwen2_moe"](), 0.3, kinds=("experts", "channels"), progress=False)
    small.export_onnx(tmp_path / "small.onnx", progress=False)
    session = OnnxSession.open(tmp_path / "small.onnx")
    for batch, seq in ((3, 9), (1, 4)):
        ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seq))
        got = torch.from_numpy(next(iter(session(input_ids=ids.numpy()).values())))
        assert torch.allclose(got, small(input_ids=ids, use_cache=False).logits, atol=1e-4)


def test_command_line_prunes_experts_of_a_default_kernel_mixtral_folder(tmp_path, capsys):
    """A Mixtral saved as users have it (grouped_mm kernel): inspect shows the experts and their
    floor; compile --kinds experts writes a checkpoint whose config has fewer experts."""
    import json

    from graphprune import cli

    spec = {k: v for k, v in zoo._SPECS["mixtral"][2].items() if k != "experts_implementation"}
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**zoo._SPECIAL_TOKENS, **spec)).save_pretrained(tmp_path / "moe")
    assert cli.main(["inspect", str(tmp_path / "moe"), "--json", "-q"]) == 0
    groups = {g["name"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert groups["model.layers.0.mlp:experts"]["min_units"] == 2
    assert cli.main(["compile", str(tmp_path / "moe"), "--ratio", "0.3", "--kinds", "experts", "--out", str(tmp_path / "small"), "-q"]) == 0
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    assert 2 <= config["num_local_experts"] < 4  # fewer experts, never fewer than top-k


# ---------------------------------------------------------------- review findings, as regressions
class Routed(nn.Module):
    """Router + top-2 + expert weights indexed by the choice, with one extra use of the routing to test."""

    def __init__(self, extra: str):
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(8, 4, bias=False)
        self.w = nn.Parameter(torch.randn(4, 8, 8) * 0.3)
        self.out = nn.Linear(8, 8)
        self.register_buffer("first", torch.zeros(1, dtype=torch.long))
        self.extra = extra

    def forward(self, x):
        logits = self.router(x)
        if self.extra == "smallest":  # nearest-centroid style: a removed expert would be the smallest
            weights, choice = logits.topk(2, -1, largest=False)
            weights = weights.softmax(-1)
        else:
            weights, choice = logits.softmax(-1).topk(2, -1)
        h = (torch.matmul(x[:, None, None, :], self.w[choice]).squeeze(2) * weights[..., None]).sum(1)
        y = self.out(h)
        if self.extra == "choice as number":  # the first choice compared with 0 (index_select'ed first)
            y = y + (choice.index_select(1, self.first) == 0).float()
        if self.extra == "logits reduced":  # a z-loss-like term: the router's logits used as values
            y = y + logits.pow(2).sum(-1, keepdim=True)
        return y


def pruned_vs_masked(dg, keep: dict[str, list[int]], inputs: dict) -> float:
    plan = experts_plan(dg, keep)
    pruned = graphprune.rewrite(dg, plan.leaf_keep(dg))
    masked = graphprune.insert_masks(dg, [dg.group(n) for n in keep])
    masked.set_keep(keep)
    with torch.no_grad():
        a, b = pruned(**inputs), masked(**inputs)
    return float((a - b).abs().max())


@pytest.mark.parametrize("extra", ["choice as number", "smallest"])
def test_routing_that_renumbering_would_change_freezes_the_experts(extra):
    x = torch.randn(6, 8)
    dg = graphprune.analyze(Routed(extra), example_inputs=(x,))
    assert not [g for g in dg.groups if g.kind == "experts"]


def test_router_logits_used_as_values_are_masked_there_too():
    x = torch.randn(6, 8)
    dg = graphprune.analyze(Routed("logits reduced"), example_inputs=(x,))
    (g,) = [g for g in dg.groups if g.kind == "experts"]
    assert pruned_vs_masked(dg, {g.name: [1, 2, 3]}, {"x": x}) < 1e-5


def test_a_top_k_floor_spreads_over_groups_of_experts():
    """16 experts in 4 groups, the best 2 groups searched, top-4: 2 groups must stay, not all 4."""
    model_cls, spec = transformers.DeepseekV3ForCausalLM, dict(zoo._SPECS["deepseek_v3"][2])
    spec.update(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    torch.manual_seed(0)
    model = model_cls(transformers.DeepseekV3Config(**zoo._SPECIAL_TOKENS, **spec, use_cache=False)).eval()
    dg = graphprune.analyze(model)
    experts = [g for g in dg.groups if g.kind == "experts"]
    assert [(g.size, g.min_units) for g in experts] == [(4, 2)] * 2
    ids = {"input_ids": torch.randint(3, 128, (2, 9)), "use_cache": False}
    keep = {g.name: [0, 2] for g in experts}
    plan = experts_plan(dg, keep)
    pruned = graphprune.rewrite(dg, plan.leaf_keep(dg))
    masked = graphprune.insert_masks(dg, experts)
    masked.set_keep(keep)
    with torch.no_grad():
        assert torch.allclose(pruned(**ids).logits, masked(**ids).logits, atol=1e-5)
    compiled = graphprune.compile(model, plan=plan, progress=False)
    hf = compiled.to_hf()
    assert hf.config.n_routed_experts == 8 and hf.config.n_group == 2  # scaled once (num_local_experts is an alias)


def test_kv_cache_export_of_a_default_kernel_moe_keeps_the_plans_groups():
    from graphprune.kvcache import cached_graph

    spec = {k: v for k, v in zoo._SPECS["mixtral"][2].items() if k != "experts_implementation"}
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**zoo._SPECIAL_TOKENS, **spec)).eval()
    small = graphprune.compile(model, 0.3, kinds=("experts", "channels"), progress=False)
    cached_graph(small)  # traced through the same kernel as the plain graph, so the plan's groups exist
    assert model.config._experts_implementation == "grouped_mm"


def test_tracing_kernel_is_restored_on_every_submodel_of_a_multimodal_moe():
    """Qwen3-VL-MoE's top config has no vocab_size: its setting was left at batched_mm before."""
    from graphprune.trace import traceable_experts

    config = transformers.Qwen3VLMoeConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32))
    model = transformers.Qwen3VLMoeForConditionalGeneration(config)

    def kernels():
        return [m.config._experts_implementation for m in model.modules() if isinstance(m, transformers.PreTrainedModel)]

    before = kernels()
    with traceable_experts(model):
        assert set(kernels()) == {"batched_mm"}
    assert kernels() == before and "batched_mm" not in before
