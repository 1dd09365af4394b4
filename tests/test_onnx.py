"""ONNX export and ONNX Runtime inference: parity, KV-cache decoding, generation, errors, dtypes.

The default run covers a GQA Llama and GPT-2 (Conv1D, learned positions), plus Phi-3 (fused qkv)
with a KV cache; the whole decoder matrix runs under ``-m slow``.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import zoo
from conftest import analysed, outputs

import graphprune
from graphprune import runtime
from graphprune.runtime import CPU, choose_provider

DEFAULT_ARCHS = ["llama_gqa", "gpt2", "phi3"]  # KV-cache tests; parity runs on the first two by default
DECODERS = sorted(n for n in zoo.ZOO if n != "bert")
SLOW_ARCHS = [n for n in DECODERS if n not in DEFAULT_ARCHS]
SHAPES = [(1, 4), (1, 11), (3, 4), (3, 11)]  # (batch, seq), all run on one exported file
TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


@functools.lru_cache(maxsize=None)
def compiled(name: str, ratio: float = 0.5):
    model, _, _ = analysed(name)
    return graphprune.compile(model, ratio, example_kwargs=zoo.example_inputs(name), progress=False)


@functools.lru_cache(maxsize=None)
def session(path: str) -> graphprune.OnnxSession:
    return graphprune.OnnxSession.open(path, quiet=True)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


class Exports:
    """Each (model, variant) exported once per module run and shared by the tests that read it."""

    def __init__(self, folder):
        self.folder, self.paths = folder, {}

    def __call__(self, name: str, variant: str = "pruned", **options):
        key = (name, variant, tuple(sorted(options.items())))
        if key not in self.paths:
            path = self.folder / f"{name}-{variant}-{len(self.paths)}.onnx"
            if variant == "dense":  # any traced graph exports, not only compiled ones
                self.paths[key] = graphprune.export_onnx(analysed(name)[1], path, **options)
            else:
                self.paths[key] = compiled(name).export_onnx(path, cache=variant == "kv", **options)
        return self.paths[key]


@pytest.fixture(scope="module")
def exports(onnx_dir):
    return Exports(onnx_dir)


def _ids(name: str, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, zoo._vocab_size(name), (batch, seq), generator=gen)


def _logits(module, ids: torch.Tensor) -> np.ndarray:
    names = [n.name for n in module.graph.nodes if n.op == "placeholder"]
    kwargs = {"input_ids": ids, **({"use_cache": False} if "use_cache" in names else {})}
    with torch.no_grad():
        return outputs(module(**kwargs))[0].numpy()


def _torch_greedy(module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: greedy decoding with the pruned PyTorch graph, re-run on the whole sequence."""
    for _ in range(n):
        ids = torch.cat([ids, torch.from_numpy(_logits(module, ids)[:, -1].argmax(-1))[:, None]], 1)
    return ids


def _cached_logits(sess: graphprune.OnnxSession, ids: torch.Tensor, prompt: int) -> np.ndarray:
    """Logits of every position: prefill ``prompt`` tokens, then feed the rest one at a time."""
    feeds = {"input_ids": ids[:, :prompt].numpy(), **sess.empty_past(ids.shape[0])}
    out = sess.run(feeds)
    logits = [out["logits"]]
    for i in range(prompt, ids.shape[1]):
        feeds = {"input_ids": ids[:, i:i + 1].numpy()}
        feeds.update({"past_key_values." + k[len("present."):]: v for k, v in out.items() if k.startswith("present.")})
        out = sess.run(feeds)
        logits.append(out["logits"])
    return np.concatenate(logits, axis=1)


