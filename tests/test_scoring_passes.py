"""Gradient-based scoring passes: Taylor (LLM-Pruner), HyWIA and LoRAPrune, and calibration plumbing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import zoo
from conftest import ARCHS, analysed, planted_mlp

import graphprune
from graphprune.analysis.walk import fetch_attr
from graphprune.lora import add_lora
from graphprune.passes import loraprune as lp_module
from graphprune.passes.hywia import fuse, fusion_weights, normalise
from graphprune.passes.loraprune import LoRAPrune, cubic_ratio, unit_importance
from graphprune.passes.taylor import aggregate
from graphprune.registry import get_pass
from graphprune.train import causal_lm_loss

FAST_LORAPRUNE = dict(steps=4, update_every=2, lr=1e-3, batch_size=2)
METHODS = {"taylor": {}, "hywia": {}, "loraprune": FAST_LORAPRUNE}
REPRESENTATIVE = ["llama_gqa", "gpt2", "qwen2_moe", "falcon", "opt"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


def calib_ids(name: str, n: int = 4, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, zoo._vocab_size(name), (n, seq), generator=torch.Generator().manual_seed(seed))


def run(name, method, ratio=0.3, **config):
    model, traced, dg = analysed(name)
    return graphprune.score(dg, method, calib=calib_ids(name), ratio=ratio, example_kwargs=traced.example_kwargs, **config)


def _check_scores(name, method, config):
    model, _, dg = analysed(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = run(name, method, **config)
    groups = graphprune.analysis.groups.select_groups(dg.groups)
    assert groups
    for g in groups:
        s = scores[g.name]
        assert s.shape == (g.size,) and torch.isfinite(s).all(), g.name
        assert s.max() > s.min(), f"{method} gives every unit of {g.name} the same score"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    return scores


# ================================================================ every pass, several families
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_scores_are_finite_and_shaped(name, method):
    _check_scores(name, method, METHODS[method])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_compiles_with_every_pass(name, method):
    """The full matrix: scores, a plan at 30%, a pruned graph equal to the masked dense one."""
    model, traced, _ = analysed(name)
    _check_scores(name, method, METHODS[method])
    small = graphprune.compile(model, ratio=0.3, method=method, calib=calib_ids(name), example_kwargs=traced.example_kwargs,
                               progress=False, **METHODS[method])
    assert graphprune.verify(small).ok


# ================================================================ planted importance
@pytest.fixture(scope="module")
def planted():
    """llama_gqa with MLP channel 3 of layer 0 zeroed and channel 5 made dominant, and KV head 1 of
    layer 1 zeroed (its k/v rows, the q rows of its two query heads, their o_proj columns)."""
    model, traced, _ = analysed("llama_gqa")
    model = planted_mlp(model, factor=20)
    with torch.no_grad():
        attn = model.model.layers[1].self_attn
        d = 16  # head_dim; query heads 2 and 3 read KV head 1
        attn.k_proj.weight[d:2 * d] = 0.0
        attn.v_proj.weight[d:2 * d] = 0.0
        attn.q_proj.weight[2 * d:4 * d] = 0.0
        attn.o_proj.weight[:, 2 * d:4 * d] = 0.0
    traced = graphprune.trace(model, example_kwargs=traced.example_kwargs)
    return traced, graphprune.analyze(traced)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_planted_units_are_ranked_as_expected(planted, method):
    traced, dg = planted
    scores = graphprune.score(dg, method, calib=calib_ids("llama_gqa", n=6), ratio=0.3,
                              example_kwargs=traced.example_kwargs, **METHODS[method])
    channels = scores["model.layers.0.mlp:channels"]
    assert channels.argmin() == 3 and channels.argmax() == 5, channels[:8]
    heads = scores["model.layers.1.self_attn:heads"]
    assert heads[1] < heads[0], heads


# ================================================================ Taylor against a hand computation
def _hand_gradients(model, ids, per_sample=False):
    model = copy.deepcopy(model)  # the hand computation may set .grad: never on the caller's model
    params = dict(model.named_parameters())
    samples = [ids[i:i + 1] for i in range(len(ids))] if per_sample else [ids]
    grads, fisher = {}, {}
    for x in samples:
        loss = causal_lm_loss(model(input_ids=x, use_cache=False), x)
        for (n, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is None:
                continue
            grads[n] = grads.get(n, 0) + g / len(samples)
            fisher[n] = fisher.get(n, 0) + g.square() / len(samples)
    return params, grads, fisher


def test_taylor_matches_llm_pruner_formulas_including_gqa_credit():
    model, _, _ = analysed("llama_gqa")
    ids = calib_ids("llama_gqa")
    params, g, fisher = _hand_gradients(model, ids, per_sample=True)
    pre = "model.layers.0."
    W = {k: params[pre + k].detach() for k in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                                 "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight", "self_attn.o_proj.weight")}
    G = {k: g[pre + k] for k in W}
    F = {k: fisher[pre + k] for k in W}

    elem = {k: (G[k] * W[k]).abs() for k in W}
    # MLP channel c: row c of gate/up, column c of down
    mlp_first = elem["mlp.gate_proj.weight"].sum(1) + elem["mlp.up_proj.weight"].sum(1) + elem["mlp.down_proj.weight"].sum(0)
    second = {k: (G[k] * W[k] - 0.5 * W[k] ** 2 * F[k]).abs() for k in W}
    mlp_second = second["mlp.gate_proj.weight"].sum(1) + second["mlp.up_proj.weight"].sum(1) + second["mlp.down_proj.weight"].sum(0)
    vec = {k: G[k] * W[k] for k in W}
    mlp_vector_max = torch.stack([vec["mlp.gate_proj.weight"].sum(1).abs(), vec["mlp.up_proj.weight"].sum(1).abs(),
                                  vec["mlp.down_proj.weight"].sum(0).abs()]).max(0).values
    # KV head j (head_dim 16) owns k/v rows 16j.., and query heads 2j, 2j+1: q rows / o columns 32j..32j+32
    def kv(t, dim):
        return t.sum(dim).reshape(2, 16).sum(1)

    def q(t, dim):
        return t.sum(dim).reshape(2, 32).sum(1)

    heads_first = kv(elem["self_attn.k_proj.weight"], 1) + kv(elem["self_attn.v_proj.weight"], 1) \
        + q(elem["self_attn.q_proj.weight"], 1) + q(elem["self_attn.o_proj.weight"], 0)

    got = run("llama_gqa", "taylor", batch_size=4)
    torch.testing.assert_close(got["model.layers.0.mlp:channels"].double(), mlp_first.double(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(got["model.layers.0.self_attn:heads"].double(), heads_first.double(), rtol=1e-4, atol=1e-9)
    got2 = run("llama_gqa", "taylor", order="second")
    torch.testing.assert_close(got2["model.layers.0.mlp:channels"].double(), mlp_second.double(), rtol=1e-4, atol=1e-9)
    got3 = run("llama_gqa", "taylor", granularity="vector", aggregate="max")
    torch.testing.assert_close(got3["model.layers.0.mlp:channels"].double(), mlp_vector_max.double(), rtol=1e-4, atol=1e-9)


def test_aggregations_and_bad_options():
    v = [torch.tensor([1.0, 4.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)]
    assert aggregate(v, "sum", 2).tolist() == [3.0, 4.5]
    assert aggregate(v, "mean", 2).tolist() == [1.5, 2.25]
    assert aggregate(v, "max", 2).tolist() == [2.0, 4.0]
    assert aggregate(v, "last", 2).tolist() == [2.0, 0.5]
    assert aggregate(v, "first", 2).tolist() == [1.0, 4.0]
    prod = aggregate([v[0], v[1] * torch.tensor([3.0, 1.0], dtype=torch.float64)], "prod", 2)  # products 6 and 2
    assert prod[0] > prod[1] and torch.isfinite(aggregate([torch.zeros(2, dtype=torch.float64)] * 9, "prod", 2)).all()
    with pytest.raises(graphprune.GraphpruneError, match="granularity"):
        run("llama_gqa", "taylor", granularity="block")
    with pytest.raises(graphprune.GraphpruneError, match="element"):
        run("llama_gqa", "taylor", granularity="vector", order="second")
    model, _, _ = analysed("llama_gqa")
    with pytest.raises(graphprune.GraphpruneError, match="needs calibration data"):
        graphprune.compile(model, method="taylor", progress=False)



def test_options_of_the_wrong_type_or_name_fail_before_tracing(monkeypatch):
    from graphprune.passes.bernoulli import Bernoulli

    for options, words in [({"p": "abc"}, "p='abc' should be a number"), ({"p": True}, "should be a number"),
                           ({"norm": 2}, "has no option 'norm'")]:
        with pytest.raises(graphprune.GraphpruneError, match=words):
            get_pass("magnitude")(**options)
    with pytest.raises(graphprune.GraphpruneError, match="steps=1.5 should be int"):
        Bernoulli(steps=1.5)
    with pytest.raises(graphprune.GraphpruneError, match=r"init=3 should be str \| None"):
        Bernoulli(init=3)
    assert Bernoulli(lr=1, init=None, keep=None).config.lr == 1  # an int is a number; None where allowed
    import numpy as np

    assert Bernoulli(lr=np.float32(0.01), steps=np.int64(3)).config.steps == 3  # a sweep over np.arange
    assert get_pass("magnitude")(p=torch.tensor(1.0)).config.p == 1.0
    # compile checks them before the (slow) trace
    model, _, _ = analysed("llama_gqa")
    monkeypatch.setattr(graphprune.api, "trace", lambda *a, **k: pytest.fail("traced before checking the options"))
    with pytest.raises(graphprune.GraphpruneError, match="should be a number"):
        graphprune.compile(model, method="magnitude", p="abc", progress=False)

# ================================================================ HyWIA
def test_hywia_fusion_weights_sum_to_one_and_follow_the_better_separation():
    flat = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98])
    spread = torch.tensor([0.1, 0.2, 5.0, 0.1, 4.0, 0.3, 0.2, 0.1])  # separates units clearly
    _, a = fuse(spread, flat)
    assert a.sum().item() == pytest.approx(1.0) and a[0] > 0.5 > a[1]  # fine separates better: weight on fine
    _, b = fuse(flat, spread)
    assert b.sum().item() == pytest.approx(1.0) and b[1] > 0.5 > b[0]  # and the other way round
    _, c = fuse(spread, flat, query="self")
    assert c.sum().item() == pytest.approx(1.0) and c[0] > 0.5
    # the documented reason for mean-normalisation: z-score / L2 give equal norms, hence equal weights
    for how in ("zscore", "l2"):
        w = fusion_weights(normalise(spread, how), normalise(flat, how))
        assert torch.allclose(w, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # more separation -> more weight, monotonically
    weights = [fuse(flat + k * (spread - flat) / 4, flat)[1][0].item() for k in range(5)]
    assert weights == sorted(weights) and weights[0] == pytest.approx(0.5, abs=0.02)


def test_hywia_reports_fusion_and_per_layer_sparsity_and_prefers_global_allocation():
    model, traced, _ = analysed("llama_gqa")
    small = graphprune.compile(model, ratio=0.4, method="hywia", calib=calib_ids("llama_gqa"),
                               example_kwargs=traced.example_kwargs, progress=False)
    assert small.plan.allocation == "global"
    info = small.report.scoring["hywia"]
    assert set(info["fusion_weights"]) == {g.name for g in small.plan.groups}
    for w in info["fusion_weights"].values():
        assert w["fine"] + w["coarse"] == pytest.approx(1.0) and 0 <= w["fine"] <= 1
    for g in small.plan.groups:  # the sparsity it reports is the plan's
        assert info["layer_sparsity"][g.name] == pytest.approx(1 - len(g.keep) / g.size)
    assert graphprune.verify(small).ok
    uniform = graphprune.compile(model, ratio=0.4, method="hywia", allocation="uniform", calib=calib_ids("llama_gqa"),
                                 example_kwargs=traced.example_kwargs, progress=False)
    assert uniform.plan.allocation == "uniform"


def test_hywia_scale_puts_each_group_back_on_its_own_importance():
    plain, scaled = run("llama_gqa", "hywia", scale="none"), run("llama_gqa", "hywia", scale="fine")
    factors = []
    for name, v in plain.items():
        ratio = scaled[name].double() / v.double()
        assert torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4), name  # one factor per group
        assert ratio.mean() > 0
        factors.append(ratio.mean().item())
        assert v.double().mean().item() == pytest.approx(1.0, rel=1e-4)  # unscaled: every group averages 1
    assert max(factors) > 1.5 * min(factors)  # groups differ in importance, so the global ranking changes
    with pytest.raises(graphprune.GraphpruneError, match="scale"):
        run("llama_gqa", "hywia", scale="both")


# ================================================================ LoRAPrune
class OneLayerLM(nn.Module):
    """Embedding -> one MLP (fc1, GELU, fc2) with a residual -> LM head."""

    def __init__(self, vocab=32, d=16, h=24):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc1, self.fc2, self.head = nn.Embedding(vocab, d), nn.Linear(d, h), nn.Linear(h, d), nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        return self.head(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def _hand_estimate(lora, ids, kwargs):
    """LoRAPrune's formula written out for fc1 (rows) and fc2 (columns) of the one-layer model."""
    loss = causal_lm_loss(lora(**kwargs), ids)
    total = 0
    for w, dim in (("fc1.weight", 1), ("fc2.weight", 0)):  # fc1 row c / fc2 column c belong to channel c
        a, b = lora.factors(w)
        ga, gb = torch.autograd.grad(loss, [a, b], retain_graph=True)
        G = gb @ a + b @ ga - gb @ ga
        imp = (G * (lora.base(w) + lora.scale * b @ a)).abs().sum(dim).double()
        total = total + imp / imp.norm()
    return total


