"""Reconstruction: the layers that lose inputs are refit by least squares on calibration data."""
import warnings

import pytest
import torch
import torch.nn as nn
import zoo
from conftest import ARCHS, analysed, fresh_inputs, outputs

import graphprune
from graphprune.analysis.walk import fetch_attr
from graphprune.reconstruct import layers_to_refit, reconstruct_weights

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyLM(nn.Module):
    """ids -> embedding -> up -> relu -> down (+ bias) -> head: one MLP whose channels can go."""

    def __init__(self, vocab=50, hidden=8, width=24, bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=bias)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def ids(n=16, seq=12, vocab=50, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def dense_kept_hidden(model, tokens, keep):
    with torch.no_grad():
        h = model.embed(tokens)
        x = torch.relu(model.up(h)).reshape(-1, model.up.out_features).double()
    return x, x[:, keep]


def refit_half(model, tokens):
    """Half of ``model``'s MLP channels cut by magnitude, then refit (almost no damping) on ``tokens``:
    (the refit, the kept-channel mask)."""
    small = graphprune.compile(model, 0.5, method="magnitude", kinds=["channels"], progress=False,
                               example_kwargs={"input_ids": tokens[:2]})
    keep = torch.zeros(24, dtype=torch.bool)
    keep[torch.as_tensor(small.plan.groups[0].keep)] = True
    return reconstruct_weights(small.dg, small.plan, tokens, damp=1e-9), keep


@pytest.mark.parametrize("bias", [True, False])
def test_refit_equals_least_squares_by_hand(bias):
    model = TinyLM(bias=bias)
    tokens = ids()
    done, keep = refit_half(model, tokens)
    # by hand: the kept inputs (and a constant for the bias) that best give the dense layer's output
    x, xk = dense_kept_hidden(model, tokens, keep)
    w = model.down.weight.double()
    target = x @ w.T + (model.down.bias.double() if bias else 0)
    design = torch.cat([xk, torch.ones(len(xk), 1, dtype=xk.dtype)], 1) if bias else xk
    solution = torch.linalg.lstsq(design, target).solution.T  # [out, kept(+1)]
    got = done.weights["down.weight"][:, keep].double()
    assert torch.allclose(got, solution[:, : int(keep.sum())], atol=1e-4)
    if bias:
        assert torch.allclose(done.weights["down.bias"].double(), solution[:, -1], atol=1e-4)
    assert torch.equal(done.weights["down.weight"][:, ~keep], model.down.weight[:, ~keep])  # removed columns: untouched (sliced away)
    before, after = done.errors[next(iter(done.errors))]
    assert after < before


def test_the_reported_error_is_that_of_the_stored_weights_in_their_dtype():
    model = TinyLM().to(torch.bfloat16)  # bf16 rounding moves the refit weights by about 0.4%
    tokens = ids()
    done, keep = refit_half(model, tokens)
    assert done.weights["down.weight"].dtype == torch.bfloat16
    x, xk = dense_kept_hidden(model, tokens, keep)
    ones = torch.ones(len(x), 1, dtype=x.dtype)
    w = torch.cat([model.down.weight.detach().double(), model.down.bias.detach().double()[:, None]], 1)
    v = torch.cat([done.weights["down.weight"][:, keep].double(), done.weights["down.bias"].double()[:, None]], 1)
    target = torch.cat([x, ones], 1) @ w.T
    direct = float((target - torch.cat([xk, ones], 1) @ v.T).square().sum() / target.square().sum())
    _, after = done.errors["down.weight"]
    assert after == pytest.approx(direct, rel=1e-6)


def test_damp_pulls_towards_the_kept_weights():
    model = TinyLM()
    small = graphprune.compile(model, 0.5, method="magnitude", kinds=["channels"], progress=False,
                               example_kwargs={"input_ids": ids()[:2]})
    keep = torch.as_tensor(small.plan.groups[0].keep)
    moved = {}
    for damp in (1e-3, 1e3):
        w = reconstruct_weights(small.dg, small.plan, ids(), damp=damp).weights["down.weight"][:, keep]
        moved[damp] = (w - model.down.weight[:, keep]).norm()
    assert moved[1e3] < 0.01 * moved[1e-3]


def test_compile_with_reconstruct_is_closer_to_dense_and_verifies(tmp_path):
    model, traced, _ = analysed("llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vocab = fetch_attr(traced.module, "model.embed_tokens.weight").shape[0]
    calib = torch.randint(0, vocab, (4000,), generator=torch.Generator().manual_seed(0))  # a stream: windows drawn
    plain = graphprune.compile(model, 0.5, method="magnitude", progress=False)
    refit = graphprune.compile(model, 0.5, method="magnitude", calib=calib, reconstruct={"n_samples": 96},
                               seq_len=16, progress=False)
    assert refit.plan.to_dict()["groups"] == plain.plan.to_dict()["groups"]
    r = refit.report.reconstruction
    assert r["layers"] > 0 and r["mean_error_refit"] < r["mean_error_sliced"] and r["samples"] == 96
    assert "reconstruct" in refit.report.seconds and "reconstruction" in str(refit.report)
    assert graphprune.verify(refit).ok  # pruned == masked dense, with the refit weights
    # closer to the dense model than plain slicing, on inputs it was not fit on
    kwargs = fresh_inputs("llama_gqa", traced, 4, 16, seed=5)
    with torch.no_grad():
        dense, a, b = (outputs(m(**kwargs))[0] for m in (traced.module, plain.module, refit.module))
    assert (b - dense).norm() < (a - dense).norm()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller untouched
    hf = refit.to_hf()  # the module-level copy carries the refit weights (checked equal to the graph inside)
    name = next(n for n in r["errors"] if n.endswith("down_proj.weight"))
    assert torch.equal(hf.get_parameter(name), fetch_attr(refit.module, name))
    loaded = graphprune.load(refit.save(tmp_path / "refit", plot=False))
    assert loaded.report.reconstruction == r
    assert torch.allclose(outputs(loaded(**kwargs))[0], b, atol=1e-5)


def test_reconstruct_after_compile_equals_reconstruct_in_compile():
    model, traced, _ = analysed("llama_gqa")
    vocab = fetch_attr(traced.module, "model.embed_tokens.weight").shape[0]
    calib = torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    plain = graphprune.compile(model, 0.5, method="magnitude", progress=False)
    later = graphprune.reconstruct(plain, calib, progress=False)
    inside = graphprune.compile(model, 0.5, method="magnitude", calib=calib, reconstruct=True, progress=False)
    kwargs = fresh_inputs("llama_gqa", traced, 2, 9)
    assert torch.allclose(outputs(later(**kwargs))[0], outputs(inside(**kwargs))[0], atol=1e-5)
    assert plain.report.reconstruction == {}  # the input is not changed
    with pytest.raises(graphprune.GraphpruneError, match="refit already"):
        graphprune.reconstruct(later, calib)


def test_tied_weights_are_not_refit():
    # hidden channels: every projection loses inputs; GPT-2's LM head is also its embedding table
    _, _, dg = analysed("gpt2")
    plan = graphprune.random_plan(dg, ["hidden"], 0.5, seed=0)
    names = {layer.weight for layer in layers_to_refit(dg, plan.leaf_keep(dg))}
    assert any(n.endswith("attn.c_attn.weight") for n in names)
    assert not any("wte" in n or "lm_head" in n for n in names)


def test_statistics_in_several_passes_give_the_same_refit():
    model, traced, dg = analysed("llama_gqa")
    vocab = fetch_attr(traced.module, "model.embed_tokens.weight").shape[0]
    calib = torch.randint(0, vocab, (6, 10), generator=torch.Generator().manual_seed(0))
    plan = graphprune.random_plan(dg, ["hidden", "heads", "channels"], 0.5, seed=1)  # q/k/v/gate/up share their input
    one = reconstruct_weights(dg, plan, calib, example_kwargs=traced.example_kwargs)
    many = reconstruct_weights(dg, plan, calib, example_kwargs=traced.example_kwargs, memory_mib=0)  # one layer per pass
    assert len(one.errors) >= 2 and set(one.weights) == set(many.weights)
    for name in one.weights:
        assert torch.allclose(one.weights[name], many.weights[name], atol=1e-5), name


def test_gpt2_conv1d_weights_stored_in_out_are_refit_by_least_squares_with_their_bias():
    model, traced, dg = analysed("gpt2")
    vocab = fetch_attr(traced.module, "transformer.wte.weight").shape[0]
    calib = torch.randint(0, vocab, (8, 12), generator=torch.Generator().manual_seed(0))
    plan = graphprune.random_plan(dg, ["heads"], 0.5, seed=0)
    done = reconstruct_weights(dg, plan, calib, example_kwargs=traced.example_kwargs, damp=1e-9)
    name = next(n for n in done.errors if n.endswith("attn.c_proj.weight"))  # addmm(b, x, W), W [in, out], square
    layer = model.get_submodule(name.rsplit(".", 1)[0])
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=calib)
    hook.remove()
    x = seen[0]
    keep = next(lay.keep for lay in layers_to_refit(dg, plan.leaf_keep(dg)) if lay.weight == name)
    target = x @ layer.weight.double() + layer.bias.double()
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, target).solution  # [kept + 1, out]
    assert torch.allclose(done.weights[name][keep].double(), solution[:-1], atol=1e-3)  # rows are inputs here
    assert torch.allclose(done.weights[name.replace("weight", "bias")].double(), solution[-1], atol=1e-3)
    small = graphprune.compile(model, plan=plan, calib=calib, reconstruct={"damp": 1e-3}, progress=False,
                               example_kwargs=traced.example_kwargs)
    assert graphprune.verify(small).ok


