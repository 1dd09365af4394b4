"""Tiny random-weight model zoo: the architecture test matrix for graphprune.

Every factory returns a freshly built, seeded, fp32, ``.eval()`` model that is
small enough (hidden 32-64, 2 layers, vocab <= 128) for ``torch.export`` to
finish in about a second on CPU.  Nothing is ever downloaded: Hugging Face
models are built from their ``transformers`` config classes.

Public surface
--------------
``ZOO``            name -> factory for Hugging Face models.
``HANDWRITTEN``    name -> factory for plain ``nn.Module`` models (non-HF code
                   paths: hand-written RMSNorm, ``chunk``-split fused QKV, ...).
``ALL``            union of the two.
``example_inputs`` kwargs to call a model with.
``export``         ``torch.export`` with dynamic batch/seq, as graphprune does.
``output_tensor``  pull the main tensor out of whatever ``forward`` returned.

Design notes
------------
* HF models come from one table (``_SPECS``) of (config class, model class,
  config kwargs) so that adding an architecture is one line.
* HF initialisation leaves every bias at 0 and every norm weight at 1 (or 0 for
  Gemma's ``1 + w`` norms).  A pruning bug that slices such a vector with the
  wrong indices would be invisible, so ``_perturb_vectors`` adds seeded noise
  to every 1-D parameter after construction.
* ``use_cache`` is forced off in the config *and* passed as ``use_cache=False``
  at export time, so no KV-cache object or ``past_key_values`` output is
  traced into the graph.  The kwarg survives only as an unused constant
  placeholder: ``ep.module()`` must be called with ``use_cache=False`` too
  (use ``call_kwargs``), otherwise it raises a kwarg-mismatch error.
* The attention backend is SDPA wherever the model class supports it (one
  ``scaled_dot_product_attention`` node per layer); Bloom and Gemma2 have no
  SDPA support and run eager attention (matmul/baddbmm + softmax).
* MoE models use ``experts_implementation="batched_mm"``: the default "eager"
  experts loop over ``nonzero()`` (data-dependent, fails to export) and
  "grouped_mm" exports as an opaque ``transformers.grouped_mm_fallback`` op.
* All models (eager and exported) reproduce each other bit-exactly on CPU.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch.export import Dim, ExportedProgram

SEED = 0

# --------------------------------------------------------------------------- #
# Hugging Face models
# --------------------------------------------------------------------------- #

# Shared shape of the llama-style families (config attribute names are the
# "modern" HF ones: hidden_size / num_attention_heads / intermediate_size).
# hidden 64, 4 heads -> head_dim 16.
_LLAMA_LIKE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
_MHA = dict(_LLAMA_LIKE, num_key_value_heads=4)

# Families using GPT-2-style attribute names (n_embd / n_layer / n_head / n_inner).
_GPT2_LIKE: dict[str, Any] = dict(
    vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=128
)



def _partial_rope(factor: float) -> dict[str, Any]:
    """Partial rotary is configured through ``rope_parameters`` in transformers v5."""
    return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": factor}


# name -> (config class, model class, config kwargs).
# Each row's comment says what the architecture adds to the matrix.
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # Baseline GQA decoder: 4 query heads share 2 KV heads; untied LM head.
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=False)),
    # Plain multi-head attention; tied LM head.
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", dict(_MHA, tie_word_embeddings=True)),
    # Sliding-window causal mask (window 4096 > seq: only extra mask ops).
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=False)),
    # q/k/v projections carry a bias.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=True)),
    # Per-head RMSNorm on q and k (weight of size head_dim, shared by all heads).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA_LIKE, head_dim=16, tie_word_embeddings=True)),
    # Gemma2: scaled embeddings, (1 + w) RMSNorms, sandwich norms, GELU-tanh MLP,
    # final-logit softcapping, alternating sliding/global layers.  Gemma2 does
    # not support SDPA (attention-logit softcapping), so it runs EAGER attention
    # and keeps the matmul/tanh/softmax attention pattern in the matrix.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=True),
    ),
    # Gemma1: scaled embeddings, (1 + w) RMSNorm, GELU-tanh gated MLP, MHA.
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_MHA, head_dim=16, tie_word_embeddings=True)),
    # Gemma3 text: Gemma2-style norms plus per-head q_norm / k_norm, SDPA, sliding layers.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(_LLAMA_LIKE, head_dim=16, query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=True),
    ),
    # Fused qkv_proj (q | k | v rows) and fused gate_up_proj (gate | up rows).
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=False)),
    # Conv1D (weight stored [in, out]), fused c_attn, learned position embeddings.
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(_GPT2_LIKE, tie_word_embeddings=True)),
    # Learned positions with an offset of 2; ReLU MLP (fc1/fc2).
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
             max_position_embeddings=128, word_embed_proj_dim=64, tie_word_embeddings=True),
    ),
    # ALiBi positions; fused query_key_value interleaved per head; embedding
    # LayerNorm.  No SDPA support in transformers -> eager attention (baddbmm).
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, tie_word_embeddings=True),
    ),
    # Parallel attention + MLP residual, fused qkv interleaved per head, 25 % rotary.
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(_MHA, rope_parameters=_partial_rope(0.25), tie_word_embeddings=False),
    ),
    # Falcon "new decoder architecture": GQA fused query_key_value grouped per KV head,
    # two parallel input LayerNorms (ln_attn / ln_mlp).
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
             new_decoder_architecture=True, ffn_hidden_size=96, tie_word_embeddings=True),
    ),
    # Sparse MoE: 4 experts, top-2 routing, experts stored as 3-D parameters.
    # ``experts_implementation="batched_mm"`` is the export-friendly dispatch
    # (the default "eager" path loops over ``nonzero()`` results, which is
    # data-dependent control flow).
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(_LLAMA_LIKE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
             experts_implementation="batched_mm", tie_word_embeddings=False),
    ),
    # Qwen2-MoE: routed experts (3-D params) + a dense shared expert scaled by a
    # sigmoid gate (``shared_expert_gate``: Linear(hidden, 1)).
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(_LLAMA_LIKE, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
             num_experts_per_tok=2, experts_implementation="batched_mm", tie_word_embeddings=False),
    ),
    # Qwen3-MoE: routed experts only, plus Qwen3's per-head q_norm / k_norm.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(_LLAMA_LIKE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
             experts_implementation="batched_mm", tie_word_embeddings=True),
    ),
    # GLM-4-MoE: sigmoid router with a score-correction bias for the choice, the chosen weights read back
    # with gather, a shared expert; the first layer dense (first_k_dense_replace=1).
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(_LLAMA_LIKE, head_dim=16, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
             experts_implementation="batched_mm", tie_word_embeddings=False),
    ),
    # DeepSeek-V3: multi-head latent attention (keys written into a new_empty tensor with copy_, one
    # rotary key shared by all heads), and group-limited routing (4 groups of 2 experts, the best 2
    # groups searched): whole groups of experts are the unit.
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(_MHA, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
             first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
             v_head_dim=16, experts_implementation="batched_mm", tie_word_embeddings=False),
    ),
    # DeepSeek-V2: multi-head latent attention with both low ranks (q_lora_rank and kv_lora_rank: two
    # channel groups of one module, told apart by size), rotary in complex numbers (view_as_complex).
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(_MHA, head_dim=8, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
             n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
             tie_word_embeddings=False),
    ),
    # GPT-OSS: gate and up interleaved in one expert projection (read by strided slices), attention
    # sinks, a max with keepdim in its eager attention, alternating sliding/full layers.
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(_LLAMA_LIKE, intermediate_size=32, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
             sliding_window=8, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
    ),
    # Llama 4 text: rotary in complex numbers (polar, view_as_complex), a layer without rotary
    # (no_rope_layers), chunked attention, MoE with one shared expert whose routed experts see the tokens
    # repeated once per expert (the experts axis folded into the tokens: frozen).
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(_LLAMA_LIKE, intermediate_size=32, intermediate_size_mlp=96, head_dim=16, num_local_experts=4,
             num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=8,
             tie_word_embeddings=False),
    ),
    # JetMoE: mixture of attention heads (each token's queries come from its top-k query experts, the
    # keys and values are shared) and of MLP experts, routed by loops over sorted tokens; attention's
    # output is viewed straight after a transpose (a layout pruning can change: rewritten as reshape).
    "jetmoe": (
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
             intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
             tie_word_embeddings=False),
    ),
    # PhiMoE: the router's sparse mixer picks its top-2 by two max ops (the second over the scores with the
    # first choice set to -inf) inside a torch.no_grad() block (a higher-order op in the trace, inlined);
    # LayerNorms with bias.
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(_LLAMA_LIKE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    ),
    # Aria (text): experts stored transposed ([in, out], is_transposed batched_mm), a shared expert; its
    # experts kernel makes torch.export guard s * min(64, 64 s) == 64 s, true but unproven: the trace defers it
    # to a runtime check.
    "aria": (
        "AriaTextConfig",
        "AriaTextForCausalLM",
        dict(_LLAMA_LIKE, intermediate_size=48, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1,
             tie_word_embeddings=False),
    ),
    # Encoder: absolute + token-type embeddings, post-LN, tied MLM decoder with a bias.
    "bert": (
        "BertConfig",
        "BertForMaskedLM",
        dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=128, type_vocab_size=2, tie_word_embeddings=True),
    ),
    # Multi-query attention through ONE fused c_attn of width hidden + 2 * head_dim.
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(_GPT2_LIKE, multi_query=True, tie_word_embeddings=True),
    ),
    # LayerNorm with bias, GQA with biases, plain GELU MLP (c_fc / c_proj).
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=False)),
    # LayerNorm1P (weight + 1), squared-ReLU MLP without gate, partial rotary.
    "nemotron": (
        "NemotronConfig",
        "NemotronForCausalLM",
        dict(_LLAMA_LIKE, head_dim=16, tie_word_embeddings=False),
    ),
    # Parameter-free LayerNorm (no weight, no bias), q/k/v clipping disabled.
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=False)),
    # q_norm / k_norm over the *whole* projected width (heads * head_dim), post-norms.
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=False)),
    # LayerNorm with bias, 25 % rotary, q/k/v bias.
    "stablelm": (
        "StableLmConfig",
        "StableLmForCausalLM",
        dict(_LLAMA_LIKE, rope_parameters=_partial_rope(0.25), use_qkv_bias=True, tie_word_embeddings=False),
    ),
    # Scalar multipliers on embeddings, residual branches, attention and logits.
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(_LLAMA_LIKE, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
             logits_scaling=4.0, tie_word_embeddings=True),
    ),
    # NoPE on some layers (rotary skipped every ``no_rope_layer_interval`` layers).
    "smollm3": (
        "SmolLM3Config",
        "SmolLM3ForCausalLM",
        dict(_LLAMA_LIKE, no_rope_layer_interval=2, tie_word_embeddings=True),
    ),
    # Parallel block, bias-free LayerNorm, interleaved rotary, logit_scale; tied.
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=True)),
    # Phi-1/2: parallel block, 50 % rotary, dense with bias, LM head with bias.
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(_MHA, rope_parameters=_partial_rope(0.5), tie_word_embeddings=False),
    ),
    # GPT-J: parallel block, rotary on the first rotary_dim channels (interleaved pairs).
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(_GPT2_LIKE, rotary_dim=8, tie_word_embeddings=False)),
    # CodeGen: fused qkv_proj in an "mp_num=4" interleaved layout.
    "codegen": (
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(_GPT2_LIKE, n_ctx=128, rotary_dim=8, tie_word_embeddings=False),
    ),
}


def _perturb_vectors(model: nn.Module, scale: float = 0.05) -> None:
    """Add seeded noise to every 1-D parameter (biases, norm weights).

    Why: HF init makes them constant (0 or 1), which hides index bugs when
    graphprune slices them.  Shared (tied) parameters are visited once.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and p.is_floating_point():
                p.add_(torch.randn_like(p) * scale)