def test_loraprune_estimate_equals_the_reference_formula_by_hand():
    model = OneLayerLM()
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(0))
    traced = graphprune.trace(model, example_kwargs={"input_ids": ids})
    dg = graphprune.analyze(traced)
    (group,) = [g for g in dg.groups if g.kind == "channels"]
    ctx = graphprune.ScoringContext(dg, [group])
    lora = add_lora(traced.module, r=4, alpha=8)
    with torch.no_grad():  # non-zero B so that every term of the formula counts
        for _, b_name in lora.adapters.values():
            fetch_attr(lora.module, b_name).normal_(0, 0.3)
    kwargs = {"input_ids": ids}
    expected = _hand_estimate(lora, ids, kwargs)
    loss = causal_lm_loss(lora(**kwargs), ids)
    names = list(lora.adapters)
    tensors = [t for w in names for t in lora.factors(w)]
    grads = torch.autograd.grad(loss, tensors)
    factors = {w: (tensors[2 * i], tensors[2 * i + 1], grads[2 * i], grads[2 * i + 1]) for i, w in enumerate(names)}
    got = unit_importance(ctx, lora, factors)[group.name]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)

    # the pass itself: one step with lr 0 and ratio 0 returns exactly the first estimate (B = 0)
    fresh = add_lora(traced.module, r=4, alpha=8, seed=0)
    first = _hand_estimate(fresh, ids[:2], {"input_ids": ids[:2]})
    scores = graphprune.score(dg, LoRAPrune(steps=1, lr=0.0, r=4, alpha=8, batch_size=2), calib=ids, ratio=0.0,
                              example_kwargs={"input_ids": ids})
    torch.testing.assert_close(scores[group.name].double(), first, rtol=1e-5, atol=1e-7)


