"""Axes: the index spaces of tensor dimensions, and how they are coupled.

Every dimension of every tensor in the traced graph (and of every parameter) is an *axis*.
Two axes are *equal* when index ``i`` of one always means index ``i`` of the other (an add, the
rows of a linear weight and the features of its output, ...). Equal axes form a class, kept with
union-find so that the rules can ask "what is this axis made of?" while the graph is walked.

An axis class may be *refined* into parts:

* ``prod``: the axis is a row-major product of smaller axes. ``view(b, s, H*D) -> (b, s, H, D)``
  refines the ``H*D`` axis into ``prod(H, D)``; this is how attention heads appear, and a GQA
  ``expand``+``reshape`` refines the query heads into ``prod(kv_heads, heads_per_kv)``.
* ``cat``: the axis is a concatenation of smaller axes. ``split``/``slice``/``cat`` refine a
  fused ``qkv`` axis into ``cat(q, k, v)``.

The leaves of this refinement tree are the prunable *atoms*: removing index ``u`` of a leaf
removes, in every axis that contains the leaf, every position whose coordinate along the leaf
is ``u``. Every union and every refinement is also recorded as an edge of a networkx graph, which
is the dependency graph the report and the group finder read.

An axis class can be *frozen*: its indices must all stay (it is indexed by data, reduced by a
softmax, part of the model's input/output, or touched by an op without a rule). Freezing covers
all the parts of a class, so it is resolved once the graph is complete (:meth:`frozen_leaves`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch

PROD, CAT = "prod", "cat"


@dataclass
class Refinement:
    kind: str  # PROD or CAT
    parts: list[int]  # axis ids, outermost / first first


@dataclass
class AxisTable:
    """Union-find over axes with refinements, freezes and a networkx record of every coupling."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    refinement: dict[int, Refinement] = field(default_factory=dict)  # keyed by root
    frozen: dict[int, str] = field(default_factory=dict)  # keyed by root: reason
    tags: dict[int, set[str]] = field(default_factory=dict)  # keyed by root
    floors: dict[int, int] = field(default_factory=dict)  # keyed by root: fewest indices that must stay
    graph: nx.MultiGraph = field(default_factory=nx.MultiGraph)

    # ---------------------------------------------------------------- basics
    def new(self, size: int, label: str = "") -> int:
        axis = len(self.parent)
        self.parent.append(axis)
        self.size.append(int(size))
        self.graph.add_node(axis, size=int(size), label=label)
        return axis

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def parts(self, a: int) -> Refinement | None:
        return self.refinement.get(self.find(a))

    def freeze(self, a: int, reason: str) -> None:
        root = self.find(a)
        self.frozen.setdefault(root, reason)

    def tag(self, a: int, tag: str) -> None:
        self.tags.setdefault(self.find(a), set()).add(tag)

    def tags_of(self, a: int) -> set[str]:
        return self.tags.get(self.find(a), set())

    def require(self, a: int, n: int) -> None:
        """At least ``n`` indices of ``a`` must stay (a top-k over it needs k to choose from)."""
        root = self.find(a)
        self.floors[root] = max(self.floors.get(root, 1), int(n))

    # ---------------------------------------------------------------- unions
    def union(self, a: int, b: int, why: str) -> None:
        """Declare axes ``a`` and ``b`` equal. Mismatched structure freezes both."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.graph.add_edge(a, b, kind="eq", op=why)
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, f"{why}: sizes {self.size[ra]} != {self.size[rb]}")
            self.freeze(rb, f"{why}: sizes {self.size[ra]} != {self.size[rb]}")
            return
        fa, fb = self.refinement.pop(ra, None), self.refinement.pop(rb, None)
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if rb in self.tags:
            self.tags.setdefault(ra, set()).update(self.tags.pop(rb))
        if rb in self.floors:
            self.floors[ra] = max(self.floors.get(ra, 1), self.floors.pop(rb))
        if fa is None or fb is None:
            if fa or fb:
                self.refinement[ra] = fa or fb
            return
        self.refinement[ra] = fa
        if fa.kind != fb.kind or not self._align(fa.kind, fa.parts, fb.parts, why):
            self.freeze(ra, f"{why}: incompatible {fa.kind}/{fb.kind} structure")

    def _align(self, kind: str, left: list[int], right: list[int], why: str) -> bool:
        """Make two part lists of one axis agree: refine both to common cut points, then pair up."""
        points = self._cuts(kind, self._sizes(left)) | self._cuts(kind, self._sizes(right))
        left = self._refine_parts(kind, left, points, why)
        right = self._refine_parts(kind, right, points, why)
        if left is None or right is None:
            return False
        for x, y in zip(left, right):
            self.union(x, y, why)
        return True

    # ---------------------------------------------------------------- refinement
    def flat(self, a: int, kind: str) -> list[int]:
        """The finest parts of ``a`` of the given kind (nested same-kind refinements flattened)."""
        ref = self.parts(a)
        if ref is None or ref.kind != kind:
            return [self.find(a)]
        return [leaf for p in ref.parts for leaf in self.flat(p, kind)]

    def _sizes(self, parts: list[int]) -> list[int]:
        return [self.size[self.find(p)] for p in parts]

    @staticmethod
    def _cuts(kind: str, sizes: list[int]) -> set[int]:
        """Cut points of a list of part sizes: offsets for CAT, inner strides for PROD."""
        acc = 0 if kind == CAT else 1
        points = {acc}
        for n in (sizes if kind == CAT else reversed(sizes)):
            acc = acc + n if kind == CAT else acc * n
            points.add(acc)
        return points

    def _refine_parts(self, kind: str, parts: list[int], points: set[int], why: str) -> list[int] | None:
        """Split each part at the cut points falling strictly inside it; return the new flat list."""
        parts = [leaf for p in parts for leaf in self.flat(p, kind)]
        out: list[int] = []
        seq = parts if kind == CAT else list(reversed(parts))
        lo = 0 if kind == CAT else 1
        pieces_rev: list[list[int]] = []
        for p in seq:
            n = self.size[self.find(p)]
            hi = lo + n if kind == CAT else lo * n
            inside = sorted(q for q in points if lo < q < hi)
            if kind == PROD and any(q % lo or hi % q for q in inside):
                return None
            if not inside:
                pieces_rev.append([p])
            else:
                bounds = [lo, *inside, hi]
                if kind == CAT:
                    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
                else:  # inner to outer, so reverse to get row-major order
                    sizes = [b // a for a, b in zip(bounds, bounds[1:])][::-1]
                sub = self.refine(p, kind, sizes, why)
                if sub is None:
                    return None
                pieces_rev.append(sub if kind == CAT else sub[::-1])
            lo = hi
        for chunk in pieces_rev:
            out.extend(chunk)
        return out if kind == CAT else out[::-1]

    def refine(self, a: int, kind: str, sizes: list[int], why: str) -> list[int] | None:
        """Refine axis ``a`` into parts of ``sizes`` (row-major / in order) and return their ids.

        Reuses existing structure where it agrees; returns None (and freezes ``a``) where the
        requested structure contradicts what is already known.
        """
        sizes = [int(s) for s in sizes]
        if len(sizes) == 1:
            return [self.find(a)]
        ref = self.parts(a)
        if ref is None:  # (a frozen axis may be refined too: its freeze covers all its parts)
            parts = [self.new(s, f"{kind}-part") for s in sizes]
            for i, p in enumerate(parts):
                self.graph.add_edge(a, p, kind=kind, index=i, op=why)
            self.refinement[self.find(a)] = Refinement(kind, parts)
            return parts
        if ref.kind != kind:
            self.freeze(a, f"{why}: needs {kind} structure, axis already has {ref.kind}")
            return None
        want = self._cuts(kind, sizes) | self._cuts(kind, self._sizes(ref.parts))
        flat = self._refine_parts(kind, ref.parts, want, why)
        if flat is None:
            self.freeze(a, f"{why}: cannot refine {kind} structure")
            return None
        # group the flat parts into the requested sizes
        result, i = [], 0
        for s in sizes:
            group, acc = [], 0 if kind == CAT else 1
            while acc != s:
                group.append(flat[i])
                acc = acc + self.size[self.find(flat[i])] if kind == CAT else acc * self.size[self.find(flat[i])]
                i += 1
            result.append(group[0] if len(group) == 1 else self.compose(kind, group, why))
        return result

    def compose(self, kind: str, parts: list[int], why: str) -> int:
        """A new axis that is the product / concatenation of ``parts``."""
        if len(parts) == 1:
            return parts[0]
        total = 0 if kind == CAT else 1
        for p in parts:
            total = total + self.size[self.find(p)] if kind == CAT else total * self.size[self.find(p)]
        axis = self.new(total, kind)
        self.refinement[axis] = Refinement(kind, list(parts))
        for i, p in enumerate(parts):
            self.graph.add_edge(axis, p, kind=kind, index=i, op=why)
        return axis

    # ---------------------------------------------------------------- queries
    def leaves(self, a: int) -> list[int]:
        """All leaf roots below ``a`` (itself if unrefined)."""
        ref = self.parts(a)
        if ref is None:
            return [self.find(a)]
        seen: dict[int, None] = {}
        for p in ref.parts:
            for leaf in self.leaves(p):
                seen[leaf] = None
        return list(seen)

    def frozen_leaves(self) -> dict[int, str]:
        """Every leaf root that must keep all its indices, with the reason."""
        out: dict[int, str] = {}
        for root, reason in self.frozen.items():
            for leaf in self.leaves(root):
                out.setdefault(leaf, reason)
        return out

    def coordinate(self, a: int, leaf: int) -> torch.Tensor:
        """For each position of axis ``a``: its index along ``leaf``, or -1 if ``leaf`` is not in it."""
        root, leaf = self.find(a), self.find(leaf)
        if root == leaf:
            return torch.arange(self.size[root])
        ref = self.refinement.get(root)
        if ref is None:
            return torch.full((self.size[root],), -1, dtype=torch.long)
        coords = [self.coordinate(p, leaf) for p in ref.parts]
        if ref.kind == CAT:
            return torch.cat(coords)
        out = coords[0]
        for c in coords[1:]:
            out = torch.maximum(out[:, None], c[None, :]).reshape(-1)
        return out

    def keep_mask(self, a: int, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        """Boolean mask over the positions of axis ``a`` given per-leaf boolean keep masks."""
        root = self.find(a)
        ref = self.refinement.get(root)
        if ref is None:
            mask = keep.get(root)
            return mask if mask is not None else torch.ones(self.size[root], dtype=torch.bool)
        masks = [self.keep_mask(p, keep) for p in ref.parts]
        if ref.kind == CAT:
            return torch.cat(masks)
        out = masks[0]
        for m in masks[1:]:
            out = (out[:, None] & m[None, :]).reshape(-1)
        return out
