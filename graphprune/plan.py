"""Pruning plans: which units of which group survive, as plain versioned JSON.

``make_plan`` turns importance scores into a plan at a target ratio, where the ratio is the
fraction of the transformer blocks' parameters removed (embeddings and the LM head are untouched
unless the hidden size is pruned). Allocation is ``uniform`` (the same fraction of every group)
or ``global`` (units of one kind ranked together across layers, so layers end up different).
A plan carries a fingerprint of the model's structure, so replaying it on another model fails.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .analysis import ALL_KINDS, DEFAULT_KINDS, DependencyGraph, Group
from .analysis.groups import select_groups
from .errors import LoadError, PlanError

PLAN_FORMAT = "graphprune.plan"
PLAN_VERSION = 1
ROUNDED_KINDS = ("channels", "hidden")  # kinds whose unit is one channel: widths can be rounded


@dataclass
class PlanGroup:
    name: str
    kind: str
    size: int
    keep: list[int]
    members: list[list] = field(default_factory=list)  # [param name, dim]


@dataclass
class PruningPlan:
    fingerprint: str
    groups: list[PlanGroup]
    model_class: str = ""
    method: str = ""
    ratio: float = 0.0
    allocation: str = "uniform"
    params_before: int = 0
    params_after: int = 0
    block_params_before: int = 0
    block_params_after: int = 0
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION

    # ------------------------------------------------------------ numbers
    @property
    def achieved_ratio(self) -> float:
        """Fraction of transformer-block parameters removed."""
        return 1 - self.block_params_after / self.block_params_before if self.block_params_before else 0.0

    # ------------------------------------------------------------ applying
    def leaf_keep(self, dg: DependencyGraph) -> dict[int, torch.Tensor]:
        """Boolean keep-masks per group leaf of ``dg``; fails clearly on another model's plan."""
        self.check(dg)
        out = {}
        for pg in self.groups:
            g = dg.group(pg.name)
            if g.units is None:
                mask = torch.zeros(g.size, dtype=torch.bool)
                mask[torch.as_tensor(pg.keep, dtype=torch.long)] = True
                out[g.axis] = mask
        for leaf in removed_by_blocks(dg, {pg.name: pg.keep for pg in self.groups}):  # whole blocks: no unit left
            out[leaf] = torch.zeros(dg.table.size[leaf], dtype=torch.bool)
        return out

    def check(self, dg: DependencyGraph) -> None:
        if self.fingerprint != dg.fingerprint():
            raise PlanError(
                f"this plan was made for another model (plan fingerprint {self.fingerprint}, model "
                f"{dg.fingerprint()}, model class {self.model_class or '?'}): re-plan for this model"
            )
        names = {g.name: g for g in dg.groups}
        for pg in self.groups:
            g = names.get(pg.name)
            if g is None:
                raise PlanError(f"plan group {pg.name!r} does not exist in this model")
            if pg.size != g.size:
                raise PlanError(f"plan group {pg.name!r} has {pg.size} units, the model has {g.size}")
            if not pg.keep:
                raise PlanError(f"plan group {pg.name!r} keeps no unit; at least one must stay")
            if len(pg.keep) < g.min_units:
                raise PlanError(f"plan group {pg.name!r} keeps {len(pg.keep)} of its {g.kind}, but the model's router "
                                f"chooses {g.min_units} of them per token: keep at least {g.min_units}")
            problem = keep_problem(pg.keep, g.size)
            if problem:
                raise PlanError(f"plan group {pg.name!r} has invalid kept indices ({problem})")

    def kept_widths(self) -> dict[str, tuple[int, int]]:
        return {g.name: (len(g.keep), g.size) for g in self.groups}

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise LoadError("not a graphprune plan (missing 'format': 'graphprune.plan')")
        check_version(data, PLAN_VERSION, "plan")
        try:
            groups = [PlanGroup(**g) for g in data["groups"]]
            fields = {k: v for k, v in data.items() if k != "groups"}
            plan = cls(groups=groups, **fields)
        except (KeyError, TypeError) as exc:
            raise LoadError(f"corrupt plan: {exc}") from exc
        # a saved folder's plan is never replayed through check(): bad indices would be used as they are
        for g in plan.groups:
            if not isinstance(g.name, str) or not isinstance(g.size, int) or isinstance(g.size, bool) or g.size < 1:
                raise LoadError(f"corrupt plan: group {g.name!r} needs a name and a unit count >= 1 (size {g.size!r})")
            problem = keep_problem(g.keep, g.size)
            if problem:
                raise LoadError(f"corrupt plan: group {g.name!r} has invalid kept indices ({problem})")
        return plan

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningPlan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise LoadError(f"no plan at {path}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoadError(f"corrupt plan file {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except LoadError as exc:  # say which file
            raise LoadError(f"{path}: {exc}") from exc


def check_version(data: dict, newest: int, what: str) -> None:
    """``data['version']`` (absent: 0) must be an integer this graphprune reads; a LoadError naming ``what`` otherwise."""
    version = data.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise LoadError(f"{what}: 'version' must be an integer, got {version!r}")
    if version > newest:
        raise LoadError(f"{what} has format version {version}, newer than this graphprune ({newest}); upgrade graphprune")


def keep_problem(keep, size: int) -> str | None:
    """Why ``keep`` is not a list of distinct unit indices in ``[0, size)``; None when it is."""
    if not isinstance(keep, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        return f"not a list of integers: {str(keep)[:80]}"  # floats would be truncated to other units
    if len(set(keep)) != len(keep):
        return "duplicates"
    if keep and (min(keep) < 0 or max(keep) >= size):
        return f"out of [0, {size})"
    return None


def atomic_write(path: Path, write, suffix: str = ".tmp") -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, then rename it to ``path``: never a
    half-written file. ``suffix`` keeps the extension writers infer a format from (``.png``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would have:
    ``mkstemp``/``mkdtemp`` (and writers that use them) make owner-only files, which would keep
    a saved model from other users of the machine."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ================================================================ counting
def removed_by_blocks(dg: DependencyGraph, keep: dict[str, list[int]]) -> frozenset[int]:
    """Leaf axes removed whole by the block groups (``Group.units``) named in ``keep``."""
    out = set()
    for name, kept in keep.items():
        g = dg.group(name)
        if g.units is not None:
            kept = set(kept)
            out |= {dg.table.find(leaf) for u, parts in enumerate(g.units) if u not in kept for leaf in parts}
    return frozenset(out)


def count_params(dg: DependencyGraph, kept: dict[int, int], removed: frozenset[int] = frozenset(), names=None) -> int:
    """Parameters left when each leaf of ``kept`` keeps that many units and ``removed`` leaves go whole
    (with what only fed them: a removed block's norm weights, see :func:`graphprune.rewrite.block_removal`)."""
    kept = {**kept, **{leaf: 0 for leaf in removed}}
    total = dg.param_count(kept, names=names)
    if removed:
        from .rewrite import block_removal

        gone = [n for n in block_removal(dg, removed).dropped_params if names is None or n in names]
        total -= dg.param_count(kept, names=gone) if gone else 0
    return total


def _block_keep(groups, counts, scores) -> dict[str, list[int]]:
    """Kept units of the block groups at these counts (the highest scores)."""
    return {g.name: torch.argsort(scores[g.name].float(), descending=True, stable=True)[: counts[g.name]].tolist()
            for g in groups if g.units is not None}


# ================================================================ making plans
def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0.0 <= float(ratio) < 1.0) or math.isnan(ratio):
        raise PlanError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


def rounding(round_to) -> dict[str, int]:
    """``round_to`` as ``{kind: multiple}``: an int applies to the one-channel kinds (channels,
    hidden); a mapping names kinds itself, e.g. ``{"channels": 64, "heads": 2}`` (KV groups in pairs)."""
    def positive(v, what):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"round_to{what} must be a positive integer, got {v!r}")
        return v

    if isinstance(round_to, dict):
        unknown = set(round_to) - set(ALL_KINDS)
        if unknown:
            raise PlanError(f"round_to names unknown kinds {sorted(unknown)}; choose from {list(ALL_KINDS)}")
        return {kind: positive(v, f"[{kind!r}]") for kind, v in round_to.items()}
    return {kind: positive(round_to, "") for kind in ROUNDED_KINDS}


def _round_keep(n: float, size: int, round_to: int, min_keep: int) -> int:
    k = int(round(n))
    if round_to > 1 and size >= round_to:
        k = max(round_to, int(round(k / round_to)) * round_to)
    return max(min(min_keep, size), min(size, k))


def _keep_counts(groups, scores, p, allocation, round_to, min_keep) -> dict[str, int]:
    counts = {}
    if allocation == "uniform":
        for g in groups:
            counts[g.name] = _round_keep(g.size * (1 - p), g.size, round_to.get(g.kind, 1), max(min_keep, g.min_units))
        return counts
    # global: within each kind, rank every unit of every layer together
    for kind in {g.kind for g in groups}:
        mine = [g for g in groups if g.kind == kind]
        pooled = torch.cat([scores[g.name].float() for g in mine])
        n_remove = int(round(p * len(pooled)))
        threshold = pooled.sort().values[n_remove - 1] if n_remove > 0 else -math.inf
        for g in mine:
            n_keep = int((scores[g.name].float() > threshold).sum()) if n_remove > 0 else g.size
            counts[g.name] = _round_keep(n_keep, g.size, round_to.get(g.kind, 1), max(min_keep, g.min_units))
    return counts


COARSE_UNITS = 16  # a group this small moves the ratio in big steps (e.g. 3 KV heads: 33% each)


def _refine_fine_kinds(groups, counts, achieved, ratio, round_to, min_keep) -> dict[str, int]:
    """Uniform allocation: hold the coarse kinds where they landed, re-solve the fine ones exactly.

    One shared fraction cannot hit the target when some groups have only a few units; the kinds
    with many units (MLP channels) then take up the difference, still uniformly across layers.
    """
    fine = {g.kind for g in groups if g.size > COARSE_UNITS}
    if not fine or fine == {g.kind for g in groups}:
        return counts

    def with_fine(q):
        out = dict(counts)
        for g in groups:
            if g.kind in fine:
                out[g.name] = _round_keep(g.size * (1 - q), g.size, round_to.get(g.kind, 1), max(min_keep, g.min_units))
        return out

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if achieved(with_fine(mid)) < ratio else (lo, mid)
    best = min((with_fine(lo), with_fine(hi)), key=lambda c: abs(achieved(c) - ratio))
    return best if abs(achieved(best) - ratio) < abs(achieved(counts) - ratio) else counts


def make_plan(
    dg: DependencyGraph,
    scores: dict[str, torch.Tensor],
    ratio: float,
    *,
    kinds=DEFAULT_KINDS,
    allocation: str = "uniform",
    round_to: int | dict = 1,
    ignore=(),
    min_keep: int = 1,
    method: str = "",
    model_class: str = "",
) -> PruningPlan:
    """Keep the highest-scoring units so that ``ratio`` of the block parameters are removed.

    ``round_to`` keeps widths at multiples the runtime runs fast (see :func:`rounding`).
    """
    ratio = check_ratio(ratio)
    if allocation not in ("uniform", "global"):
        raise PlanError(f"allocation must be 'uniform' or 'global', got {allocation!r}")
    round_to = rounding(round_to)
    if not isinstance(min_keep, int) or isinstance(min_keep, bool) or min_keep < 1:
        raise PlanError(f"min_keep must be an integer >= 1 (a group keeping no unit is invalid), got {min_keep!r}")
    groups = select_groups(dg.groups, kinds, ignore)
    for g in groups:
        if g.name not in scores:
            raise PlanError(f"no scores for group {g.name!r}")
        if scores[g.name].shape != (g.size,):
            raise PlanError(f"scores for {g.name!r} have shape {tuple(scores[g.name].shape)}, expected ({g.size},)")
        if not torch.isfinite(scores[g.name]).all():
            raise PlanError(f"scores for {g.name!r} are not finite")
    block = dg.block_params()
    before, block_before = dg.param_count(), dg.param_count(names=block)

    def achieved(counts) -> float:
        kept = {g.axis: counts[g.name] for g in groups}
        removed = removed_by_blocks(dg, _block_keep(groups, counts, scores))
        return 1 - count_params(dg, kept, removed, names=block) / block_before

    lo, hi = 0.0, 1.0
    counts = _keep_counts(groups, scores, 0.0, allocation, round_to, min_keep)
    if ratio > 0 and groups:
        for _ in range(40):  # bisection on the fraction of units removed
            mid = (lo + hi) / 2
            if achieved(_keep_counts(groups, scores, mid, allocation, round_to, min_keep)) < ratio:
                lo = mid
            else:
                hi = mid
        c_lo = _keep_counts(groups, scores, lo, allocation, round_to, min_keep)
        c_hi = _keep_counts(groups, scores, hi, allocation, round_to, min_keep)
        counts = min((c_lo, c_hi), key=lambda c: abs(achieved(c) - ratio))
        if allocation == "uniform":
            counts = _refine_fine_kinds(groups, counts, achieved, ratio, round_to, min_keep)
    plan_groups = []
    for g in groups:
        order = torch.argsort(scores[g.name].float(), descending=True, stable=True)
        keep = sorted(order[: counts[g.name]].tolist())
        plan_groups.append(PlanGroup(g.name, g.kind, g.size, keep, [[m.param, m.dim] for m in g.members]))
    plan = PruningPlan(
        fingerprint=dg.fingerprint(), groups=plan_groups, model_class=model_class, method=method,
        ratio=ratio, allocation=allocation,
    )
    fill_counts(plan, dg)
    return plan


def fill_counts(plan: PruningPlan, dg: DependencyGraph) -> None:
    """Set the plan's before/after parameter counts from the dependency graph."""
    kept = {dg.group(g.name).axis: len(g.keep) for g in plan.groups}
    removed = removed_by_blocks(dg, {g.name: g.keep for g in plan.groups})
    block = dg.block_params()
    plan.params_before, plan.params_after = dg.param_count(), count_params(dg, kept, removed)
    plan.block_params_before = dg.param_count(names=block)
    plan.block_params_after = count_params(dg, kept, removed, names=block)


def _plan_keeping(dg: DependencyGraph, groups: list[Group], keep) -> PruningPlan:
    plan = PruningPlan(
        fingerprint=dg.fingerprint(),
        groups=[PlanGroup(g.name, g.kind, g.size, keep(g), [[m.param, m.dim] for m in g.members]) for g in groups],
    )
    fill_counts(plan, dg)
    return plan


def keep_all_plan(dg: DependencyGraph, kinds=DEFAULT_KINDS) -> PruningPlan:
    """A plan that removes nothing (every group of ``kinds`` keeps every unit)."""
    return _plan_keeping(dg, select_groups(dg.groups, kinds), lambda g: list(range(g.size)))


def random_plan(dg: DependencyGraph, kinds=ALL_KINDS, keep_prob: float = 0.6, seed: int = 0) -> PruningPlan:
    """A plan keeping each unit with probability ``keep_prob`` (every group keeps at least one unit,
    or its ``min_units``): what the exactness checks prune by, e.g. after registering an op rule."""
    gen = torch.Generator().manual_seed(seed)

    def keep(g: Group) -> list[int]:
        chosen = torch.rand(g.size, generator=gen) < keep_prob
        if int(chosen.sum()) < g.min_units:
            chosen[torch.randperm(g.size, generator=gen)[: g.min_units]] = True
        return chosen.nonzero().flatten().tolist()

    return _plan_keeping(dg, select_groups(dg.groups, kinds), keep)