# Config defaults point special tokens at ids of the real (large) vocabularies;
# with vocab 128 that makes some models assert on padding_idx.  Keep them small.
_SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build_hf(name: str) -> nn.Module:
    """Build the ``name`` row of ``_SPECS``: seeded, fp32, eval, no cache.

    Attention is SDPA when the model class supports it, eager otherwise
    (Bloom, Gemma2).
    """
    config_cls, model_cls_name, kwargs = _SPECS[name]
    model_cls = getattr(transformers, model_cls_name)
    attn = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    torch.manual_seed(SEED)
    config = getattr(transformers, config_cls)(
        **_SPECIAL_TOKENS, **kwargs, use_cache=False, attn_implementation=attn
    )
    model = model_cls(config)
    _perturb_vectors(model)
    return model.float().eval()


def _hf_factory(name: str) -> Callable[[], nn.Module]:
    """Bind ``name`` now (a bare lambda in a loop would capture the last name)."""

    def factory() -> nn.Module:
        return _build_hf(name)

    factory.__name__ = f"build_{name}"
    factory.__doc__ = f"Tiny random {_SPECS[name][1]}."
    return factory


ZOO: dict[str, Callable[[], nn.Module]] = {name: _hf_factory(name) for name in _SPECS}


# --------------------------------------------------------------------------- #
# Hand-written (non Hugging Face) models
# --------------------------------------------------------------------------- #