# ================================================================ parity
def check_parity(name: str, pruned: bool, exports) -> None:
    if pruned:
        module = compiled(name).module
        # (GPT-OSS: heads only by default, its expert channels are frozen: gate and up interleaved)
        assert compiled(name).report.achieved_ratio > (0.1 if name == "gpt_oss" else 0.3)
    else:
        module = analysed(name)[1].module
    sess = session(str(exports(name, "pruned" if pruned else "dense")))
    assert sess.provider == CPU and not sess.has_cache
    for batch, seq in SHAPES:
        ids = _ids(name, batch, seq)
        got = sess.run({"input_ids": ids})[sess.output_names[0]]  # a plain module's output has no "logits" name
        want = _logits(module, ids)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL, (name, pruned, batch, seq)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned50"])
@pytest.mark.parametrize("name", DEFAULT_ARCHS[:2])
def test_onnx_runtime_matches_pytorch(name, pruned, exports):
    check_parity(name, pruned, exports)


@pytest.mark.slow
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned50"])
@pytest.mark.parametrize("name", DEFAULT_ARCHS[2:] + SLOW_ARCHS + ["bert"] + sorted(zoo.HANDWRITTEN))
def test_onnx_runtime_matches_pytorch_matrix(name, pruned, exports):
    if name == "bert":  # encoder: its extra inputs are fed too
        module = compiled(name).module if pruned else analysed(name)[1].module
        kwargs = zoo.example_inputs(name, batch=3, seq=7)
        got = session(str(exports(name, "pruned" if pruned else "dense"))).run(kwargs)["logits"]
        with torch.no_grad():
            want = outputs(module(**kwargs))[0].numpy()
        assert np.abs(got - want).max() <= TOL
        return
    check_parity(name, pruned, exports)


# ================================================================ KV cache
def check_cache(name: str, exports) -> None:
    small = compiled(name)
    sess = session(str(exports(name, "kv")))
    assert sess.has_cache and sess.num_layers == small.source.config.num_hidden_layers
    ids = _ids(name, 2, 9, seed=1)
    want = _logits(small.module, ids)  # the pruned graph without a cache
    got = _cached_logits(sess, ids, prompt=5)
    assert np.abs(got - want).max() <= TOL, name
    prompt = ids[:, :4]
    assert torch.equal(graphprune.generate(sess, prompt, 6), _torch_greedy(small.module, prompt, 6)), name


@pytest.mark.parametrize("name", DEFAULT_ARCHS)
def test_cached_decoding_equals_uncached_and_greedy_tokens_match(name, exports):
    check_cache(name, exports)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_ARCHS)
def test_cached_decoding_matrix(name, exports):
    check_cache(name, exports)