def test_a_bias_two_layers_share_is_not_refit():
    class SharedBias(TinyLM):
        def __init__(self):
            super().__init__(bias=False)
            self.shared = nn.Parameter(torch.zeros(8))
            self.down2 = nn.Linear(24, 8, bias=False)

        def forward(self, input_ids):
            h = self.embed(input_ids)
            a = torch.relu(self.up(h))
            out = torch.nn.functional.linear(a, self.down.weight, self.shared) + torch.nn.functional.linear(a, self.down2.weight, self.shared)
            return self.head(h + out)

    small = graphprune.compile(SharedBias(), 0.5, method="magnitude", kinds=["channels"], progress=False,
                               example_kwargs={"input_ids": ids()[:2]})
    assert small.plan.groups and layers_to_refit(small.dg, small.plan.leaf_keep(small.dg)) == []


def test_ready_windows_are_used_as_given_with_a_warning_if_asked_for_another_count():
    model = TinyLM()
    windows = ids(n=5)
    with pytest.warns(UserWarning, match="uses the 5 calibration windows given, not n_samples=96"):
        small = graphprune.compile(model, 0.5, method="magnitude", kinds=["channels"], calib=windows,
                                   reconstruct={"n_samples": 96}, progress=False, example_kwargs={"input_ids": windows[:2]})
    assert small.report.reconstruction["samples"] == 5


