"""Module-level application of a plan: a sliced copy of the original module equals the pruned graph."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import analysed, fresh_inputs, outputs

import graphprune
from graphprune.module_apply import ModuleApplyError, apply_plan_to_module, graph_weights
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
    ("gpt2", ("hidden",), "differs from the pruned graph"),  # LayerNorm's mean over the kept channels
    ("fused_qkv_attn", ("heads",), "cannot run at module level"),  # reshapes by a stored width
    ("llama_gqa", ("head_dim",), "own head sizes"),  # q/k keep 8 channels (rotary pairs), v 9: one head_dim attribute
])
def test_refuses_clearly_where_code_does_not_follow_weights(arch, kinds, why):
    model, traced, dg = analysed(arch)
    plan = random_plan(dg, kinds, seed=1, keep_fraction=0.6)
    with pytest.raises(ModuleApplyError, match=why) as info:
        apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs)
    assert "graph" in str(info.value)  # says what to do instead
    assert isinstance(info.value, graphprune.GraphpruneError)


def test_an_odd_width_under_a_complex_view_is_refused_with_the_fix_named():
    """DeepSeek-V2 views its rotary key, a slice of a projection, as complex numbers: with an odd kept
    latent width that slice's stride is odd and its code cannot run (the graph copies the slice)."""
    model = analysed("deepseek_v2")[0]
    small = graphprune.compile(model, 0.3, progress=False)
    assert any(len(g.keep) % 2 for g in small.plan.groups if g.name.endswith("self_attn:channels#2"))
    with pytest.raises(ModuleApplyError, match="complex numbers.*round_to=2"):
        apply_plan_to_module(model, small)
    even = graphprune.compile(model, 0.3, round_to=2, progress=False)
    assert graphprune.verify(even).ok
    apply_plan_to_module(model, even)  # checked equal to the graph


@pytest.mark.parametrize("arch, kinds", [
    ("llama_gqa", ("hidden",)),  # RMSNorms over the pruned residual stream
    ("gemma", ("hidden",)),  # (1 + w) RMSNorms
    ("olmo2", ("heads",)),  # q_norm / k_norm over the whole projection width
])
def test_rms_norms_over_pruned_channels_keep_the_graphs_divisor(arch, kinds):
    model, traced, dg = analysed(arch)
    plan = random_plan(dg, kinds, seed=2)
    small = apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs)  # checked
    dense = dict(model.named_modules())
    eps = "eps" if arch == "gemma" else "variance_epsilon"
    norms = [name for name, m in small.named_modules() if isinstance(getattr(m, eps, None), float)]
    rescaled = [name for name in norms if small.get_submodule(name).weight.shape != dense[name].weight.shape]
    assert rescaled
    for name in norms:  # eps * n / n': the sum of squares is divided by the kept width, eps follows
        n, kept = dense[name].weight.shape[0], small.get_submodule(name).weight.shape[0]
        assert getattr(small.get_submodule(name), eps) == pytest.approx(getattr(dense[name], eps) * n / kept)
    assert {getattr(dense[name], eps) for name in norms} == {model.config.rms_norm_eps}, "the caller's model is untouched"
    # fine-tuning copies module-level weights back into the graph: the rescaling is undone there
    graph = graphprune.rewrite(dg, plan.leaf_keep(dg))
    back = graph_weights(small, {n: p.detach() for n, p in small.named_parameters()})
    for name in rescaled:
        assert not torch.allclose(small.get_submodule(name).weight, graph.get_parameter(f"{name}.weight"))
    for name, tensor in back.items():
        torch.testing.assert_close(tensor, graph.get_parameter(name), rtol=1e-6, atol=1e-7)


