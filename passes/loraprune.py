"""LoRAPrune (Zhang et al., 2023): importance from LoRA gradients, pruning interleaved with tuning.

The traced graph gets LoRA adapters (``graphprune.lora.add_lora``: ``W = W0 + s·B·A``, ``W0``
frozen and shared with the caller's model, never given a gradient) and one 0/1 mask per group.
LoRA is fine-tuned on the calibration batches with ``graphprune.train.train``; after every
optimiser step the gradient of each adapted weight is estimated from the LoRA factors alone,

    G ≈ ∇B·A + B·∇A − ∇B·∇A,        Î = |G ⊙ (W0 + s·B·A)|      (``squared=True``: Î²),

``Î`` is summed over each unit's rows (q/k/v/gate/up) or columns (o/down) of every adapted member,
each member's vector is L2-normalised and the members of a group are added (one score per head /
MLP channel). Estimates containing NaN are skipped; the rest are folded into a moving average
``S ← β·S + (1 − β)·S_t`` (β = 0.9; the first estimate initialises ``S``).

Every ``update_every`` steps the masks follow the cubic schedule
``r_t = r_f·(1 − (1 − (t − 0.1T)/(0.8T))³)`` between 10% and 90% of the ``T`` steps (0 before,
``r_f`` after): the plan at ratio ``r_t`` (same kinds/allocation/rounding as ``compile``) is made
from ``S`` with every already-pruned unit ranked lowest, so pruned units stay pruned. After the
last step the masks are set exactly at the target ratio; the returned scores reproduce that mask
(pruned units lowest) and the merged weights ``W0 + s·B·A`` go to the rewrite through
``ctx.update_weight``.

Masks multiply weights, not activations: an output row of a linear (q/k/v/gate/up rows and their
biases) is masked on the linear's output, an input column (o/down) on its input, and any other
use of a member weight (Conv1D ``addmm``, fused ``x @ W.T``, MoE expert stacks) reads
``W ⊙ mask``. For heads and channels this equals removing the unit. The reference leaves the
first 10% of layers and the last layer unpruned: pass ``ignore=`` to ``compile`` for that.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphprune.analysis.walk import fetch_attr
from graphprune.errors import GraphpruneError
from graphprune.lora import LoraGraph, add_lora, frozen_copy, merged_weight
from graphprune.registry import ScoringPass, register_pass
from graphprune.train import TrainConfig, causal_lm_loss, train

aten = torch.ops.aten


# ================================================================ schedule
def cubic_ratio(step: int, total: int, final: float, start: float = 0.1, end: float = 0.9) -> float:
    """Target ratio after ``step`` of ``total`` steps: 0, then cubic growth, then ``final``."""
    t0, span = start * total, (end - start) * total
    if step <= t0:
        return 0.0
    if step >= t0 + span or span <= 0:
        return final
    return final * (1.0 - (1.0 - (step - t0) / span) ** 3)


# ================================================================ importance
def estimated_gradient(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """LoRAPrune's estimate of ∂L/∂W from the LoRA factors: ∇B·A + B·∇A − ∇B·∇A."""
    a, b, grad_a, grad_b = (t.float() for t in (a, b, grad_a, grad_b))
    return grad_b @ a + b @ grad_a - grad_b @ grad_a


def element_importance(base, a, b, grad_a, grad_b, scale: float, squared: bool = False) -> torch.Tensor:
    """Î = |G ⊙ (W0 + s·B·A)| (or its square) for one adapted weight."""
    merged = base.float() + scale * (b.float() @ a.float())
    value = (estimated_gradient(a, b, grad_a, grad_b) * merged).abs()
    return value.square() if squared else value


def unit_importance(ctx, lora: LoraGraph, factors: dict, squared: bool = False) -> dict[str, torch.Tensor]:
    """One LoRAPrune estimate per group: L2-normalised per-member unit sums of Î, added up.

    ``factors`` maps an adapted weight name to ``(A, B, ∇A, ∇B)``.
    """
    uses: dict[str, list] = {}  # weight -> groups that have it as a member
    for g in ctx.groups:
        for w in {m.param for m in g.members if m.param in factors}:
            uses.setdefault(w, []).append(g)
    out = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in ctx.groups}
    for w, groups in uses.items():  # one weight-sized tensor alive at a time
        imp = element_importance(lora.base(w), *factors[w], scale=lora.scale, squared=squared)
        for g in groups:
            for v in ctx.unit_sums(g, {w: imp}):
                out[g.name] += v / v.norm().clamp_min(1e-30)
        del imp
    return out


