"""Dependency analysis: which channels of a traced graph must be removed together."""
from .depgraph import DependencyGraph, analyze
from .groups import ALL_KINDS, DEFAULT_KINDS, Group, Member
from .op_rules import OpRule, register_op_rule

__all__ = ["analyze", "DependencyGraph", "Group", "Member", "OpRule", "register_op_rule", "ALL_KINDS", "DEFAULT_KINDS"]
