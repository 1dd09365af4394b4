"""Groups: the prunable atoms of the dependency graph, with their members and unit kind.

A group is one leaf axis class that is not frozen, has more than one index, and reaches at least
one parameter. Its *unit* is one index of that leaf: removing unit ``u`` removes, in every member
parameter dimension, the positions whose coordinate along the leaf is ``u`` (a whole head's rows
of q/k/v and columns of o, one MLP channel's rows of gate/up and column of down, ...).

The kind of a group is read from the graph, not from model classes:

* ``heads``: the head axis of a ``scaled_dot_product_attention`` (under GQA, the KV-head axis:
  one unit is a KV head with all the query heads that read it);
* ``query_heads``: under GQA, the query heads inside each KV group (same index in every group);
* ``head_dim``: the channels inside a head;
* ``hidden``: the residual stream (reaches the token embedding, or more than one block);
* ``lora_rank``: the rank of a peft LoRA adapter (lora_A rows / lora_B columns);
* ``experts``: the experts of a mixture-of-experts layer: an axis a router's top-k chooses from
  whose choices index weights (one unit = one router row and one slice of every expert weight);
  it keeps at least k units;
* ``channels``: everything else (MLP intermediate channels, expert channels, ...).

Block kinds (:data:`BLOCK_KINDS`) are derived from those: one group per kind whose unit is a whole
sub-block of one transformer block — ``attn_block`` (its ``heads`` groups), ``mlp_block`` (its
``channels`` groups) or ``layer`` (both). Removing a unit removes every unit of those groups, so
the block's write into the residual stream is only its output bias and the residual passes
through (:func:`graphprune.rewrite.block_removal`). ``Group.units`` lists, per unit, the leaf axes
it removes whole; its ``axis`` is a fresh one that no tensor carries.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import networkx as nx
import torch

from .axes import AxisTable

_BLOCK = re.compile(r"^(.*?\.\d+)\.")
DEFAULT_KINDS = ("heads", "channels")
BLOCK_KINDS = ("attn_block", "mlp_block", "layer")
ALL_KINDS = ("heads", "query_heads", "head_dim", "channels", "hidden", "experts", "lora_rank", *BLOCK_KINDS)


def block_of(param: str) -> str | None:
    """The transformer block a parameter lives in (its name up to the first numeric index)."""
    m = _BLOCK.match(param)
    return m.group(1) if m else None


@dataclass
class Member:
    param: str
    dim: int
    coords: torch.Tensor  # per position of the dim: the unit index, or -1 (not part of this group)
    numel_rest: int = 1  # product of the parameter's other dimensions

    def unit_positions(self, unit: int) -> torch.Tensor:
        return (self.coords == unit).nonzero().flatten()


@dataclass
class Group:
    name: str
    kind: str
    axis: int  # leaf root in the axis table
    size: int  # number of units
    members: list[Member] = field(default_factory=list)
    units: list[list[int]] | None = None  # block kinds only: per unit, the leaf axes it removes whole
    min_units: int = 1  # fewest units that must stay (experts: the router's k)

    @property
    def blocks(self) -> list[str]:
        return sorted({b for m in self.members if (b := block_of(m.param))})


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def find_groups(
    table: AxisTable, params: dict[str, list[int]], shapes: dict[str, tuple], trainable: set[str]
) -> tuple[list[Group], dict[int, str]]:
    """All groups of an analysed graph, plus the frozen leaves (with reasons) that reach parameters."""
    frozen = table.frozen_leaves()
    # which leaves does each parameter dimension contain?
    leaf_members: dict[int, list[tuple[str, int]]] = {}
    for name, axes in params.items():
        for d, a in enumerate(axes):
            for leaf in table.leaves(a):
                leaf_members.setdefault(leaf, []).append((name, d))
    tags = _tag_index(table)
    # a floor of n on an axis of S indices made of leaves: if one leaf (s indices) is prunable, it keeps
    # ceil(n * s / S) (16 experts in 4 groups, top-4: one group); if several are, each keeps min(n, s),
    # which holds for any combination of them
    floors: dict[int, int] = {}
    for root, n in table.floors.items():
        parts = table.leaves(root)
        prunable = [leaf for leaf in parts if leaf not in frozen and table.size[leaf] > 1]
        for leaf in parts:
            need = -(-n * table.size[leaf] // table.size[table.find(root)]) if len(prunable) == 1 else n
            floors[leaf] = max(floors.get(leaf, 1), min(need, table.size[leaf]))
    groups, frozen_params = [], {}
    for leaf, members in leaf_members.items():
        if leaf in frozen:
            frozen_params[leaf] = frozen[leaf]
            continue
        if table.size[leaf] < 2:
            continue
        if not any(n in trainable for n, _ in members):
            continue  # only buffers (rotary tables, ...): follows other groups, never a group itself
        kind = _kind(leaf, members, tags)
        group = Group(name="", kind=kind, axis=leaf, size=table.size[leaf], min_units=floors.get(leaf, 1))
        for name, d in members:
            rest = 1
            for k, n in enumerate(shapes[name]):
                rest *= n if k != d else 1
            group.members.append(Member(name, d, table.coordinate(params[name][d], leaf), rest))
        groups.append(group)
    _name_groups(groups)
    groups.sort(key=lambda g: _natural_key(g.name))
    residual = {leaf for leaf, t in tags.items() if "embedding" in t}
    return groups + find_blocks(groups, table, params, residual), frozen_params


def find_blocks(groups: list[Group], table: AxisTable, params: dict[str, list[int]], residual: set[int]) -> list[Group]:
    """Whole-block groups: per transformer block, its heads groups (attention) and channels groups (MLP)
    that lie in that block alone and feed the residual stream (a member's other dim is on the
    embedding's axis: the projections reading and writing the stream)."""
    def feeds_residual(g: Group) -> bool:
        return any(set(table.leaves(a)) & residual for m in g.members for d, a in enumerate(params[m.param]) if d != m.dim)

    parts: dict[str, dict[str, list[Group]]] = {}
    for g in groups:
        if g.kind in ("heads", "channels") and len(g.blocks) == 1 and len({block_of(m.param) for m in g.members}) == 1 and feeds_residual(g):
            parts.setdefault(g.blocks[0], {}).setdefault("attn_block" if g.kind == "heads" else "mlp_block", []).append(g)
    blocks = sorted(parts, key=_natural_key)
    out = []
    for kind in BLOCK_KINDS:
        units = [(b, [g for k, gs in parts[b].items() if kind in (k, "layer") for g in gs]) for b in blocks]
        units = [(b, gs) for b, gs in units if gs]
        if len(units) < 2:
            continue
        block = Group(name=f"{_common_prefix([b + '.x' for b, _ in units]) or 'model'}:{kind}", kind=kind, size=len(units), units=[],
                      axis=table.new(len(units), kind))  # an axis of its own: one index per block
        seen = set()
        for u, (_, gs) in enumerate(units):
            block.units.append([g.axis for g in gs])
            for m in (m for g in gs for m in g.members):
                if (m.param, m.dim) not in seen:
                    seen.add((m.param, m.dim))
                    block.members.append(Member(m.param, m.dim, torch.where(m.coords >= 0, u, -1), m.numel_rest))
        out.append(block)
    return out


def _tag_index(table: AxisTable) -> dict[int, set[str]]:
    """Tags reaching each leaf. A tagged head axis that is a product (GQA: kv_heads x per_kv)
    gives ``heads`` to its outer factor (one KV group) and ``query_heads`` to the inner ones."""
    out: dict[int, set[str]] = {}
    for root, tags in table.tags.items():
        for tag in tags:
            factors = table.flat(root, "prod") if tag == "heads" else [root]
            for i, factor in enumerate(factors):
                name = "query_heads" if tag == "heads" and i > 0 else tag
                for leaf in table.leaves(factor):
                    out.setdefault(leaf, set()).add(name)
    return out


def _kind(leaf, members, tags) -> str:
    mine = tags.get(leaf, set())
    if all(".lora_" in p for p, _ in members):  # the rank of a peft LoRA adapter, not a model width
        return "lora_rank"
    if "embedding" in mine:
        return "hidden"
    for kind in ("experts", "head_dim", "heads", "query_heads"):
        if kind in mine:
            return kind
    blocks = {block_of(p) for p, _ in members}
    return "hidden" if len(blocks - {None}) > 1 else "channels"


def _name_groups(groups: list[Group]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        if g.kind == "hidden":
            base = "hidden"
        else:
            base = f"{_common_prefix([m.param for m in g.members]) or 'model'}:{g.kind}"
        seen[base] = seen.get(base, 0) + 1
        g.name = base if seen[base] == 1 else f"{base}#{seen[base]}"


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def end_block_patterns(groups: list[Group], first: int, last: int) -> list[str]:
    """``ignore`` patterns for the first ``first`` and last ``last`` transformer blocks of every stack.

    Blocks are read from the groups' parameters (``model.layers.3.mlp...`` is block 3 of stack
    ``model.layers``), so this works for any naming; LLM-Pruner leaves LLaMA-7B's first 4 and
    last 2 of 32 blocks whole (``first=4, last=2``).
    """
    stacks: dict[str, set[int]] = {}
    for g in groups:
        for block in g.blocks:
            stack, _, index = block.rpartition(".")
            stacks.setdefault(stack, set()).add(int(index))
    patterns = []
    for stack, indices in sorted(stacks.items()):
        ordered = sorted(indices)
        protected = ordered[:first] + (ordered[-last:] if last else [])
        patterns += [f"{stack}.{i}.*" for i in sorted(set(protected))]
    return patterns


def as_names(value) -> tuple[str, ...]:
    """``kinds`` / ``ignore`` as a tuple: one string is one name ("heads", not five letters)."""
    return (value,) if isinstance(value, str) else tuple(value)


def check_kinds(kinds) -> tuple[str, ...]:
    """``kinds`` as a tuple of known kinds; a PlanError naming the unknown ones."""
    kinds = as_names(kinds)
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        from ..errors import PlanError

        raise PlanError(f"unknown kind{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"choose from {', '.join(ALL_KINDS)}")
    return kinds


def ignored_by(param: str, pattern: str) -> bool:
    """Whether an ``ignore`` pattern protects ``param``: it matches the parameter or its module."""
    return fnmatch.fnmatch(param, pattern) or fnmatch.fnmatch(param.rsplit(".", 1)[0], pattern)


def select_groups(groups: list[Group], kinds=DEFAULT_KINDS, ignore=()) -> list[Group]:
    """Groups of the wanted kinds whose members touch no ignored module."""
    kinds, ignore = check_kinds(kinds), as_names(ignore)
    out = []
    for g in groups:
        if g.kind not in kinds:
            continue
        if any(ignored_by(m.param, pat) for m in g.members for pat in ignore):
            continue
        out.append(g)
    return out


def coupling_graph(table: AxisTable) -> nx.Graph:
    """The equality part of the dependency graph (edges labelled with the op that coupled them)."""
    g = nx.Graph()
    g.add_nodes_from(table.graph.nodes(data=True))
    g.add_edges_from((a, b, d) for a, b, d in table.graph.edges(data=True) if d.get("kind") == "eq")
    return g
