"""The user-facing API: compile with no arguments, verify, errors, custom passes."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from conftest import analysed, planted_mlp

import graphprune
from graphprune.registry import PASSES


def test_compile_any_hf_causal_lm_with_no_arguments():
    model, _, _ = analysed("qwen2")
    small = graphprune.compile(model, progress=False)  # ratio 0.5, magnitude, no input needed
    out = small(input_ids=torch.randint(0, 64, (2, 5)), use_cache=False)
    assert out.logits.shape == (2, 5, model.config.vocab_size)
    assert small.num_parameters() == small.plan.params_after < small.plan.params_before
    text = str(small.report)
    assert "model.layers.0" in text and "channels" in text and "achieved" in text
    assert abs(small.report.achieved_ratio - 0.5) < 0.1
    check = graphprune.verify(small)
    assert check.ok and check.max_rel < 1e-5, str(check)


def test_verify_catches_a_wrong_rewrite():
    model, _, _ = analysed("llama_gqa")
    small = graphprune.compile(model, ratio=0.5, progress=False)
    with torch.no_grad():  # corrupt one kept weight of the pruned graph
        next(p for n, p in small.module.named_parameters() if "down_proj" in n)[0, 0] += 1.0
    assert not graphprune.verify(small).ok


def test_verify_fails_on_a_nan_even_after_a_larger_difference():
    """Python's max() skips a NaN that comes second: a NaN in a later output must still fail."""
    model, _, _ = analysed("llama_gqa")
    small = graphprune.compile(model, ratio=0.5, progress=False)
    with torch.no_grad():
        next(p for n, p in small.module.named_parameters() if n.endswith("layers.1.mlp.down_proj.weight"))[0, 0] = float("nan")
    check = graphprune.verify(small)
    assert not check.ok and check.max_abs == float("inf")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on data: torch.export cannot trace this
            return self.lin(x)
        return x


def test_untraceable_model_raises_trace_error():
    with pytest.raises(graphprune.TraceError, match="could not trace DataDependent"):
        graphprune.compile(DataDependent(), example_inputs=(torch.randn(2, 3, 4),), progress=False)


def test_non_hf_model_without_inputs_says_what_to_pass():
    with pytest.raises(graphprune.TraceError, match="example_inputs"):
        graphprune.trace(nn.Linear(3, 3))
    with pytest.raises(graphprune.TraceError, match="nn.Module"):
        graphprune.trace("not a model")


def test_plain_module_compiles_with_example_inputs():
    model, traced, _ = analysed("tiny_mlp_lm")
    small = graphprune.compile(model, ratio=0.5, example_inputs=(traced.example_kwargs["input_ids"],), progress=False)
    assert graphprune.verify(small).ok
    assert small.report.achieved_ratio > 0.3


class FeatureMLP(nn.Module):
    """A plain MLP over [batch, features]: its dim 1 is no sequence and cannot vary."""

    def __init__(self, features: int = 12, hidden: int = 32):
        super().__init__()
        self.up, self.down = nn.Linear(features, hidden), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_a_module_whose_dim_1_is_features_compiles_with_only_the_batch_dynamic(tmp_path):
    model = FeatureMLP().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"fixes dim 1 of its inputs \(\{'x': \(12,\)\}\)"):
        small = graphprune.compile(model, ratio=0.5, example_inputs=(torch.randn(2, 12),), progress=False)
    assert small.dynamic_shapes["x"] == {0: small.dynamic_shapes["x"][0]}  # the batch only
    assert small.module.up.weight.shape[0] < 32 and graphprune.verify(small).ok
    assert small(x=torch.randn(5, 12)).shape == (5, 3)  # another batch size
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = graphprune.load(small.save(tmp_path / "mlp", plot=False))  # the fixed dim survives a save
    assert list(again.dynamic_shapes["x"]) == [0]
    onnx = again.export_onnx(tmp_path / "mlp.onnx", progress=False)
    session = graphprune.OnnxSession.open(onnx, quiet=True)
    x = torch.randn(7, 12)
    (got,) = session(x=x).values()
    assert got.shape == (7, 3) and abs(got - small(x=x).detach().numpy()).max() < 1e-5


