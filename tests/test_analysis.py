"""What the dependency analysis finds, from the ops alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import analysed

import graphprune
from graphprune.analysis import op_rules


def groups_of(dg, kind, layer="layers.0."):
    return [g for g in dg.groups if g.kind == kind and any(layer in m.param for m in g.members)]


def test_llama_gqa_groups():
    model, _, dg = analysed("llama_gqa")
    cfg = model.config
    (heads,) = groups_of(dg, "heads")
    assert heads.size == cfg.num_key_value_heads  # unit = one KV head with its query heads
    got = {(m.param, m.dim) for m in heads.members}
    p = "model.layers.0.self_attn."
    assert got == {(p + "q_proj.weight", 0), (p + "k_proj.weight", 0), (p + "v_proj.weight", 0), (p + "o_proj.weight", 1)}
    q = next(m for m in heads.members if m.param.endswith("q_proj.weight"))
    n_rep, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    # query head h reads KV head h // n_rep: rows of q_proj grouped per KV head
    assert q.coords.tolist() == [h // n_rep for h in range(cfg.num_attention_heads) for _ in range(d)]
    (qh,) = groups_of(dg, "query_heads")
    assert qh.size == n_rep
    (mlp,) = groups_of(dg, "channels")
    assert mlp.size == cfg.intermediate_size
    assert {m.param.rsplit(".", 2)[-2] for m in mlp.members} == {"gate_proj", "up_proj", "down_proj"}
    (hidden,) = [g for g in dg.groups if g.kind == "hidden"]
    assert hidden.size == cfg.hidden_size
    names = {m.param for m in hidden.members}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names


def test_fused_qkv_split_by_chunk():
    _, _, dg = analysed("fused_qkv_attn")
    (heads,) = groups_of(dg, "heads", layer="blocks.0.")
    qkv = [m for m in heads.members if m.param.endswith("qkv.weight")]
    assert len(qkv) == 1 and qkv[0].dim == 0
    coords = qkv[0].coords
    # the fused rows are cat(q, k, v): every head owns head_dim rows in each third
    third = coords.numel() // 3
    assert torch.equal(coords[:third], coords[third : 2 * third]) and torch.equal(coords[:third], coords[2 * third :])
    assert sorted(set(coords.tolist())) == list(range(heads.size))


def test_gpt2_conv1d_addmm_weight_is_in_out():
    _, _, dg = analysed("gpt2")
    (mlp,) = groups_of(dg, "channels", layer="h.0.")
    got = {(m.param, m.dim) for m in mlp.members}
    assert ("transformer.h.0.mlp.c_fc.weight", 1) in got  # Conv1D weight is (in, out)
    assert ("transformer.h.0.mlp.c_proj.weight", 0) in got
    assert ("transformer.h.0.mlp.c_fc.bias", 0) in got


def test_moe_expert_channels_are_one_group_across_experts():
    model, _, dg = analysed("mixtral")
    chans = groups_of(dg, "channels")
    assert any(any(m.param.endswith("experts.gate_up_proj") for m in g.members) for g in chans)
    # whole experts are selected by router ids: a group of their own (tests/test_experts.py), not frozen
    assert not any("experts" in what or "gate.weight" in what for what, _ in dg.frozen_report())


class Flipper(nn.Module):
    """Uses torch.flip, an op with no channel rule, on the hidden channels."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.flip(torch.relu(self.up(x)), dims=[-1]))


def test_unknown_op_freezes_and_strict_raises():
    model = Flipper()
    x = torch.randn(2, 3, 8)
    dg = graphprune.analyze(model, example_inputs=(x,))
    assert "aten.flip.default" in dg.walk.unsupported
    assert not [g for g in dg.groups if g.size == 16]  # the 16 channels are frozen...
    assert any("without a rule" in why for _, why in dg.frozen_report())  # ...and the report says why
    with pytest.raises(graphprune.UnsupportedOpError, match="aten.flip"):
        graphprune.analyze(model, example_inputs=(x,), strict=True)


