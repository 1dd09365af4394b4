"""Evaluation of dense and pruned models: perplexity and zero-shot multiple-choice accuracy.

    from graphprune.evaluate import perplexity, zeroshot
    perplexity(model, tok, "wikitext2", seq_len=128)      # LLM-Pruner's protocol
    perplexity(model, tok, "ptb", seq_len="long")          # 1024 tokens (or the model's limit)
    zeroshot(model, tok, max_examples=200)                 # BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA

Both accept an ``nn.Module``, a ``CompiledModel`` / traced ``GraphModule`` or an ONNX Runtime session.
"""
from .perplexity import LONG_CONTEXT, PerplexityResult, perplexity
from .runner import LogitsRunner
from .zeroshot import REPORTED_METRIC, TASKS, Question, TaskResult, ZeroShotResult, load_task, score_questions, zeroshot

__all__ = [
    "perplexity", "zeroshot", "load_task", "score_questions", "LogitsRunner", "Question",
    "PerplexityResult", "TaskResult", "ZeroShotResult", "TASKS", "REPORTED_METRIC", "LONG_CONTEXT",
]