def test_bad_options_and_missing_data_are_clear_errors():
    model, traced, _ = analysed("llama_gqa")
    with pytest.raises(graphprune.GraphpruneError, match="pass calib"):
        graphprune.compile(model, 0.5, reconstruct=True, progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="unknown option"):
        graphprune.compile(model, 0.5, calib=torch.zeros(2, 8, dtype=torch.long), reconstruct={"dampening": 1}, progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="True, False or a dict"):
        graphprune.compile(model, 0.5, calib=torch.zeros(2, 8, dtype=torch.long), reconstruct="yes", progress=False)
    small = graphprune.compile(model, 0.5, progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="no such text file"):
        graphprune.compile(model, 0.5, calib=torch.zeros(2, 8, dtype=torch.long), reconstruct={"calib": "/nope.txt"}, progress=False)
    with pytest.raises(graphprune.GraphpruneError, match="damp"):
        graphprune.reconstruct(small, torch.zeros(2, 8, dtype=torch.long), damp=0, progress=False)


def test_a_real_model_pruned_with_reconstruction_has_lower_perplexity_on_unseen_text(stories_dir, tmp_path):
    import gzip

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
    text = gzip.open(stories_dir.parents[1] / "tinystories" / "valid_head.txt.gz", "rt", encoding="utf-8").read()[:200_000]
    fit, held_out = tmp_path / "fit.txt", tmp_path / "held_out.txt"
    fit.write_text(text[:150_000])
    held_out.write_text(text[150_000:])
    common = dict(method="magnitude", kinds=["channels", "heads"], tokenizer=tok, progress=False)
    plain = graphprune.compile(model, 0.3, **common)
    refit = graphprune.compile(model, 0.3, calib=str(fit), seq_len=64, reconstruct={"n_samples": 256}, **common)

    def ppl(m):
        return graphprune.evaluate.perplexity(m, tok, str(held_out), seq_len=64, max_tokens=8192, progress=False).ppl

    dense, sliced, refitted = ppl(model), ppl(plain), ppl(refit)
    assert dense < refitted < sliced, (dense, refitted, sliced)
    assert refit.report.reconstruction["layers"] == 2 * model.config.num_hidden_layers  # o_proj and down_proj of each block


def test_non_finite_inputs_are_a_clear_error():
    model = TinyLM()
    small = graphprune.compile(model, 0.5, method="magnitude", kinds=["channels"], progress=False,
                               example_kwargs={"input_ids": ids()[:2]})
    with torch.no_grad():
        small.dg.gm.get_parameter("up.weight")[0, 0] = float("inf")  # the traced copy, not the caller's model
    with pytest.raises(graphprune.GraphpruneError, match="not finite"):
        reconstruct_weights(small.dg, small.plan, ids())


# in the default run: one of each way a layer is written (linear, Conv1D addmm, matmul with W.T), MoE, an encoder
FAST = {"llama_gqa", "gpt2", "falcon", "mixtral", "deepseek_v3", "bert"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ARCHS])
def test_every_architecture_refits_and_still_verifies(name):
    model, traced, dg = analysed(name)
    vocab = zoo._vocab_size(name)
    calib = torch.randint(0, vocab, (8, 12), generator=torch.Generator().manual_seed(0))
    kinds = [k for k in ("hidden", "heads", "channels", "experts") if any(g.kind == k for g in dg.groups)]
    plan = graphprune.random_plan(dg, kinds, 0.6, seed=0)
    small = graphprune.compile(model, plan=plan, calib=calib, reconstruct=True, progress=False, example_kwargs=traced.example_kwargs)
    r = small.report.reconstruction
    assert r["layers"] > 0 and r["mean_error_refit"] < r["mean_error_sliced"]
    assert graphprune.verify(small).ok