def test_cache_has_pruned_head_counts_and_model_is_untouched():
    model, _, _ = analysed("llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = compiled("llama_gqa")
    graph = graphprune.cached_graph(small)
    kept = {g.name: len(g.keep) for g in small.plan.groups if g.kind == "heads"}
    assert [h for h, _ in graph.layout.key_shapes] == [kept[f"model.layers.{i}.self_attn:heads"] for i in range(2)]
    assert all(h < model.config.num_key_value_heads for h, _ in graph.layout.key_shapes)
    ids = _ids("llama_gqa", 2, 6)
    with torch.no_grad():
        logits, past = graph(ids)
    assert np.abs(logits.numpy() - _logits(small.module, ids)).max() <= 1e-5
    assert [tuple(k.shape) for k, _ in past] == [(2, h, 6, d) for h, d in graph.layout.key_shapes]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_io_binding_and_sampling(exports):
    sess = session(str(exports("llama_gqa", "kv")))
    prompt = _ids("llama_gqa", 3, 5, seed=2)
    greedy = graphprune.generate(sess, prompt, 8)
    assert torch.equal(graphprune.generate(sess, prompt, 8, io_binding=True), greedy)
    assert torch.equal(graphprune.generate(sess, prompt, 8, do_sample=True, top_k=1, seed=3), greedy)
    a = graphprune.generate(sess, prompt, 8, do_sample=True, temperature=2.0, top_p=0.9, seed=7)
    b = graphprune.generate(sess, prompt, 8, do_sample=True, temperature=2.0, top_p=0.9, seed=7, io_binding=True)
    assert torch.equal(a, b) and a.shape == (3, 13) and int(a.max()) < zoo._vocab_size("llama_gqa")
    assert not torch.equal(a, greedy)  # at temperature 2 over 128 tokens, 24 draws all equal to argmax is ~impossible
    eos = int(greedy[0, 6])  # the first row emits this token at its 2nd new position
    stopped = graphprune.generate(sess, prompt[:1], 8, eos_token_id=eos)
    assert stopped.shape[1] <= 7 and int(stopped[0, -1]) == eos


def test_generate_checks_its_inputs(exports):
    sess = session(str(exports("llama_gqa", "kv")))
    vocab, limit = zoo._vocab_size("llama_gqa"), 128
    assert sess.facts == {"max_position_embeddings": limit, "vocab_size": vocab}  # recorded by the export
    prompt = _ids("llama_gqa", 2, 5, seed=4)
    greedy = graphprune.generate(sess, prompt, 4)
    assert torch.equal(graphprune.generate(sess, prompt, 4, temperature=0), greedy)  # greedy reads no temperature
    ones = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}  # a tokenizer's output, unpadded
    assert torch.equal(graphprune.generate(sess, ones, 4), greedy)
    bad = [
        (compiled("llama_gqa"), prompt, 4, "runs an ONNX model, not a CompiledModel"),
        (sess, {"input_ids": prompt, "attention_mask": torch.tensor([[0, 1, 1, 1, 1], [1] * 5])}, 4, "padded"),
        (sess, [[1, 2, 3], [1, 2]], 4, r"different lengths \[2, 3\]"),
        (sess, torch.tensor([[1, vocab]]), 4, "vocabulary"),
        (sess, torch.tensor([[1, -3]]), 4, "vocabulary"),
        (sess, torch.rand(2, 3), 4, "integer token ids"),
        (sess, torch.zeros(0, 3, dtype=torch.long), 4, "batch, prompt_len >= 1"),
        (sess, [], 4, "batch, prompt_len >= 1"),
        (sess, prompt, limit - 4, "limit of 128 positions"),
    ]
    for target, ids, n, words in bad:
        with pytest.raises(graphprune.GraphpruneError, match=words):
            graphprune.generate(target, ids, n)


def test_evaluation_reads_an_exports_limit_and_runs_a_cached_export(exports):
    from graphprune.evaluate import LogitsRunner

    plain, cached = session(str(exports("llama_gqa"))), session(str(exports("llama_gqa", "kv")))
    assert LogitsRunner(plain).max_length() == LogitsRunner(cached).max_length() == 128
    gpt2 = session(str(exports("gpt2")))  # its config calls the limit n_positions
    assert LogitsRunner(gpt2).max_length() == analysed("gpt2")[0].config.n_positions
    ids = _ids("llama_gqa", 2, 9)
    # a KV-cache export is evaluated as its own prefill, with an empty past: the same logits
    assert np.abs(LogitsRunner(cached)(ids).numpy() - LogitsRunner(plain)(ids).numpy()).max() < 1e-4


# ================================================================ errors, fallbacks
@torch.library.custom_op("graphprune_test::scramble", mutates_args=())
def scramble(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) * 2


@scramble.register_fake
def _(x):
    return torch.empty_like(x)


class Scrambler(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.ops.graphprune_test.scramble(self.up(x)))