# ================================================================ masks
@dataclass
class UnitMasks:
    """One 0/1 mask buffer per group inside a GraphModule (see the module docstring)."""

    module: fx.GraphModule
    buffers: dict[str, str]  # group name -> buffer name

    def set(self, group: str, keep: torch.Tensor) -> None:
        buf = fetch_attr(self.module, self.buffers[group])
        buf.copy_(keep.to(buf.dtype))


def insert_unit_masks(gm: fx.GraphModule, groups) -> UnitMasks:
    """Mask every member weight of ``groups`` in ``gm`` (in place) by its group's mask buffer."""
    graph = gm.graph
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    getters: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            getters.setdefault(node.target, []).append(node)
    buffers, n_coords = {}, 0
    for i, g in enumerate(groups):
        buf = f"_loraprune_mask_{i}"
        gm.register_buffer(buf, torch.ones(g.size, device=device))
        buffers[g.name] = buf
        for m in g.members:
            if m.param not in getters or not isinstance(fetch_attr(gm, m.param), torch.nn.Parameter):
                continue
            coords = f"_loraprune_coords_{n_coords}"
            n_coords += 1
            gm.register_buffer(coords, torch.where(m.coords < 0, g.size, m.coords).to(device))
            ndim = fetch_attr(gm, m.param).dim()
            for getter in getters[m.param]:
                for user in list(getter.users):
                    _mask_use(graph, getter, user, buf, coords, m.dim, ndim)
    graph.lint()
    gm.recompile()
    return UnitMasks(gm, buffers)


def _position_mask(graph: fx.Graph, buf: str, coords: str, like: fx.Node, shape: list[int]) -> fx.Node:
    """Nodes (inserted at the current point) giving the mask per position, shaped and typed."""
    mask = graph.get_attr(buf)
    one = graph.call_function(aten.new_ones.default, (mask, [1]))  # the value for "not in this group"
    padded = graph.call_function(aten.cat.default, ([mask, one],))
    picked = graph.call_function(aten.index_select.default, (padded, 0, graph.get_attr(coords)))
    view = graph.call_function(aten.view.default, (picked, shape))
    return graph.call_function(aten.type_as.default, (view, like))


def _mask_use(graph, getter, user, buf, coords, dim, ndim) -> None:
    is_linear_weight = user.op == "call_function" and user.target == aten.linear.default and len(user.args) > 1 and user.args[1] is getter
    if is_linear_weight and dim == 0:  # output features: mask the linear's result
        with graph.inserting_before(user.next):
            mask = _position_mask(graph, buf, coords, user, [-1])
            masked = graph.call_function(aten.mul.Tensor, (user, mask))
        user.replace_all_uses_with(masked, delete_user_cb=lambda u: u is not masked and u is not mask)
    elif is_linear_weight and dim == 1:  # input features: mask the linear's input
        x = user.args[0]
        with graph.inserting_before(user):
            mask = _position_mask(graph, buf, coords, x, [-1])
            masked = graph.call_function(aten.mul.Tensor, (x, mask))
        user.update_arg(0, masked)
    else:  # any other reader sees the masked weight
        shape = [1] * ndim
        shape[dim] = -1
        with graph.inserting_before(user):
            mask = _position_mask(graph, buf, coords, getter, shape)
            masked = graph.call_function(aten.mul.Tensor, (getter, mask))
        user.replace_input_with(getter, masked)