def test_loraprune_base_weights_never_require_grad_during_scoring(monkeypatch):
    model, traced, dg = analysed("llama_gqa")
    seen = []
    real_train = lp_module.train

    def checking_train(module, batches, loss_fn, config, params=None, on_step=None):
        def check(step, result):
            adapters = {id(p) for p in params}
            seen.append([(n, p.requires_grad, p.grad is None) for n, p in module.named_parameters() if id(p) not in adapters])
            return on_step(step, result)

        return real_train(module, batches, loss_fn, config, params=params, on_step=check)

    monkeypatch.setattr(lp_module, "train", checking_train)
    scores = graphprune.score(dg, "loraprune", calib=calib_ids("llama_gqa"), ratio=0.3,
                              example_kwargs=traced.example_kwargs, **FAST_LORAPRUNE)
    assert len(seen) == FAST_LORAPRUNE["steps"]
    for step in seen:
        assert step and all(not rg and no_grad for _, rg, no_grad in step)  # frozen, and no gradient ever stored
    assert {n for n, _, _ in seen[0]} >= set(dict(traced.module.named_parameters()))  # every base weight
    assert scores.weights  # merged LoRA goes to the rewrite
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_loraprune_prunes_iteratively_and_its_mask_is_the_compiled_model():
    model, traced, _ = analysed("llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lp = LoRAPrune(steps=10, update_every=2, lr=1e-2, batch_size=2)
    small = graphprune.compile(model, ratio=0.4, method=lp, calib=calib_ids("llama_gqa", n=6), progress=False,
                               example_kwargs=traced.example_kwargs)
    history = small.report.scoring["loraprune"]["mask_updates"]
    pruned = [h["pruned"] for h in history]
    assert pruned == sorted(pruned) and 0 < pruned[0] < pruned[-1]  # gradual, never unpruned
    assert small.report.scoring["loraprune"]["regrown_at_end"] == 0
    for pg in small.plan.groups:  # the plan compile made from the scores is the pass's final mask
        assert torch.equal(~lp.pruned[pg.name], torch.isin(torch.arange(pg.size), torch.tensor(pg.keep)))
    ids = calib_ids("llama_gqa", seed=3)
    kwargs = graphprune.data.model_inputs(traced.example_kwargs, ids)
    with torch.no_grad():  # the pruned graph (merged LoRA) computes what the masked LoRA graph computed
        torch.testing.assert_close(small(**kwargs).logits, lp.lora_graph(**kwargs).logits, rtol=1e-4, atol=1e-5)
    assert graphprune.verify(small).ok
    assert small.weights and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(graphprune.GraphpruneError, match="ratio"):
        graphprune.score(analysed("llama_gqa")[2], "loraprune", calib=ids, **FAST_LORAPRUNE)


def test_cubic_schedule():
    values = [cubic_ratio(t, 100, 0.5) for t in range(101)]
    assert values[:11] == [0.0] * 11 and values[90:] == [0.5] * 11
    assert values == sorted(values) and 0 < values[50] < 0.5


# ================================================================ calibration plumbing
def test_compile_takes_a_corpus_name_and_the_models_tokenizer(stories_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir)
    opts = dict(calib="tinystories", n_samples=4, seq_len=32, seed=1)
    small = graphprune.compile(model, ratio=0.3, method="taylor", progress=False, **opts)  # tokenizer: the model's own
    info = small.report.scoring["taylor"]
    assert 0 < info["calibration_loss"] < 10 and info["samples"] == 4  # real text, real weights: a sane loss
    tok = graphprune.data.load_tokenizer(stories_dir)
    again = graphprune.score(small.dg, "taylor", tokenizer=tok, example_kwargs=small.example_kwargs, **opts)
    replay = graphprune.make_plan(small.dg, again, 0.3)
    assert [g.keep for g in replay.groups] == [g.keep for g in small.plan.groups]  # deterministic with a seed
    other = graphprune.score(small.dg, "taylor", tokenizer=tok, example_kwargs=small.example_kwargs, **dict(opts, seed=2))
    assert any(not torch.equal(again[k], other[k]) for k in again)  # the seed picks other windows
    texts = ["Once upon a time there was a little cat.", "The dog ran to the park and played all day long."] * 4
    scores = graphprune.score(small.dg, "hywia", calib=texts, tokenizer=tok, n_samples=2, seq_len=16)  # no trace at hand
    assert scores.info["hywia"]["calibration_loss"] > 0 and all(torch.isfinite(v).all() for v in scores.values())