class LengthBranch(nn.Module):
    """Shape-dependent control flow on the sequence: a guard, not a fixed length."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(32, 8), nn.Linear(8, 32)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if input_ids.shape[1] > 4:
            x = x * 2
        return self.head(x)


def test_only_a_fixed_dim_1_falls_back_to_a_dynamic_batch():
    with pytest.raises(graphprune.TraceError, match="could not trace LengthBranch"):
        graphprune.trace(LengthBranch(), example_inputs=(torch.randint(0, 32, (2, 8)),))


def test_load_errors(tmp_path):
    with pytest.raises(graphprune.LoadError, match="not a saved graphprune model"):
        graphprune.load(tmp_path)
    model, _, _ = analysed("llama_gqa")
    small = graphprune.compile(model, ratio=0.5, progress=False)
    small.save(tmp_path / "m")
    pt2 = tmp_path / "m" / "model.pt2"
    pt2.write_bytes(pt2.read_bytes()[: pt2.stat().st_size // 2])  # truncate
    with pytest.raises(graphprune.LoadError, match="corrupt or truncated"):
        graphprune.load(tmp_path / "m")


def test_custom_pass_is_written_like_a_builtin():
    @graphprune.register_pass("reverse_index")
    class ReverseIndex(graphprune.ScoringPass):
        """Keeps the units with the highest index (a pass whose choice is easy to check)."""

        @dataclass(frozen=True)
        class Config:
            offset: float = 0.0

        def score(self, ctx):
            return {g.name: torch.arange(g.size, dtype=torch.float32) + self.config.offset for g in ctx.groups}

    try:
        assert "reverse_index" in graphprune.available_passes()
        model, _, _ = analysed("llama_mha")
        small = graphprune.compile(model, ratio=0.5, method="reverse_index", offset=1.0, progress=False)
        for g in small.plan.groups:
            assert g.keep == list(range(g.size - len(g.keep), g.size))
        with pytest.raises(graphprune.GraphpruneError, match="options are"):
            graphprune.compile(model, method="reverse_index", bogus=1, progress=False)
    finally:
        PASSES.pop("reverse_index", None)


def test_unknown_method_lists_available():
    model, _, _ = analysed("llama_mha")
    with pytest.raises(graphprune.GraphpruneError, match="available"):
        graphprune.compile(model, method="nope", progress=False)


def test_magnitude_ranks_planted_units():
    """A channel whose weights are scaled to zero is removed first; a dominant one is kept."""
    model, _, _ = analysed("llama_gqa")
    planted = planted_mlp(model, factor=100)
    small = graphprune.compile(planted, ratio=0.3, progress=False)
    keep = next(g.keep for g in small.plan.groups if g.name == "model.layers.0.mlp:channels")
    assert 3 not in keep and 5 in keep


def test_meta_weights_cannot_be_scored_but_a_plan_prunes_them():
    import zoo

    real, _, _ = analysed("llama_gqa")
    plan = graphprune.compile(real, ratio=0.5, progress=False).plan
    with torch.device("meta"):
        meta = zoo.ALL["llama_gqa"]()
    with pytest.raises(graphprune.GraphpruneError, match="meta device"):
        graphprune.compile(meta, ratio=0.5, progress=False)
    small = graphprune.compile(meta, plan=plan, progress=False)
    assert small.num_parameters() == plan.params_after


def test_a_model_that_cannot_trace_at_its_position_limit_is_traced_one_token_below(tmp_path):
    """OpenAI-GPT slices its 128-row causal-mask buffer by the sequence length: torch.export then
    guards seq != 128, which the range up to the limit violates. The graph takes up to 127 tokens,
    says so, and keeps that bound through save/load."""
    import transformers

    torch.manual_seed(0)
    model = transformers.OpenAIGPTLMHeadModel(
        transformers.OpenAIGPTConfig(vocab_size=128, n_positions=128, n_embd=64, n_layer=2, n_head=4)).eval()
    with pytest.warns(UserWarning, match="traces only below its position limit: the graph takes sequences of up to 127"):
        small = graphprune.compile(model, 0.3, progress=False)
    assert graphprune.verify(small).ok
    again = graphprune.load(small.save(tmp_path / "gpt", hf=False, plot=False))
    assert again.dynamic_shapes["input_ids"][1].max == 127
    ids = torch.randint(0, 128, (2, 127))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, small(input_ids=ids).logits)


def test_a_module_with_a_position_buffer_is_traced_up_to_its_length():
    """Meta's Llama code slices a precomputed buffer of rotary angles (64 positions here) by the
    sequence length: torch.export bounds the sequence by it, and the trace takes that bound."""
    import zoo

    model = zoo.ALL["complex_rope"]()
    with pytest.warns(UserWarning, match="ComplexRopeLM takes sequences of up to 64 tokens"):
        small = graphprune.compile(model, 0.3, example_kwargs=zoo.example_inputs("complex_rope"), progress=False)
    assert small.dynamic_shapes["input_ids"][1].max == 64 and graphprune.verify(small).ok
    ids = torch.randint(0, 64, (2, 64))
    assert small(input_ids=ids).shape == (2, 64, 64)


def test_a_guard_torch_export_cannot_prove_becomes_a_runtime_check():
    """Aria's experts kernel makes torch.export guard s * min(64, 64 s) == 64 s: true for every length,
    but not provable, so a dynamic sequence fails; traced with the check deferred, every length runs."""
    import zoo

    model = zoo.ALL["aria"]()
    with pytest.warns(UserWarning, match=r"AriaTextForCausalLM: torch.export could not prove .*min\(64.* the graph checks it when it runs"):
        small = graphprune.compile(model, 0.3, kinds=("heads", "channels", "experts"), progress=False)
    assert graphprune.verify(small).ok and any(g.kind == "experts" for g in small.plan.groups)
    ids = torch.randint(0, 128, (3, 50))
    with torch.no_grad():
        assert small(input_ids=ids, use_cache=False).logits.shape == (3, 50, 128)
    assert small.export_program() is not None  # the pruned graph re-exports (ONNX, .pt2) with the same check


def test_a_trace_failure_of_a_model_without_a_position_limit_is_not_read_as_one():
    from graphprune.trace import _bounded_at_limit

    exc = RuntimeError("Constraints violated (seq)! ... generated guard L['input_ids'].size()[1] != 128.")
    assert _bounded_at_limit(exc, 128) and not _bounded_at_limit(exc, 64)
    assert not _bounded_at_limit(exc, None)  # no limit: the original error stands (no TypeError in its place)