def test_attributes_read_differently_by_different_classes_are_settled_by_the_check():
    # embed_dim is the query width GPT-BigCode splits by, and the model width CodeGen divides into chunks
    for arch, scaled in (("gpt_bigcode", True), ("codegen", False)):
        model, traced, dg = analysed(arch)
        plan = random_plan(dg, ("heads",), seed=0)
        small = apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs)
        g = plan.groups[0]
        attn = small.get_submodule(g.name.rpartition(":")[0])
        dense = model.get_submodule(g.name.rpartition(":")[0]).embed_dim
        assert attn.embed_dim == (dense * len(g.keep) // g.size if scaled else dense)


def test_per_layer_head_counts_read_from_the_config_get_a_config_view_per_layer():
    model, traced, dg = analysed("phi3")  # Phi-3 slices its fused qkv by config.num_attention_heads at run time
    plan = random_plan(dg, ("heads",), seed=0)
    plan.groups[1].keep = list(range(plan.groups[1].size))  # layer 1 keeps every head: widths differ per layer
    fill_counts(plan, dg)
    small = apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs)
    layers = small.model.layers
    assert layers[0].self_attn.config is not small.config and layers[0].self_attn.config.num_attention_heads == 2
    assert layers[1].self_attn.config.num_attention_heads == 4 == small.config.num_attention_heads
    assert model.config.num_attention_heads == 4 and model.model.layers[0].self_attn.config is model.config
    # everything else is the model's config: switching the attention kernel reaches every layer
    small.set_attn_implementation("eager")
    assert {layer.self_attn.config._attn_implementation for layer in layers} == {"eager"}
    again = copy.deepcopy(small)  # and the views survive copies (Trainer, peft)
    assert again.model.layers[0].self_attn.config._base is again.config
    assert again.model.layers[0].self_attn.config.num_attention_heads == 2


def test_misaligned_expert_widths_keep_a_batched_kernel():
    model, traced, dg = analysed("mixtral")
    plan = random_plan(dg, ("channels",), seed=0, keep_fraction=0.77)  # 36 of 48: not a multiple of 8
    assert {len(g.keep) % 8 for g in plan.groups} != {0}
    small = apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs)
    assert small.config.experts_implementation == "batched_mm" == small.config._experts_implementation
    assert "experts_implementation" in small.config.to_dict()  # goes into config.json
    assert not hasattr(model.config, "experts_implementation")


def test_needs_a_plan():
    model, _, _ = analysed("llama_gqa")
    with pytest.raises(ModuleApplyError, match="needs a CompiledModel or a plan"):
        apply_plan_to_module(model)


def test_a_module_traced_with_only_the_batch_dynamic_is_checked_on_inputs_it_accepts():
    """An MLP over [batch, features] keeps dim 1 fixed: the check must not feed it other widths."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    small = graphprune.compile(mlp, 0.3, example_inputs=(torch.randn(2, 12),), progress=False)
    assert list(small.dynamic_shapes["input"]) == [0]
    copy_ = small.to_hf()  # the module-level copy (a plain nn.Module here), checked against the graph
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), small(x))
    assert copy_[0].out_features == small.module.get_parameter("0.weight").shape[0] < 32


def test_a_config_that_refuses_a_width_gives_a_module_apply_error(monkeypatch):
    """Gemma 4's per-layer config raises its own error when asked for one global head_dim: whatever the
    model's code or config raises while the copy is built comes out as a ModuleApplyError naming it."""
    import graphprune.module_apply as module_apply

    class PerLayerOnly(Exception):
        pass

    def refuse(small, plan):
        raise PerLayerOnly("'head_dim' is a per-layer attribute")

    monkeypatch.setattr(module_apply, "_fix_config", refuse)
    model, traced, dg = analysed("llama_gqa")
    plan = random_plan(dg, ("heads",), seed=0)
    with pytest.raises(ModuleApplyError, match=r"LlamaForCausalLM's modules \(PerLayerOnly: 'head_dim' is a per-layer"):
        apply_plan_to_module(model, plan=plan, dg=dg, example_kwargs=traced.example_kwargs)
