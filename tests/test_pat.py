"""PAT: HSMs on every residual write, a shared hidden mask, the identity loss, and the merge."""
from __future__ import annotations

import pytest
import torch
from conftest import analysed, fresh_inputs, outputs

import graphprune
from graphprune.errors import GraphpruneError
from graphprune.hsm import identity_loss, insert_hsms, merged_weights, residual_writers
from graphprune.passes.pat import PAT, binary_mask, mask_schedule, polarization_loss, sparsity_loss
from graphprune.plan import make_plan

RATIO = 0.3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


def calib_ids(vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (8, 24), generator=torch.Generator().manual_seed(seed))


def pruned_and_trained(name: str, **config):
    """Compile a fresh zoo model with PAT; returns (model, state before, compiled, pass)."""
    import zoo

    model = zoo.ZOO[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pat = PAT(steps=20, **config)
    compiled = graphprune.compile(model, RATIO, method=pat, calib=calib_ids(), progress=False)
    return model, before, compiled, pat


@pytest.fixture(scope="module")
def llama():
    return pruned_and_trained("llama_gqa")


# ------------------------------------------------------------------ pieces
def test_identity_loss_zero_for_orthonormal_positive_otherwise():
    eye_rows = torch.eye(16)[:4]  # the identity operator's rows: orthonormal
    q, _ = torch.linalg.qr(torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    assert float(identity_loss([eye_rows, q.T])) < 1e-12
    scaled = 2.0 * q.T
    assert float(identity_loss([scaled])) > 0.1
    # summed over every HSM, not only the last one
    assert float(identity_loss([scaled, q.T])) == pytest.approx(float(identity_loss([scaled])), rel=1e-6)
    assert float(identity_loss([scaled, scaled])) == pytest.approx(2 * float(identity_loss([scaled])), rel=1e-6)


def test_mask_schedule_and_losses():
    t0, b0 = mask_schedule(0, 100)
    assert (t0, b0) == (1.0, 0.5)
    temps = [mask_schedule(t, 100)[0] for t in range(1, 100)]
    assert all(a <= b for a, b in zip(temps, temps[1:])) and temps[-1] > 50
    assert mask_schedule(50, 100)[1] == 0.0 and mask_schedule(25, 100)[1] == pytest.approx(0.25)
    z = torch.tensor([1.0, -1.0, 0.5, -0.5], requires_grad=True)
    assert float(polarization_loss(z.detach())) == pytest.approx(0.125 + 0.125)  # mean over each side
    loss = sparsity_loss(z, 1.0, keep=1)  # two counted as kept, one wanted
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert (z.grad > 0).all()  # every logit is pushed down
    keep, exact = binary_mask(torch.tensor([0.3, -0.2, 0.1, 0.4]), 2)
    assert not exact and keep.tolist() == [True, False, False, True]
    keep, exact = binary_mask(torch.tensor([0.3, -0.2, -0.1, 0.4]), 2)
    assert exact and int(keep.sum()) == 2


def test_writers_come_from_the_analysis():
    _, _, dg = analysed("llama_gqa")
    writes = residual_writers(dg)
    kinds = [w.kind for w in writes]
    assert kinds.count("embedding") == 1 and kinds.count("linear") == 4  # 2 layers x (o_proj, down_proj)
    assert all(w.weight.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight")) for w in writes)


def test_merge_equals_hsm_graph_with_binary_mask():
    """Non-trivial L1 and σ: the dense graph with merged weights computes what the HSMs compute."""
    _, traced, dg = analysed("llama_gqa")
    hsm = insert_hsms(dg, rank=5, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for site in hsm.operator_sites:
            getattr(hsm.module, site.l1).copy_(0.3 * torch.randn(hsm.hidden, hsm.rank, generator=gen))
            getattr(hsm.module, site.sigma).copy_(1 + 0.5 * torch.rand(hsm.hidden, generator=gen))
    keep = torch.rand(hsm.hidden, generator=gen) > 0.4
    hsm.set_mask(keep.float())
    merged = merged_weights(hsm, keep.float())
    params = {**dict(dg.gm.named_parameters()), **merged}
    kw = fresh_inputs("llama_gqa", traced, 3, 7)
    with torch.no_grad():
        want = outputs(hsm(**kw))[0]
        got = outputs(torch.func.functional_call(dg.gm, params, args=(), kwargs=kw))[0]
    assert (want - got).abs().max() <= 1e-4
    assert float(want.abs().max()) > 1e-2  # not trivially zero


# ------------------------------------------------------------------ end to end
def test_pruned_equals_trained_masked_model(llama):
    _, _, compiled, pat = llama
    traced = compiled.traced
    mask = pat.hsm_graph.mask
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for batch, seq in [(2, 5), (3, 11)]:
        kw = fresh_inputs("llama_gqa", traced, batch, seq, seed=batch)
        with torch.no_grad():
            got = outputs(compiled.module(**kw))[0]
            want = outputs(pat.hsm_graph(**kw))[0]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4
    assert graphprune.verify(compiled).ok


def test_no_hsm_or_mask_left_after_merge(llama):
    _, _, compiled, _ = llama
    gm = compiled.module
    assert not [n for n, _ in gm.named_parameters() if "_pat" in n]
    assert not [n for n, _ in gm.named_buffers() if "_pat" in n]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and "_pat" in str(n.target)]
    linears = lambda g: sum(1 for n in g.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default)
    assert linears(gm) == linears(compiled.traced.module)  # no extra operator at inference


def test_mask_keeps_exactly_the_target(llama):
    _, _, compiled, pat = llama
    (group,) = compiled.plan.groups
    assert group.kind == "hidden"  # PAT's default kinds
    flat = make_plan(compiled.dg, {"hidden": torch.ones(group.size)}, RATIO, kinds=("hidden",))
    target = len(flat.groups[0].keep)
    assert target < group.size
    assert int((pat.hsm_graph.mask == 0).sum()) == group.size - target
    assert sorted(group.keep) == pat.keep.nonzero().flatten().tolist()
    info = compiled.report.scoring["pat"]
    assert info["keep"] == target and info["steps"] == 20 and info["hsms"] == 5
    curve = info["task_loss_by_tenth"]  # the task loss over the training, as the mask hardened
    assert len(curve) == 10 and all(v > 0 for v in curve)
    l1 = [getattr(pat.hsm_graph.module, s.l1) for s in pat.hsm_graph.operator_sites]
    assert any(t.detach().abs().max().item() > 0 for t in l1)  # the HSM operators were trained


def test_callers_model_unchanged(llama):
    model, before, _, _ = llama
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_tied_embedding_and_lora():
    """A tied embedding/LM head gets a mask-only site; LoRA branches are folded in as well."""
    model, before, compiled, pat = pruned_and_trained("llama_mha", lora_r=2, mask_lr=0.02)
    info = compiled.report.scoring["pat"]
    assert info["mask_only_sites"] == 1 and info["lora_r"] == 2
    assert info["mask_lr"] == 0.02
    kw = fresh_inputs("llama_mha", compiled.traced, 2, 6)
    with torch.no_grad():
        got = outputs(compiled.module(**kw))[0]
        want = outputs(pat.hsm_graph(**kw))[0]
    assert (got - want).abs().max() <= 1e-4
    assert not [n for n, _ in compiled.module.named_parameters() if "lora_" in n or "_pat" in n]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_init_starts_the_mask_from_another_pass():
    """With ``init``, the logits start at ±margin from that pass's top-D channels; a mask too slow
    to move keeps exactly that set (the default init, z = 0, keeps a different one here)."""
    import zoo

    model = zoo.ZOO["llama_gqa"]()
    magnitude = graphprune.compile(model, RATIO, method="magnitude", kinds=("hidden",), progress=False)
    pat = PAT(steps=5, init="magnitude", mask_lr=1e-6)
    compiled = graphprune.compile(model, RATIO, method=pat, calib=calib_ids(), progress=False)
    assert compiled.plan.groups[0].keep == magnitude.plan.groups[0].keep
    assert pat.logits.abs().min() > 0.49 and compiled.report.scoring["pat"]["init"] == "magnitude"
    free = PAT(steps=5, mask_lr=1e-6)
    compiled = graphprune.compile(model, RATIO, method=free, calib=calib_ids(), progress=False)
    assert compiled.plan.groups[0].keep != magnitude.plan.groups[0].keep


def test_init_pass_scores_on_its_own_text():
    """``init_calib``: the init pass ranks on that text (PAT trains on ``calib``), as if compiled on it."""
    import zoo

    model = zoo.ZOO["llama_gqa"]()
    other = calib_ids(seed=7)
    taylor_other = graphprune.compile(model, RATIO, method="taylor", calib=other, kinds=("hidden",), progress=False)
    taylor_train = graphprune.compile(model, RATIO, method="taylor", calib=calib_ids(), kinds=("hidden",), progress=False)
    assert taylor_other.plan.groups[0].keep != taylor_train.plan.groups[0].keep  # the two texts rank differently
    pat = PAT(steps=5, init="taylor", init_calib=other, mask_lr=1e-6)
    compiled = graphprune.compile(model, RATIO, method=pat, calib=calib_ids(), progress=False)
    assert compiled.plan.groups[0].keep == taylor_other.plan.groups[0].keep
    assert compiled.report.scoring["pat"]["init_calib"] == "Tensor"
    with pytest.raises(GraphpruneError, match="needs init="):
        PAT(init_calib="wikitext2")


def test_distill_learns_from_the_unpruned_model():
    """``distill``: the task loss is the KL to the unpruned graph, nil while the HSMs are still the
    identity (step 0: mask 1, L1 = 0, σ = 1); cross entropy is not."""
    from graphprune.train import causal_lm_loss

    model, traced, dg = analysed("llama_gqa")
    inputs = fresh_inputs("llama_gqa", traced, 2, 12)
    ids = inputs["input_ids"]
    hsm = insert_hsms(dg)
    with torch.no_grad():
        assert float(PAT.task_loss(hsm.module, dg.gm, inputs, ids)) < 1e-6
        assert float(PAT.task_loss(hsm.module, None, inputs, ids)) == pytest.approx(float(causal_lm_loss(dg.gm(**inputs), ids)))
        hsm.set_mask((torch.arange(hsm.hidden) % 2).float())  # half the stream gone: the student differs
        assert float(PAT.task_loss(hsm.module, dg.gm, inputs, ids)) > 1e-3
    pat = PAT(steps=5, distill=True)
    compiled = graphprune.compile(model, RATIO, method=pat, calib=calib_ids(), progress=False)
    info = compiled.report.scoring["pat"]
    assert info["distill"] is True and info["merge_error"] <= 1e-3


def test_bad_config_is_refused():
    with pytest.raises(GraphpruneError, match="mask_lr"):
        PAT(mask_lr=0.0)
    with pytest.raises(GraphpruneError, match="init_margin"):
        PAT(init="taylor", init_margin=0.0)
    with pytest.raises(GraphpruneError, match="cannot be pat"):
        PAT(init="pat")
    with pytest.raises(GraphpruneError, match="freeze_at"):
        PAT(freeze_at=0.0)


def test_layernorm_models_are_refused():
    import zoo

    with pytest.raises(GraphpruneError, match="LayerNorm"):
        graphprune.compile(zoo.ZOO["gpt2"](), RATIO, method="pat", calib=calib_ids(), progress=False, steps=2)


def test_unmasked_residual_writes_are_refused_before_training():
    """Stacked MoE experts write into the stream through ops that get no HSM: refused, not mis-merged."""
    import zoo

    with pytest.raises(GraphpruneError, match="residual stream"):
        graphprune.compile(zoo.ZOO["mixtral"](), RATIO, method="pat", calib=calib_ids(100), progress=False,
                           steps=10**6)  # would take hours if it trained first


def test_other_kinds_are_refused():
    import zoo

    with pytest.raises(GraphpruneError, match="hidden"):
        graphprune.compile(zoo.ZOO["llama_gqa"](), RATIO, method="pat", kinds=("heads", "hidden"),
                           calib=calib_ids(), progress=False, steps=2)


@pytest.mark.slow
def test_stories260k_pruned_equals_trained(stories_dir):
    """Real weights (a tiny Llama with a tied embedding): the merge is exact after real training."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    pat = PAT(steps=30)
    compiled = graphprune.compile(model, 0.2, method=pat, calib=ids, progress=False)
    (group,) = compiled.plan.groups
    assert len(group.keep) == compiled.report.scoring["pat"]["keep"] < group.size
    with torch.no_grad():
        got = outputs(compiled.module(input_ids=ids[:2], use_cache=False))[0]
        want = outputs(pat.hsm_graph(input_ids=ids[:2], use_cache=False))[0]
    assert (got - want).abs().max() <= 1e-4