# ================================================================ the pass
@register_pass("loraprune")
class LoRAPrune(ScoringPass):
    needs_calibration = True

    @dataclass(frozen=True)
    class Config:
        r: int = 8  # LoRA rank
        alpha: float = 16.0  # LoRA scale s = alpha / r
        targets: tuple | None = None  # weight-name patterns to adapt (default: all block weights)
        steps: int = 100  # optimiser steps of LoRA fine-tuning (T)
        lr: float = 1e-4
        batch_size: int = 2
        update_every: int = 10  # optimiser steps between mask updates
        beta: float = 0.9  # moving average of the importance
        squared: bool = False  # Î = (G ⊙ W)² instead of |G ⊙ W|
        schedule_start: float = 0.1  # fraction of T where pruning starts
        schedule_end: float = 0.9  # fraction of T where the target ratio is reached
        precision: str = "auto"  # TrainConfig.precision

        def __post_init__(self):
            if self.steps < 1 or self.update_every < 1 or self.batch_size < 1:
                raise GraphpruneError("loraprune: steps, update_every and batch_size must be at least 1")
            if not 0.0 <= self.beta < 1.0:
                raise GraphpruneError(f"loraprune: beta must be in [0, 1), got {self.beta!r}")
            if not 0.0 <= self.schedule_start <= self.schedule_end <= 1.0:
                raise GraphpruneError("loraprune: need 0 <= schedule_start <= schedule_end <= 1")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.lora_graph: LoraGraph | None = None  # the adapted, masked graph after scoring
        self.masks: UnitMasks | None = None
        self.importance: dict[str, torch.Tensor] = {}  # the moving average S
        self.pruned: dict[str, torch.Tensor] = {}  # boolean per group: units masked out
        self.history: list[dict] = []  # mask updates: step, scheduled ratio, units pruned
        self._final_removed: dict[str, int] | None = None

    # ------------------------------------------------------------ pieces
    def _ranked(self, ctx) -> dict[str, torch.Tensor]:
        """S with every pruned unit shifted below every live unit (pruned units keep their order)."""
        every = torch.cat([self.importance[g.name] for g in ctx.groups])
        live = torch.cat([self.importance[g.name][~self.pruned[g.name]] for g in ctx.groups])
        low = live.min() if live.numel() else every.min()
        shift = (every.max() - low + 1.0).clamp_min(1.0)
        return {g.name: (self.importance[g.name] - shift * self.pruned[g.name]).float() for g in ctx.groups}

    def _prune_to(self, ctx, ratio: float) -> None:
        """Mask more units so that about ``ratio`` of the block parameters are gone; never unmask."""
        ranked = self._ranked(ctx)
        if self._final_removed is not None:
            # uniform allocation: each group's final count does not depend on the scores, so the
            # schedule removes that count's share r_t / r_f — monotone, and exact at the end
            share = ratio / ctx.ratio if ctx.ratio > 0 else 0.0
            counts = {name: int(round(share * n)) for name, n in self._final_removed.items()}
        else:
            plan = ctx.plan(ranked, ratio)
            counts = {pg.name: pg.size - len(pg.keep) for pg in plan.groups}
        for g in ctx.groups:
            n = max(counts[g.name], int(self.pruned[g.name].sum()))
            lowest = torch.argsort(ranked[g.name], stable=True)[:n]  # pruned units come first
            self.pruned[g.name][lowest] = True
            self.masks.set(g.name, ~self.pruned[g.name])

    def _fold(self, estimate: dict[str, torch.Tensor]) -> None:
        if any(torch.isnan(v).any() for v in estimate.values()):
            return  # the reference skips an update with a NaN anywhere
        b = self.config.beta
        for name, v in estimate.items():
            old = self.importance.get(name)
            self.importance[name] = v if old is None else b * old + (1 - b) * v

    # ------------------------------------------------------------ score
    def score(self, ctx):
        c = self.config
        if ctx.ratio is None:
            raise GraphpruneError("loraprune prunes iteratively towards a target: pass ratio= to graphprune.score (compile does)")
        calib = ctx.calibration()
        base = frozen_copy(ctx.dg.gm)
        masks = insert_unit_masks(base, ctx.groups)
        lora = add_lora(base, targets=list(c.targets) if c.targets else None, r=c.r, alpha=c.alpha, seed=ctx.seed)
        self.lora_graph = lora
        self.masks = UnitMasks(lora.module, masks.buffers)  # add_lora copied the graph: same buffer names
        for g in ctx.groups:
            if not any(m.param in lora.adapters for m in g.members):
                raise GraphpruneError(f"loraprune: no member of group {g.name!r} has a LoRA adapter; widen targets=")
        if any(p.requires_grad for n, p in lora.module.named_parameters() if n not in _lora_names(lora)):
            raise GraphpruneError("loraprune: a base weight requires grad (internal error)")
        self.importance, self.history = {}, []
        self.pruned = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in ctx.groups}
        self._final_removed = None
        if ctx.allocation == "uniform":
            dummy = {g.name: torch.zeros(g.size) for g in ctx.groups}
            self._final_removed = {pg.name: pg.size - len(pg.keep) for pg in ctx.plan(dummy).groups}

        captured: dict[str, list] = {}  # weight -> [A, B, ∇A, ∇B] as of the last backward
        slots = {}
        for w, (a_name, b_name) in lora.adapters.items():
            slots[a_name], slots[b_name] = (w, 0), (w, 1)
        handles = []
        for name, p in zip(_lora_names(lora), lora.lora_parameters()):
            w, k = slots[name]

            def keep_grad(param, w=w, k=k):
                entry = captured.setdefault(w, [None] * 4)
                entry[k], entry[k + 2] = param.detach().clone(), param.grad.detach().clone()

            handles.append(p.register_post_accumulate_grad_hook(keep_grad))

        def on_step(step, result):
            if len(captured) == len(lora.adapters) and all(t is not None for v in captured.values() for t in v):
                self._fold(unit_importance(ctx, lora, {w: tuple(v) for w, v in captured.items()}, c.squared))
            captured.clear()
            if step % c.update_every == 0 and step < c.steps and self.importance:
                target = cubic_ratio(step, c.steps, ctx.ratio, c.schedule_start, c.schedule_end)
                self._prune_to(ctx, target)
                self.history.append({"step": step, "ratio": target, "pruned": int(sum(v.sum() for v in self.pruned.values()))})

        def loss_fn(module, ids):
            return causal_lm_loss(module(**ctx.inputs(ids)), ids)

        config = TrainConfig(steps=c.steps, lr=c.lr, precision=c.precision, seed=ctx.seed, progress=ctx.progress, desc="loraprune")
        try:
            result = train(lora.module, list(calib.batches(c.batch_size)), loss_fn, config, params=lora.lora_parameters(), on_step=on_step)
        finally:
            for h in handles:
                h.remove()
        if not self.importance:
            raise GraphpruneError("loraprune: every importance estimate was NaN; lower lr or use fp32")
        self._prune_to(ctx, ctx.ratio)  # exact prune to the target
        # What compile will keep from these scores. Under global allocation the plan at the target
        # can keep more units of a group than the schedule had masked (counts there depend on the
        # scores); then the best masked ones (by S) come back, and the masks follow the plan.
        scores = self._ranked(ctx)
        final = ctx.plan(scores)
        regrown = 0
        for pg in final.groups:
            keep = torch.zeros(pg.size, dtype=torch.bool)
            keep[torch.as_tensor(pg.keep, dtype=torch.long)] = True
            regrown += int((keep & self.pruned[pg.name]).sum())
            self.pruned[pg.name] = ~keep
            self.masks.set(pg.name, keep)
        self.history.append({"step": c.steps, "ratio": ctx.ratio, "pruned": int(sum(v.sum() for v in self.pruned.values()))})
        # merged when the rewrite reads each weight: no second copy of the adapted weights here
        for name in lora.adapters:
            ctx.update_weight(name, functools.partial(merged_weight, lora, name))
        ctx.info["loraprune"] = {
            "steps": result.steps, "first_loss": result.losses[0], "last_loss": result.losses[-1],
            "adapters": len(lora.adapters), "mask_updates": list(self.history), "regrown_at_end": regrown,
        }
        return scores


def _lora_names(lora: LoraGraph) -> list[str]:
    return [n for pair in lora.adapters.values() for n in pair]


__all__ = ["LoRAPrune", "cubic_ratio", "estimated_gradient", "element_importance", "unit_importance", "insert_unit_masks"]
