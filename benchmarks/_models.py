"""The models the benchmarks measure: SmolLM2-135M (real weights) and random-weight Llama shapes."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path.home() / ".cache" / "graphprune" / "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_SMOLLM2 = REPO.parent / "shared" / "data" / "fetch_smollm2.sh"

# Llama-3.2-1B-like (GQA: 32 query heads, 8 KV heads); random weights, nothing downloaded
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=768, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False)
NAMES = ("smollm2", "llama-1b", "tiny")


def build(name: str, device: str = "cpu"):
    """``smollm2`` (GGUF de-quantised to float32), ``llama-1b`` or ``tiny`` (random, seed 0), in eval mode."""
    import torch
    import transformers

    if name == "smollm2":
        model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    elif name in ("llama-1b", "tiny"):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**(LLAMA_1B if name == "llama-1b" else LLAMA_TINY), use_cache=False,
                                          attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(config)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(NAMES)}")
    # a GGUF model counts as "quantized" to transformers and refuses .float(); it is float32 already
    return model.eval().to(device)
