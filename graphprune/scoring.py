"""``score``: run a scoring pass over the groups of a dependency graph."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .analysis import DEFAULT_KINDS, DependencyGraph, Group
from .analysis.groups import as_names, select_groups
from .analysis.walk import fetch_attr
from .errors import GraphpruneError
from .registry import ScoringPass, get_pass


class WeightUpdates(Mapping):
    """New values of weights a pass changed, by parameter name.

    A value is a tensor or a function returning one, called each time the weight is read: the
    rewrite reads each weight once, so a pass can hand over a weight it computes cheaply from
    state it keeps anyway (LoRAPrune's ``W0 + s·B·A``) without a second copy of the model.
    """

    def __init__(self, items=None):
        self._items = dict(items._items if isinstance(items, WeightUpdates) else (items or {}))

    def set(self, name: str, value) -> None:
        self._items[name] = value

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._items[name]
        return value() if callable(value) else value

    def __iter__(self):
        return iter(self._items)

    def __contains__(self, name) -> bool:  # without computing a deferred value (Mapping's would)
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ScoringContext:
    """What a pass sees: the graph, the groups to score, and calibration data when given."""

    dg: DependencyGraph
    groups: list[Group]
    calib: object = None
    progress: bool = False
    weights: WeightUpdates = field(default_factory=WeightUpdates)  # new values set by the pass
    # calibration options (``calib`` becomes a ``graphprune.data.Calibration`` with these)
    tokenizer: object = None
    n_samples: int = 16
    seq_len: int = 128
    seed: int = 0
    example_kwargs: dict | None = None  # how the traced graph is called (compile passes the trace's)
    # the plan the scores are for, when known (iterative passes prune towards it)
    ratio: float | None = None
    kinds: tuple = DEFAULT_KINDS
    ignore: tuple = ()
    allocation: str = "uniform"
    round_to: int | dict = 1
    info: dict = field(default_factory=dict)  # facts a pass reports (fusion weights, per-layer sparsity)


    @property
    def module(self):
        return self.dg.gm

    def param(self, name: str) -> torch.Tensor:
        """A weight as the pass sees it: its updated value when the pass has set one."""
        return self.weights[name] if name in self.weights else fetch_attr(self.dg.gm, name)

    def update_weight(self, name: str, value) -> None:
        """Give parameter ``name`` a new value (e.g. merged LoRA); the rewrite starts from it.

        ``value`` is a tensor, or a function returning one (computed when the weight is read,
        see :class:`WeightUpdates`); either must have the parameter's shape.
        """
        if name not in self.dg.params:
            raise GraphpruneError(f"update_weight: {name!r} is not a parameter of the traced graph")
        old = fetch_attr(self.dg.gm, name)

        def checked(v: torch.Tensor) -> torch.Tensor:
            if tuple(v.shape) != tuple(old.shape):
                raise GraphpruneError(f"update_weight: {name!r} has shape {tuple(old.shape)}, not {tuple(v.shape)}")
            return v.detach().to(dtype=old.dtype, device=old.device)

        self.weights.set(name, (lambda: checked(value())) if callable(value) else checked(value))

    def calibration(self):
        """``calib`` as a :class:`graphprune.data.Calibration` (built once, then cached)."""
        from .data import calibration

        if self.calib is None:
            raise GraphpruneError("this pass needs calibration data: pass calib=... (a corpus name, texts or token ids)")
        if not hasattr(self, "_calibration"):
            self._calibration = calibration(self.calib, self.tokenizer, self.n_samples, self.seq_len, self.seed)
        return self._calibration

    def inputs(self, input_ids: torch.Tensor) -> dict:
        """Keyword inputs of the traced graph for a batch of token ids."""
        from .data import model_inputs

        if self.example_kwargs is None:
            self.example_kwargs = example_kwargs_of(self.dg.gm)
        return model_inputs(self.example_kwargs, input_ids)

    def plan(self, scores: dict[str, torch.Tensor], ratio: float | None = None):
        """The plan ``compile`` would make from ``scores`` (same kinds, allocation, rounding, ignore)."""
        from .plan import make_plan

        ratio = self.ratio if ratio is None else ratio
        if ratio is None:
            raise GraphpruneError("the target ratio is unknown: pass ratio= to graphprune.score (compile does)")
        return make_plan(self.dg, scores, ratio, kinds=self.kinds, allocation=self.allocation,
                         round_to=self.round_to, ignore=self.ignore)

    def unit_sums(self, group: Group, tensors: dict[str, torch.Tensor], position_fn=None) -> list[torch.Tensor]:
        """Per member of ``group`` found in ``tensors``: the tensor summed over each unit's positions.

        Each member's tensor is first summed over every dimension but the member's own, giving one
        value per position; ``position_fn`` (e.g. ``abs``) maps those before they are added into
        units. Returns float64 vectors of ``group.size``, in member order.
        """
        out = []
        for m in group.members:
            t = tensors.get(m.param)
            if t is None:
                continue
            values = t.detach().double()
            other = [d for d in range(values.dim()) if d != m.dim]
            per_pos = values.sum(dim=other) if other else values
            if position_fn is not None:
                per_pos = position_fn(per_pos)
            keep = (m.coords >= 0).to(per_pos.device)
            total = torch.zeros(group.size, dtype=torch.float64)
            total.index_add_(0, m.coords.to(per_pos.device)[keep].cpu(), per_pos[keep].cpu())
            out.append(total)
        return out

    def unit_reduce(self, group: Group, per_param: Callable[[torch.Tensor, int], torch.Tensor], tensors=None) -> torch.Tensor:
        """Sum ``per_param(tensor, dim)`` (an element-wise map) over every unit of ``group``.

        ``tensors`` maps parameter names to the tensors to use instead of the weights (e.g.
        gradients, or weight * gradient); by default the weights themselves.
        """
        total = torch.zeros(group.size, dtype=torch.float64)
        for m in group.members:
            t = (tensors or {}).get(m.param) if tensors is not None else self.param(m.param)
            if t is None:
                continue
            values = per_param(t.detach(), m.dim).double()
            other = [d for d in range(values.dim()) if d != m.dim]
            per_pos = values.sum(dim=other) if other else values
            keep = m.coords >= 0
            total.index_add_(0, m.coords[keep].to(per_pos.device).cpu(), per_pos[keep.to(per_pos.device)].cpu())
        return total.float()


def example_kwargs_of(gm) -> dict:
    """Example keyword inputs rebuilt from a traced graph's placeholders (when no trace is at hand)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out[node.name] = torch.ones([2] * val.dim(), dtype=val.dtype)
        else:
            out[node.name] = val
    return out


class Scores(dict):
    """``{group name: 1-D importance per unit}``; ``weights`` holds weights the pass changed,
    ``info`` what the pass reports about its choices (e.g. HyWIA's fusion weights)."""

    def __init__(self, scores=(), weights=None, info=None):
        super().__init__(scores)
        self.weights = WeightUpdates(weights)
        self.info: dict = dict(info or {})


def score(
    dg: DependencyGraph,
    method: str | ScoringPass = "magnitude",
    *,
    kinds=DEFAULT_KINDS,
    ignore=(),
    calib=None,
    progress: bool = False,
    tokenizer=None,
    n_samples: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    example_kwargs: dict | None = None,
    ratio: float | None = None,
    allocation: str | None = None,
    round_to: int | dict = 1,
    **config,
) -> Scores:
    """Importance of every unit of every selected group: ``{group name: 1-D tensor}`` (a :class:`Scores`).

    Data-driven passes read ``calib`` (a corpus name, path, ``datasets.Dataset``, list of strings,
    token ids or :class:`graphprune.data.Calibration`; text needs ``tokenizer``) as ``n_samples``
    windows of ``seq_len`` tokens drawn with ``seed``. ``ratio``/``allocation``/``round_to``
    describe the plan the scores are for; iterative passes (LoRAPrune) need ``ratio``.
    """
    scorer = method if isinstance(method, ScoringPass) else get_pass(method)(**config)
    if scorer.needs_calibration and calib is None:
        raise GraphpruneError(f"method {scorer.name!r} needs calibration data: pass calib=...")
    if any(p.is_meta for p in dg.gm.parameters()):
        raise GraphpruneError(
            "the model's weights are on the meta device, so nothing can be scored: load real weights, "
            "or pass a saved plan (compile(model, plan=...)) to prune structure only"
        )
    ctx = ScoringContext(
        dg, select_groups(dg.groups, kinds, ignore), calib, progress, tokenizer=tokenizer, n_samples=n_samples,
        seq_len=seq_len, seed=seed, example_kwargs=example_kwargs, ratio=ratio, kinds=as_names(kinds), ignore=as_names(ignore),
        allocation=allocation or getattr(scorer, "default_allocation", "uniform"), round_to=round_to,
    )
    scores = scorer.score(ctx)
    for g in ctx.groups:
        s = scores.get(g.name)
        if s is None or tuple(s.shape) != (g.size,):
            raise GraphpruneError(f"pass {scorer.name!r} returned no or wrongly shaped scores for {g.name!r}")
    return Scores(scores, ctx.weights, ctx.info)
