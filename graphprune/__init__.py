"""graphprune: a model-compression compiler that makes LLMs physically smaller.

    import graphprune
    small = graphprune.compile(model, ratio=0.5)   # trace -> analyse -> score -> plan -> rewrite
    print(small.report)
    print(graphprune.verify(small))                # pruned graph == masked dense graph

Each stage is public on its own: ``trace``, ``analyze``, ``score``, ``make_plan``, ``reconstruct``
(optional: refit the layers that lose inputs), ``rewrite``.
"""
from .analysis import ALL_KINDS, DEFAULT_KINDS, DependencyGraph, Group, OpRule, analyze, register_op_rule
from .api import CompiledModel, Report, Verification, compile, load, verify
from .errors import (
    ExportError,
    GraphpruneError,
    LoadError,
    PlanError,
    RewriteError,
    TraceError,
    UnsupportedOpError,
)
from . import evaluate
from .export import export_onnx
from .finetune import finetune
from .kvcache import CachedGraph, cached_graph, export_onnx_with_cache
from .io import load_hf
from .masking import MaskedModel, insert_masks
from .module_apply import ModuleApplyError, apply_plan_to_module
from .reconstruct import reconstruct
from .plan import PruningPlan, keep_all_plan, make_plan, random_plan
from .registry import ScoringPass, available_passes, register_pass
from .rewrite import rewrite
from .runtime import OnnxSession, generate
from .scoring import Scores, ScoringContext, score
from .trace import Traced, trace

__version__ = "0.1.0"

__all__ = [
    "evaluate", "finetune", "apply_plan_to_module", "ModuleApplyError",
    "export_onnx", "export_onnx_with_cache", "cached_graph", "CachedGraph", "OnnxSession", "generate",
    "compile", "load", "load_hf", "verify", "trace", "analyze", "score", "make_plan", "keep_all_plan", "random_plan", "reconstruct", "rewrite",
    "insert_masks", "register_pass", "register_op_rule", "available_passes",
    "CompiledModel", "Report", "Verification", "DependencyGraph", "Group", "OpRule", "PruningPlan",
    "MaskedModel", "ScoringPass", "ScoringContext", "Scores", "Traced", "DEFAULT_KINDS", "ALL_KINDS",
    "GraphpruneError", "TraceError", "UnsupportedOpError", "PlanError", "RewriteError", "ExportError", "LoadError",
]