def test_registering_an_op_rule_unfreezes_it():
    def flip_rule(walk, node):  # flip reverses positions: channels stay the same set, so couple them
        return walk.of(node.args[0])

    try:
        graphprune.register_op_rule("aten.flip", flip_rule)
        dg = graphprune.analyze(Flipper(), example_inputs=(torch.randn(2, 3, 8),))
        assert [g for g in dg.groups if g.size == 16]
    finally:
        op_rules.RULES.pop("aten.flip", None)


def test_analysis_is_networkx():
    import networkx as nx

    _, _, dg = analysed("llama_gqa")
    assert isinstance(dg.graph, nx.MultiGraph) and dg.graph.number_of_edges() > 0
    cg = dg.coupling_graph()
    # every group's leaf sits in one connected component of the coupling graph
    comps = list(nx.connected_components(cg))
    assert all(sum(g.axis in c for c in comps) == 1 for g in dg.groups)


def test_peft_lora_branches_are_coupled_to_their_base_layers():
    import zoo
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(zoo.ALL["llama_gqa"](), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    small = graphprune.compile(peft_model, ratio=0.5, example_kwargs=zoo.example_inputs("llama_gqa"), progress=False)
    dg = small.dg
    (heads,) = groups_of(dg, "heads")
    assert {"model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.lora_B.default.weight"} <= {m.param for m in heads.members}
    (mlp,) = groups_of(dg, "channels")
    assert ("model.layers.0.mlp.down_proj.lora_A.default.weight", 1) in {(m.param, m.dim) for m in mlp.members}
    assert len(groups_of(dg, "lora_rank")) == 2  # the adapters' ranks are their own, unpruned kind
    assert all(g.kind != "lora_rank" for g in small.plan.groups)
    assert graphprune.verify(small).ok
    assert all(torch.equal(before[k], v) for k, v in peft_model.state_dict().items())


# ---------------------------------------------------------------- ops whose outputs cannot follow a pruned input
# Found by a sweep over transformers' causal LMs (GPT-OSS, JetMoE, DiffLlama, Apertus): before these rules
# froze both sides, a layer reading such an output got a prunable group of its own, which the rewrite sliced while
# the activation kept its width.
X = torch.randn(2, 5, 8)


class _Interleaved(nn.Module):
    """GPT-OSS's experts: gate and up interleaved in one projection, read by strided slices."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(8, 32), nn.Linear(16, 8)
        self.mlp_up, self.mlp_down = nn.Linear(8, 16), nn.Linear(16, 8)  # something that can be pruned

    def forward(self, x):
        h = self.gate_up(x)
        return self.down(torch.nn.functional.silu(h[..., ::2]) * h[..., 1::2]) + self.mlp_down(torch.relu(self.mlp_up(x)))


class _TokensSplit(nn.Module):
    """JetMoE's routing: tokens split along a dynamic dim, each piece through its own layer."""

    def __init__(self):
        super().__init__()
        self.up, self.head, self.rest = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        flat = torch.relu(self.up(x)).reshape(-1, 16)
        n = flat.shape[0]
        first, others = flat.split([n // 2, n - n // 2], dim=0)
        return torch.cat([self.head(first), self.rest(others)], dim=0).view(x.shape[0], x.shape[1], 8)


class _ChunkedProduct(nn.Module):
    """DiffLlama: a chunk over an axis that is already a product (heads x head_dim) cannot be a concatenation."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.scale = nn.Linear(8, 16), nn.Linear(8, 8), nn.Parameter(torch.randn(4))
        self.mlp_up, self.mlp_down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.up(x)
        heads = h.view(b, s, 4, 4) * self.scale
        a1, a2 = h.chunk(2, dim=-1)
        return self.down(a1 - a2) + heads.sum(-1).sum(-1, keepdim=True) + self.mlp_down(torch.relu(self.mlp_up(x)))


class _MaxKeepdimAndMinOther(nn.Module):
    """GPT-OSS's eager attention (max over a dim, keepdim) and Apertus's xIELU (torch.min(x, eps))."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.eps = nn.Parameter(torch.tensor(-1e-6), requires_grad=False)

    def forward(self, x):
        h = self.up(x)
        h = h - h.max(dim=0, keepdim=True).values  # over the batch: the channels stay prunable
        return self.down(torch.cat([torch.min(h, self.eps)], dim=-1))


class _CatThenSplit(nn.Module):
    """DeepSeek-V4's output path: a concatenation (12 + 4) reshaped into 2 x 8, which cuts through it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 12), nn.Linear(8, 4), nn.Linear(8, 8)
        self.mlp_up, self.mlp_down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], dim=-1).reshape(*x.shape[:-1], 2, 8)
        return self.out(h).sum(-2) + self.mlp_down(torch.relu(self.mlp_up(x)))


def _members(dg) -> set:
    return {(m.param, m.dim) for g in dg.groups for m in g.members}


@pytest.mark.parametrize("cls, unprunable", [(_Interleaved, {("down.weight", 1), ("gate_up.weight", 0)}),
                                             (_ChunkedProduct, {("down.weight", 1), ("up.weight", 0)}),
                                             (_CatThenSplit, {("out.weight", 1), ("a.weight", 0)})])
def test_outputs_that_cannot_follow_a_pruned_input_are_frozen_too(cls, unprunable):
    model = cls().eval()
    dg = graphprune.analyze(graphprune.trace(model, example_inputs=(X,)))
    assert not unprunable & _members(dg)  # neither side of the strided slice / the chunk is in a group
    small = graphprune.compile(model, 0.3, example_inputs=(X,), progress=False)
    assert graphprune.verify(small).ok and small.num_parameters() < sum(p.numel() for p in model.parameters())


def test_a_split_along_a_dynamic_dim_keeps_the_other_dims_coupled():
    model = _TokensSplit().eval()
    dg = graphprune.analyze(graphprune.trace(model, example_inputs=(X,)))
    (group,) = [g for g in dg.groups if g.kind == "channels"]
    assert {(m.param, m.dim) for m in group.members} == {("up.weight", 0), ("up.bias", 0), ("head.weight", 1), ("rest.weight", 1)}
    assert graphprune.verify(graphprune.compile(model, 0.3, example_inputs=(X,), progress=False)).ok


def test_max_with_keepdim_min_with_a_tensor_and_concat_have_rules():
    model = _MaxKeepdimAndMinOther().eval()
    dg = graphprune.analyze(graphprune.trace(model, example_inputs=(X,)))
    assert not dg.walk.unsupported and [(g.kind, g.size) for g in dg.groups] == [("channels", 16)]
    assert graphprune.verify(graphprune.compile(model, 0.5, example_inputs=(X,), progress=False)).ok


def test_compile_refuses_a_pruned_graph_that_cannot_run(monkeypatch):
    """The last line of defence: a rule that lets an op's input be pruned when the op cannot follow
    (here, the strided slice rule as it was) gives a clear error at compile time, not a broken model."""
    def leaky_slice(w, node):
        out = op_rules.slice_(w, node)
        if op_rules.arg(node, 4, "step", 1) != 1:
            d = op_rules.arg(node, 1, "dim", 0) % len(out)
            out[d] = w.table.new(w.shape(node)[d], "leak")  # fresh and prunable: what the old rule returned
        return out

    monkeypatch.setitem(op_rules.RULES, "aten.slice", op_rules.OpRule(leaky_slice, op_rules.rw_slice, keeps_values=True))
    model = _Interleaved().eval()
    with pytest.raises(graphprune.errors.RewriteError, match=r"the pruned graph does not run \(linear.*graphprune bug"):
        graphprune.compile(model, 0.5, example_inputs=(X,), progress=False)


def test_complex_rotary_keeps_heads_prunable_and_feeds_a_contiguous_copy():
    """DeepSeek-V2 rotates q and k in complex numbers (view_as_complex, a complex product, view_as_real):
    the heads pass through, and so do the rotary pairs, one group with the rotary embedding's
    frequencies. Only the (real, imaginary) axis stays whole. Its rotary key is a slice of a projection
    whose other part loses channels: at an odd kept width that slice's stride is odd, which
    view_as_complex refuses, so its input is copied first."""
    import zoo

    model = zoo.ZOO["deepseek_v2"]()
    dg = graphprune.analyze(graphprune.trace(model, example_kwargs=zoo.example_inputs("deepseek_v2")))
    assert not dg.walk.unsupported  # polar has a rule
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert [g.size for g in heads] == [4, 4]
    (pairs,) = [g for g in dg.groups if g.kind == "head_dim" and ("model.rotary_emb.inv_freq", 0) in {(m.param, m.dim) for m in g.members}]
    assert pairs.size == 4  # qk_rope_head_dim 8 = 4 complex pairs, shared by every layer
    assert all("real and imaginary" in why for _, why in dg.frozen_report() if "complex" in why)
    for seed in range(3):
        plan = graphprune.random_plan(dg, kinds=("heads", "head_dim", "channels"), keep_prob=0.5, seed=seed)
        small = graphprune.compile(model, plan=plan, progress=False)
        assert graphprune.verify(small).ok
        assert small.num_parameters() < sum(p.numel() for p in model.parameters())
    views = [n for n in small.module.graph.nodes if n.target == torch.ops.aten.view_as_complex.default]
    assert views and all(n.args[0].target == torch.ops.aten.clone.default for n in views)


class _NoGradGate(nn.Module):
    """A gate computed under torch.no_grad() in forward (PhiMoE's router does so): torch.export makes the
    block one higher-order op with a graph of its own, which the trace inlines."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        with torch.no_grad():
            mask = torch.sigmoid(self.gate(x))
        return self.down(torch.relu(self.up(x)) * mask)


def test_grad_mode_blocks_in_forward_are_inlined_and_still_cut_the_gradient():
    model = _NoGradGate().eval()
    traced = graphprune.trace(model, example_inputs=(X,))
    assert not any("wrap_with_set_grad_enabled" in str(n.target) for n in traced.module.graph.nodes)
    dg = graphprune.analyze(traced)
    assert not dg.walk.unsupported
    (group,) = [g for g in dg.groups if g.kind == "channels"]
    assert ("gate.weight", 0) in {(m.param, m.dim) for m in group.members}  # the gate's channels are the MLP's
    traced.module(x=X).sum().backward()
    assert traced.module.gate.weight.grad is None and traced.module.up.weight.grad is not None  # as in eager
    assert graphprune.verify(graphprune.compile(model, 0.5, example_inputs=(X,), progress=False)).ok


def test_views_become_reshapes_unless_something_writes_through_them():
    """After pruning an op may return another memory layout (JetMoE: SDPA's output once queries and values
    differ in head size), where a view fails: the rewrite uses reshape, except where a view must alias."""
    from graphprune.rewrite import views_as_reshapes

    aten = torch.ops.aten

    def f(x):
        read = aten.view.default(x, [4, -1])  # only read: may become a copy
        flat = aten.view.default(x, [-1])  # written through below: must stay a view of x
        aten.add_.Tensor(aten.slice.Tensor(flat, 0, 0, 2), 1.0)
        return read, flat

    gm = torch.fx.symbolic_trace(f)
    views_as_reshapes(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets[:2] == [aten.reshape.default, aten.view.default]
    gm.recompile()
    x = torch.zeros(2, 4)
    gm(x)
    assert x.flatten()[:2].tolist() == [1.0, 1.0]  # the write still reaches x
    y = torch.zeros(4, 2).t()  # [2, 4], not contiguous: a view to [4, 2] fails, the reshape copies
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        f(y)
    read_only = torch.fx.symbolic_trace(lambda x: aten.view.default(x, [4, -1]))
    views_as_reshapes(read_only)
    read_only.recompile()
    assert torch.equal(read_only(y), y.reshape(4, 2))