def test_unexportable_op_raises_export_error_naming_it_and_leaves_no_file(tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(graphprune.ExportError, match=r"graphprune_test\.scramble"):
        graphprune.export_onnx(Scrambler(), target, example_kwargs={"x": torch.randn(2, 3, 8)})
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp folder
    target.write_bytes(b"an earlier export")
    with pytest.raises(graphprune.ExportError):
        graphprune.export_onnx(Scrambler(), target, example_kwargs={"x": torch.randn(2, 3, 8)})
    assert target.read_bytes() == b"an earlier export" and list(tmp_path.iterdir()) == [target]


# ================================================================ complex values
class _ComplexOps(nn.Module):
    """Each complex op the export rewrites as real pairs, with negative dims and a complex buffer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("turn", torch.polar(torch.ones(4), torch.linspace(0, 3, 4)), persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        z = torch.view_as_complex(self.proj(x).reshape(b, s, 4, 2))  # [b, s, 4] complex
        w = torch.polar(x[..., :4].abs() + 1, x[..., 4:]) * 0.5  # polar, times a number
        z = (z * w + z * self.turn).unsqueeze(-2).transpose(-1, -2)  # complex x complex, a buffer, dims < 0
        z = torch.cat([z, z.conj()], dim=-1).permute(0, 2, 1, 3).reshape(b, 4, s * 2)
        z = (z - z / x[:, :1, :1]).to(torch.complex64)  # divided by a real tensor
        return torch.view_as_real(z).flatten(-2) + z.real.sum(-1, keepdim=True) - z.imag.sum(-1, keepdim=True)


def test_complex_values_export_as_real_pairs(tmp_path):
    from graphprune.complex_ops import has_complex, lower_complex

    model, x = _ComplexOps().eval(), torch.randn(2, 5, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},))
    lowered = lower_complex(program.module())
    assert not has_complex(lowered) and not any(n.target == torch.ops.aten.view_as_complex.default for n in lowered.graph.nodes)
    y = torch.randn(3, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(lowered(y), model(y), rtol=1e-5, atol=1e-5)
    path = graphprune.export_onnx(model, tmp_path / "c.onnx", example_kwargs={"x": x}, progress=False)
    (got,) = session(str(path)).run({"x": y}).values()
    assert np.abs(got - model(y).detach().numpy()).max() < 1e-4


def test_complex_rotary_model_pruned_runs_in_onnx_runtime(tmp_path):
    """Rotary embeddings in complex numbers (Meta's Llama code): pruned by heads, rotary pairs and channels, exported."""
    model, _, _ = analysed("complex_rope")
    small = graphprune.compile(model, 0.5, kinds=("heads", "head_dim", "channels"),
                               example_kwargs=zoo.example_inputs("complex_rope"), progress=False)
    assert {g.kind for g in small.plan.groups} >= {"heads", "head_dim"} and graphprune.verify(small).ok
    sess = session(str(small.export_onnx(tmp_path / "rope.onnx", progress=False)))
    for batch, seq in SHAPES:
        ids = _ids("complex_rope", batch, seq)
        got = sess.run({"input_ids": ids})[sess.output_names[0]]
        assert np.abs(got - _logits(small.module, ids)).max() <= TOL


class _ComplexMatmul(nn.Module):
    def forward(self, x):
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(z @ z.transpose(-1, -2)).flatten(-2)


def test_a_complex_op_without_a_real_form_is_named(tmp_path):
    with pytest.raises(graphprune.ExportError, match=r"no real-valued form of aten\.matmul\.default on complex values \(node matmul\)"):
        graphprune.export_onnx(_ComplexMatmul(), tmp_path / "m.onnx", example_kwargs={"x": torch.randn(2, 3, 4)}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(graphprune.ExportError, match="example_kwargs"):
        graphprune.export_onnx(nn.Linear(3, 3), tmp_path / "x.onnx")
    with pytest.raises(graphprune.ExportError, match="bfloat16"):
        graphprune.export_onnx(nn.Linear(3, 3), tmp_path / "x.onnx", dtype="bf16", example_kwargs={"input": torch.randn(2, 3)})
    with pytest.raises(graphprune.GraphpruneError, match="no ONNX model"):
        graphprune.OnnxSession.open(tmp_path / "missing.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_non_hf_model_has_no_cache_export_but_generates_uncached(onnx_dir):
    small = compiled("fused_qkv_attn")
    with pytest.raises(graphprune.ExportError, match="not a Hugging Face model.*without a cache"):
        small.export_onnx(onnx_dir / "fused-kv.onnx", cache=True)
    assert not (onnx_dir / "fused-kv.onnx").exists()
    sess = session(str(small.export_onnx(onnx_dir / "fused.onnx")))
    prompt = _ids("fused_qkv_attn", 2, 3)
    with pytest.warns(UserWarning, match="no KV-cache inputs"):
        out = graphprune.generate(sess, prompt, 4)
    assert torch.equal(out, _torch_greedy(small.module, prompt, 4))


def test_provider_choice_is_reported(capsys, exports):
    provider, why = choose_provider()
    import onnxruntime as ort

    assert provider == ("CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers() else CPU)
    assert why
    with pytest.raises(graphprune.GraphpruneError, match="NoSuchExecutionProvider"):
        choose_provider("NoSuchExecutionProvider")
    runtime._ANNOUNCED.clear()  # said once per process: another test may have opened one already
    graphprune.OnnxSession.open(exports("gpt2"))
    assert f"on {provider}" in capsys.readouterr().err


# ================================================================ dtypes, external data
def test_float16_export_runs_on_cpu_and_stays_close(exports):
    small = compiled("llama_gqa")
    p32, p16 = exports("llama_gqa"), exports("llama_gqa", dtype="float16")
    assert _float_weight_bytes(p16) < 0.55 * _float_weight_bytes(p32)
    ids = _ids("llama_gqa", 2, 7)
    want = _logits(small.module, ids)
    got = session(str(p16)).run({"input_ids": ids})["logits"]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want).max() <= 1e-2 * max(1.0, np.abs(want).max())


@pytest.mark.slow
def test_float16_cached_export_generates(exports):
    ids = _ids("llama_gqa", 2, 3)
    kv16 = session(str(exports("llama_gqa", "kv", dtype="float16")))
    assert kv16.empty_past(1)["past_key_values.0.key"].dtype == np.float16
    assert graphprune.generate(kv16, ids, 3).shape == (2, 6)


def _float_weight_bytes(path) -> int:
    import onnx

    model = onnx.load(str(path))
    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
    return sum(int(np.prod(t.dims)) * sizes[t.data_type] for t in model.graph.initializer if t.data_type in sizes)


def test_external_data_is_written_atomically_and_cleaned_up(tmp_path):
    small = compiled("gpt2")
    target = tmp_path / "m.onnx"
    small.export_onnx(target, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    ids = _ids("gpt2", 2, 5)
    ort_out = graphprune.OnnxSession.open(target, quiet=True).run({"input_ids": ids})["logits"]
    assert np.abs(ort_out - _logits(small.module, ids)).max() <= TOL
    small.export_onnx(target)  # weights inline now: the stale side file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ================================================================ dimension names
def _dims(values) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _all_dim_params(model) -> set[str]:
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    return {d.dim_param for v in values for d in v.type.tensor_type.shape.dim if d.dim_param}


def test_dynamic_dims_have_readable_names_and_files_still_run(exports):
    import onnx

    vocab = zoo._vocab_size("llama_gqa")
    dense = onnx.load(str(exports("llama_gqa", "dense")))
    onnx.checker.check_model(dense)
    assert _dims(dense.graph.input) == {"input_ids": ["batch", "sequence"]}
    assert _dims(dense.graph.output) == {"logits": ["batch", "sequence", vocab]}
    names = _all_dim_params(dense)
    assert {"batch", "sequence"} <= names and not any(re.search(r"\bs\d+\b", n) for n in names), names
    sess = session(str(exports("llama_gqa", "dense")))
    for batch, seq in [(1, 4), (3, 11)]:
        assert sess.run({"input_ids": _ids("llama_gqa", batch, seq)})["logits"].shape == (batch, seq, vocab)

    kv_path = exports("llama_gqa", "kv")
    kv = onnx.load(str(kv_path))
    onnx.checker.check_model(kv)
    layout = graphprune.cached_graph(compiled("llama_gqa")).layout
    heads, size = [h for h, _ in layout.key_shapes], layout.key_shapes[0][1]
    inputs, outputs = _dims(kv.graph.input), _dims(kv.graph.output)
    assert inputs["input_ids"] == ["batch", "sequence"] and outputs["logits"] == ["batch", "sequence", vocab]
    for i in range(layout.num_layers):
        assert inputs[f"past_key_values.{i}.key"] == ["batch", heads[i], "past_sequence", size]
        assert outputs[f"present.{i}.value"] == ["batch", heads[i], "total_sequence", size]
    assert not any(re.search(r"\bs\d+\b", n) for n in _all_dim_params(kv))
    sess = session(str(kv_path))
    for batch, past, seq in [(1, 0, 4), (3, 2, 5)]:
        feeds = {"input_ids": _ids("llama_gqa", batch, seq).numpy()}
        for name, empty in sess.empty_past(batch).items():
            b, h, _, d = empty.shape
            feeds[name] = np.random.default_rng(0).standard_normal((b, h, past, d)).astype(empty.dtype)
        out = sess.run(feeds)
        assert out["logits"].shape == (batch, seq, vocab)
        assert out["present.1.key"].shape == (batch, heads[1], past + seq, size)


def test_dim_names_follow_the_dynamic_shapes_given(tmp_path):
    import onnx
    from torch.export import Dim

    x = torch.randn(2, 3, 8)
    default = onnx.load(str(graphprune.export_onnx(nn.Linear(8, 4), tmp_path / "a.onnx", example_kwargs={"input": x})))
    assert _dims(default.graph.input)["input"] == ["batch", "sequence", 8]
    rows = onnx.load(str(graphprune.export_onnx(nn.Linear(8, 4), tmp_path / "b.onnx", example_kwargs={"input": x},
                                                dynamic_shapes={"input": {0: Dim("rows")}})))
    assert _dims(rows.graph.input)["input"] == ["rows", 3, 8]
    assert [d.dim_param or d.dim_value for d in rows.graph.output[0].type.tensor_type.shape.dim] == ["rows", 3, 4]


def test_rename_dim_substitutes_whole_symbols_and_names_past_plus_new():
    from graphprune.export import rename_dim

    names = {"s17": "past_sequence", "s70": "sequence", "s7": "batch"}
    assert rename_dim("s17 + s70", names) == "total_sequence"
    assert rename_dim("s70 + s17", names) == "total_sequence"
    assert rename_dim("s70 + 1", names) == "sequence + 1"
    assert rename_dim("2*s7", names) == "2*batch"
    assert rename_dim("s170", names) == "s170"  # a different symbol, not a prefix match


# ================================================================ optional fusions
def _op_counts(path) -> dict[str, int]:
    import collections

    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("variant", ["pruned", "kv"])
def test_optimize_fuses_rms_norms_and_keeps_parity(variant, exports):
    small = compiled("llama_gqa")
    plain, fused = exports("llama_gqa", variant), exports("llama_gqa", variant, optimize=True)
    layers = small.source.config.num_hidden_layers
    ops, plain_ops = _op_counts(fused), _op_counts(plain)
    # every RMSNorm fused: one per sub-block plus the final one; all but the first follow a residual add
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 2 * layers + 1
    assert ops["SkipSimplifiedLayerNormalization"] >= 1 and ops["ReduceMean"] == 0 < plain_ops["ReduceMean"]
    recorded = graphprune.export.fusions(fused)
    assert recorded and all(ops[op] - plain_ops[op] == n for op, n in recorded.items())
    assert graphprune.export.fusions(plain) == {}
    sess = session(str(fused))
    if variant == "pruned":
        for batch, seq in [(1, 4), (3, 11)]:
            ids = _ids("llama_gqa", batch, seq)
            assert np.abs(sess.run({"input_ids": ids})["logits"] - _logits(small.module, ids)).max() <= TOL
    else:
        ids = _ids("llama_gqa", 2, 9, seed=1)
        assert np.abs(_cached_logits(sess, ids, prompt=5) - _logits(small.module, ids)).max() <= TOL
        prompt = ids[:, :4]
        assert torch.equal(graphprune.generate(sess, prompt, 6), _torch_greedy(small.module, prompt, 6))


@pytest.mark.slow
def test_optimize_float16_keeps_fusions_and_generates(exports):
    path = exports("llama_gqa", "kv", optimize=True, dtype="float16")
    assert _op_counts(path)["SkipSimplifiedLayerNormalization"] >= 1 and graphprune.export.fusions(path)
    sess = session(str(path))
    assert sess.empty_past(1)["past_key_values.0.key"].dtype == np.float16
    assert graphprune.generate(sess, _ids("llama_gqa", 2, 3), 3).shape == (2, 6)


def _break_weights(fuse):
    """An optimizer that fuses, then scales the first matrix it finds: a wrong result."""
    def broken(path):
        from onnx import numpy_helper

        model = fuse(path)
        weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
        return model
    return broken


def _raise(path):
    raise KeyError("no such node")


@pytest.mark.parametrize("how, message", [
    ("broken", r"outputs differ from the plain model's by \S+ \(> [0-9.e-]+\)"),
    ("raises", r"ONNX Runtime's optimizer failed: KeyError"),
    ("threshold", r"outputs differ from the plain model's by \S+ \(> -[0-9.e-]+\)"),
])
def test_optimize_keeps_the_plain_file_and_warns_when_parity_fails(how, message, tmp_path, monkeypatch, exports):
    from graphprune import export

    if how == "broken":
        monkeypatch.setattr(export, "_fuse", _break_weights(export._fuse))
    elif how == "raises":
        monkeypatch.setattr(export, "_fuse", _raise)
    else:
        monkeypatch.setattr(export, "PARITY_TOL", -1.0)
        monkeypatch.setattr(export, "PARITY_REL", -1.0)
    small = compiled("llama_gqa")
    target = tmp_path / "m.onnx"
    with pytest.warns(UserWarning, match=f"kept the unoptimized model: .*{message}"):
        small.export_onnx(target, optimize=True)
    assert list(tmp_path.iterdir()) == [target]  # no temp folder, no fused leftovers
    ops = _op_counts(target)
    assert ops["SimplifiedLayerNormalization"] == ops["SkipSimplifiedLayerNormalization"] == 0 < ops["ReduceMean"]
    assert export.fusions(target) == {}
    ids = _ids("llama_gqa", 2, 5)
    got = graphprune.OnnxSession.open(target, quiet=True).run({"input_ids": ids})["logits"]
    assert np.abs(got - _logits(small.module, ids)).max() <= TOL
    plain = session(str(exports("llama_gqa")))
    assert np.array_equal(got, plain.run({"input_ids": ids})["logits"])


def test_cli_export_optimize_reports_fusions(tmp_path, capsys):
    import json

    from graphprune import cli

    folder = tmp_path / "small"
    compiled("llama_gqa").save(folder, hf=False, plot=False)
    assert cli.main(["export", str(folder), "--onnx", "--optimize", "--json", "-q"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out[out.index("{"):])
    assert data["fusions"] == graphprune.export.fusions(folder / "model.onnx")
    assert data["fusions"].get("SkipSimplifiedLayerNormalization", 0) >= 1


def test_optimize_with_external_data_moves_the_fused_weights_into_place(tmp_path):
    small = compiled("llama_gqa")
    target = tmp_path / "m.onnx"
    small.export_onnx(target, external_data=True, optimize=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert graphprune.export.fusions(target)
    ids = _ids("llama_gqa", 2, 5)
    got = graphprune.OnnxSession.open(target, quiet=True).run({"input_ids": ids})["logits"]
    assert np.abs(got - _logits(small.module, ids)).max() <= TOL
