"""The LoRA graph pass: adapters on a traced graph, frozen shared base weights, merging."""
from __future__ import annotations

import pytest
import torch
import zoo
from conftest import analysed

import graphprune
from graphprune.analysis.walk import fetch_attr
from graphprune.lora import add_lora, merged_weights
from graphprune.train import TrainConfig, causal_lm_loss, train

# branch form (aten.linear), merged form for GPT-2's addmm, Falcon's x @ W.T and stacked MoE experts
FORMS = ["llama_gqa", "gpt2", "falcon", "qwen2_moe"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


def _logits(module, kwargs):
    return zoo.output_tensor(module(**kwargs))


def _randomise_b(lora, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b_name in lora.adapters.values():
            b = fetch_attr(lora.module, b_name)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("name", FORMS)
def test_fresh_adapters_change_nothing_and_merge_exactly(name):
    _, traced, _ = analysed(name)
    kwargs = traced.example_kwargs
    lora = add_lora(traced.module, r=4, alpha=8, seed=0)
    assert lora.adapters and lora.scale == 2.0
    with torch.no_grad():
        assert torch.equal(_logits(lora, kwargs), _logits(traced.module, kwargs))  # B = 0: same function
    _randomise_b(lora)
    with torch.no_grad():
        adapted = _logits(lora, kwargs)
        merged = zoo.output_tensor(torch.func.functional_call(traced.module, merged_weights(lora), (), kwargs, strict=False))
    assert not torch.allclose(adapted, _logits(traced.module, kwargs))  # the adapters do something
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-5)  # W0 + s·B·A is what the graph computes


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_base_weights_frozen_shared_and_never_get_gradients(name):
    model, traced, _ = analysed(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(traced.module)
    adapter_names = {n for pair in lora.adapters.values() for n in pair}
    caller = dict(traced.module.named_parameters())
    for n, p in lora.module.named_parameters():
        if n in adapter_names:
            assert p.requires_grad
        else:
            assert not p.requires_grad
            assert p.data_ptr() == caller[n].data_ptr()  # shared storage: no copy of the model
    _randomise_b(lora)
    ids = traced.example_kwargs["input_ids"]
    causal_lm_loss(lora(**traced.example_kwargs), ids).backward()
    for n, p in lora.module.named_parameters():
        assert (p.grad is not None) == (n in adapter_names), n
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # caller untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_targets_select_weights_and_names_are_readable():
    _, traced, _ = analysed("llama_gqa")
    lora = add_lora(traced.module, targets=["*.q_proj", "*.down_proj.weight"], r=2)
    assert sorted(lora.adapters) == [
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight",
    ]
    a_name, b_name = lora.adapters["model.layers.0.self_attn.q_proj.weight"]
    assert (a_name, b_name) == ("model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B")
    w = fetch_attr(lora.module, "model.layers.0.self_attn.q_proj.weight")
    a, b = lora.factors("model.layers.0.self_attn.q_proj.weight")
    assert a.shape == (2, w.shape[1]) and b.shape == (w.shape[0], 2)
    default = add_lora(traced.module)
    assert all(".layers." in n for n in default.adapters)  # block weights only: no embedding / LM head
    assert len(default.adapters) == 14


def test_stacked_expert_weights_get_batched_adapters():
    _, traced, _ = analysed("qwen2_moe")
    lora = add_lora(traced.module, r=3)
    name = next(n for n in lora.adapters if n.endswith("experts.gate_up_proj"))
    w = lora.base(name)
    a, b = lora.factors(name)
    assert a.shape == (w.shape[0], 3, w.shape[2]) and b.shape == (w.shape[0], w.shape[1], 3)


def test_bad_arguments_raise_clear_errors():
    _, traced, _ = analysed("llama_gqa")
    with pytest.raises(graphprune.GraphpruneError, match="no weight"):
        add_lora(traced.module, targets=["*.nothing_here"])
    with pytest.raises(graphprune.GraphpruneError, match="rank"):
        add_lora(traced.module, r=0)
    once = add_lora(traced.module, targets=["*.q_proj"])
    with pytest.raises(graphprune.GraphpruneError, match="already exists"):
        add_lora(once.module, targets=["*.q_proj.weight"])


def test_lora_graph_fine_tunes_with_the_shared_loop():
    """What LoRA recovery does with it: train only the adapters, then fold them into the weights."""
    model, traced, _ = analysed("llama_gqa")
    lora = add_lora(traced.module, r=4, seed=0)
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    kwargs = graphprune.data.model_inputs(traced.example_kwargs, ids)

    def loss_fn(module, batch):
        return causal_lm_loss(module(**kwargs), batch)

    result = train(lora.module, [ids], loss_fn, TrainConfig(steps=8, lr=1e-2, progress=False), params=lora.lora_parameters())
    assert result.losses[-1] < result.losses[0]
    with torch.no_grad():
        folded = zoo.output_tensor(torch.func.functional_call(traced.module, merged_weights(lora), (), kwargs, strict=False))
        torch.testing.assert_close(folded, _logits(lora, kwargs), rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