_HW_VOCAB = 64
_HW_DIM = 32


class _MLPBlock(nn.Module):
    """Pre-LN GELU MLP with a residual connection."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TinyMLPLM(nn.Module):
    """Embedding -> 2 x (LayerNorm -> up -> GELU -> down, residual) -> LM head.

    The simplest possible LM: no attention, so it isolates the MLP / residual /
    LayerNorm / embedding / head channel-propagation rules.
    """

    def __init__(self, vocab: int = _HW_VOCAB, d: int = _HW_DIM, hidden: int = 64, n_layers: int = 2) -> None:
        super().__init__()
        self.vocab_size = vocab
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_MLPBlock(d, hidden) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


class _RMSNorm(nn.Module):
    """RMSNorm written out by hand (not ``nn.RMSNorm``), as many repos do."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _FusedQKVAttention(nn.Module):
    """Causal self-attention with ONE ``Linear(d, 3d)`` split by ``chunk(3)``.

    Exercises the split-by-chunk + view-to-heads pattern that graphprune must
    map back to per-head channel groups without any HF module names to help.
    """

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class _ComplexRopeAttention(nn.Module):
    """GQA attention with rotary embeddings in complex numbers, as Meta's reference Llama code writes
    them: a precomputed complex buffer ``freqs_cis``, ``view_as_complex``, a complex product and
    ``view_as_real`` (what DeepSeek-V2 and Llama 4 do in transformers, there with ``polar`` in forward)."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int, max_seq: int = 64) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d // n_heads
        self.wq = nn.Linear(d, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d, bias=False)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(max_seq).float(), inv_freq)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        freqs = self.freqs_cis[: x.shape[1]].view(1, x.shape[1], 1, -1)
        return torch.view_as_real(pairs * freqs).flatten(3).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self._rotate(self.wq(x).view(b, s, self.n_heads, self.head_dim))
        k = self._rotate(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        rep = self.n_heads // self.n_kv_heads
        k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class _ComplexRopeBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = _RMSNorm(d), _RMSNorm(d)
        self.attention = _ComplexRopeAttention(d, n_heads, n_kv_heads)
        self.feed_forward = _SwiGLU(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class ComplexRopeLM(nn.Module):
    """Embedding -> 2 blocks of complex-rotary GQA attention (4 heads, 2 KV heads) and SwiGLU -> LM head."""

    def __init__(self, vocab: int = _HW_VOCAB, d: int = _HW_DIM, hidden: int = 64, n_layers: int = 2) -> None:
        super().__init__()
        self.vocab_size = vocab
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_ComplexRopeBlock(d, 4, 2, hidden) for _ in range(n_layers))
        self.norm = _RMSNorm(d)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


class _SwiGLU(nn.Module):
    """SwiGLU MLP with separate gate / up / down projections."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _FusedBlock(nn.Module):
    """Pre-norm transformer block: RMSNorm -> attention, RMSNorm -> SwiGLU."""

    def __init__(self, d: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = _RMSNorm(d)
        self.attn = _FusedQKVAttention(d, n_heads)
        self.norm2 = _RMSNorm(d)
        self.mlp = _SwiGLU(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FusedQKVLM(nn.Module):
    """Embedding -> 2 fused-QKV transformer blocks -> RMSNorm -> LM head."""

    def __init__(
        self, vocab: int = _HW_VOCAB, d: int = _HW_DIM, n_heads: int = 4, hidden: int = 64, n_layers: int = 2
    ) -> None:
        super().__init__()
        self.vocab_size = vocab
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_FusedBlock(d, n_heads, hidden) for _ in range(n_layers))
        self.norm = _RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def _handwritten_factory(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    """Seeded construction + the same 1-D perturbation as the HF models."""

    def factory() -> nn.Module:
        torch.manual_seed(SEED)
        model = cls()
        _perturb_vectors(model)
        return model.float().eval()

    factory.__name__ = f"build_{cls.__name__}"
    factory.__doc__ = cls.__doc__
    return factory


HANDWRITTEN: dict[str, Callable[[], nn.Module]] = {
    "tiny_mlp_lm": _handwritten_factory(TinyMLPLM),
    "fused_qkv_attn": _handwritten_factory(FusedQKVLM),
    "complex_rope": _handwritten_factory(ComplexRopeLM),
}

ALL: dict[str, Callable[[], nn.Module]] = {**ZOO, **HANDWRITTEN}


# --------------------------------------------------------------------------- #
# Inputs, export, outputs
# --------------------------------------------------------------------------- #


def _vocab_size(name_or_model: str | nn.Module) -> int:
    """Vocabulary size from a zoo name (no model build) or from a model."""
    if isinstance(name_or_model, str):
        if name_or_model in _SPECS:
            return _SPECS[name_or_model][2]["vocab_size"]
        if name_or_model in HANDWRITTEN:
            return _HW_VOCAB
        raise KeyError(f"unknown zoo model {name_or_model!r}")
    config = getattr(name_or_model, "config", None)
    return config.vocab_size if config is not None else name_or_model.vocab_size


def _is_encoder(name_or_model: str | nn.Module) -> bool:
    """True for BERT-style models that also take token_type_ids / attention_mask."""
    if isinstance(name_or_model, str):
        return name_or_model in _SPECS and _SPECS[name_or_model][0] == "BertConfig"
    config = getattr(name_or_model, "config", None)
    return getattr(config, "model_type", None) == "bert"


def example_inputs(
    name_or_model: str | nn.Module, batch: int = 2, seq: int = 8, seed: int = SEED
) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``model(**kwargs)``; deterministic for a given seed.

    ``batch`` should be >= 2 for export, otherwise torch.export specialises the
    batch dimension to 1.  BERT also gets ``token_type_ids`` (a mix of 0/1, so
    the token-type embedding is really exercised) and an all-ones
    ``attention_mask``, i.e. what a tokenizer would hand it.
    """
    g = torch.Generator().manual_seed(seed)
    kwargs = {"input_ids": torch.randint(0, _vocab_size(name_or_model), (batch, seq), generator=g)}
    if _is_encoder(name_or_model):
        kwargs["token_type_ids"] = torch.randint(0, 2, (batch, seq), generator=g)
        kwargs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return kwargs


def _is_hf(model: nn.Module) -> bool:
    return isinstance(model, transformers.PreTrainedModel)


def call_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``use_cache=False`` for HF models that accept it.

    Used for both export and eager calls so the two see the same arguments.
    """
    if _is_hf(model) and "use_cache" not in kwargs:
        if "use_cache" in inspect.signature(model.forward).parameters:
            return {**kwargs, "use_cache": False}
    return dict(kwargs)


def _max_seq(model: nn.Module) -> int | None:
    """Longest sequence the model's position table allows (None = unbounded)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def export(model: nn.Module, kwargs: dict[str, Any]) -> ExportedProgram:
    """Export ``model`` with batch and sequence dims dynamic (non-strict mode).

    Every tensor kwarg gets ``{0: batch, 1: seq}``; non-tensor kwargs such as
    ``use_cache=False`` get ``None`` (baked in as constants).  ``seq`` is
    bounded by the model's position table when it has one: BERT slices a
    ``position_ids`` buffer, which guards ``seq <= max_position_embeddings``
    and fails an unbounded Dim.
    """
    full = call_kwargs(model, kwargs)
    batch, seq = Dim("batch"), Dim("seq", max=_max_seq(model))
    dynamic_shapes = {
        k: ({0: batch, 1: seq} if isinstance(v, torch.Tensor) else None) for k, v in full.items()
    }
    with torch.no_grad():
        return torch.export.export(model, (), full, dynamic_shapes=dynamic_shapes, strict=False)


def output_tensor(out: Any) -> torch.Tensor:
    """The main output tensor: itself, ``.logits``, ``.last_hidden_state`` or ``[0]``."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def param_count(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ALL",
    "HANDWRITTEN",
    "ZOO",
    "call_kwargs",
    "example_inputs",
    "export",
    "output_tensor",
    "param_count",
]
