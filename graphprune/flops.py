"""FLOPs of one forward pass, counted on fake tensors (no real arithmetic, any model size).

``torch.utils.flop_counter`` counts the matrix products (linear, matmul, attention) that dominate
an LLM's cost; elementwise ops are not counted. Running under ``FakeTensorMode`` makes the count
free of real computation, so it is cheap even for a 7B model on a laptop.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .data import model_inputs

DEFAULT_TOKENS = 128


def count_flops(module: torch.nn.Module, example_kwargs: dict, tokens: int = DEFAULT_TOKENS) -> int | None:
    """FLOPs of ``module`` on one sequence of ``tokens`` token ids (None when it cannot be counted)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if "input_ids" not in (example_kwargs or {}):
        return None
    ids = torch.zeros(1, tokens, dtype=torch.long)
    try:
        kwargs = model_inputs(example_kwargs, ids)
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
            module(**kwargs)
        return int(counter.get_total_flops())
    except Exception:  # an exotic op without a fake kernel: a report without FLOPs beats a failed compile
        return None


def flops_tokens(config: dict | None, tokens: int = DEFAULT_TOKENS) -> int:
    """The sequence length FLOPs are counted at: ``tokens`` or the model's position limit."""
    from .trace import position_limit

    limit = position_limit(config)
    return min(tokens, limit) if limit else tokens
