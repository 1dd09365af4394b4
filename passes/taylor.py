"""Taylor importance in the style of LLM-Pruner (Ma et al., 2023): loss change if a unit is removed.

With ``g = ∂L/∂W`` from one pass over the calibration set (``passes/_gradients.py``):

* **element-wise** (fine, the reference default): a member's unit score is
  ``Σ_k |g_k W_k|`` over the unit's weights (``order="first"``), or, with ``order="second"``,
  ``Σ_k |g_k W_k − ½ W_k² F_kk|`` where ``F_kk`` is the mean squared per-sample gradient (the
  empirical Fisher; costs one backward pass per sample — the reference's ``param_mix``);
* **vector-wise** (coarse): ``|Σ g_k W_k|`` over each row/column the unit owns in a member
  (one output channel of q/k/v/gate/up, one input channel of o/down), summed over the unit's
  rows/columns — a head's score is the sum over its head_dim channels.

A group's score aggregates its members' scores: ``sum`` (default), ``mean``, ``max``,
``prod`` (ranked through the sum of logarithms: same order, no underflow), ``first`` or
``last`` member. Under GQA a unit is a KV head together with its query heads: the query rows of
query head ``j`` are credited to KV head ``j // n_rep`` because the analysis maps every q_proj row
and o_proj column to the KV group it belongs to (the reference code mixes them up).

Which layers to leave alone (the reference keeps the first 4 and last 2 of 32) is the plan's
business: ``compile(..., ignore=("model.layers.0.*", ...))``. Local allocation is the default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphprune.errors import GraphpruneError
from graphprune.registry import ScoringPass, register_pass

from ._gradients import Gradients, loss_gradients, member_params

AGGREGATES = ("sum", "mean", "max", "prod", "first", "last")


def member_scores(ctx, group, grads: Gradients, granularity: str = "element", order: str = "first") -> list[torch.Tensor]:
    """One float64 score vector over ``group``'s units per member that has a gradient."""
    tensors = {}
    for m in group.members:
        if m.param in tensors or m.param not in grads.grads:
            continue
        g, w = grads.grads[m.param], ctx.param(m.param).detach().float()
        saliency = g * w
        if granularity == "element":
            if order == "second":
                saliency = saliency - 0.5 * w.square() * grads.fisher[m.param]
            tensors[m.param] = saliency.abs()
        else:
            tensors[m.param] = saliency
    if granularity == "element":
        return ctx.unit_sums(group, tensors)
    return ctx.unit_sums(group, tensors, position_fn=torch.abs)


def aggregate(vectors: list[torch.Tensor], how: str, size: int) -> torch.Tensor:
    """Combine per-member score vectors into one per-unit score (float64)."""
    if not vectors:
        return torch.zeros(size, dtype=torch.float64)
    stack = torch.stack(vectors)
    if how == "sum":
        return stack.sum(0)
    if how == "mean":
        return stack.mean(0)
    if how == "max":
        return stack.max(0).values
    if how == "prod":
        return stack.clamp_min(1e-300).log().sum(0)
    if how == "first":
        return stack[0]
    if how == "last":
        return stack[-1]
    raise GraphpruneError(f"aggregate must be one of {AGGREGATES}, not {how!r}")


def gradients_for(ctx, order: str, batch_size: int, desc: str) -> Gradients:
    return loss_gradients(ctx, member_params(ctx), batch_size=batch_size, fisher=order == "second", desc=desc)


@register_pass("taylor")
class Taylor(ScoringPass):
    needs_calibration = True

    @dataclass(frozen=True)
    class Config:
        granularity: str = "element"  # "element" (fine) or "vector" (coarse)
        order: str = "first"  # "first": |gW|; "second": |gW - W²F/2| (element-wise only)
        aggregate: str = "sum"  # over a group's members: sum, mean, max, prod, first, last
        batch_size: int = 4  # calibration samples per backward pass (first order)

        def __post_init__(self):
            if self.granularity not in ("element", "vector"):
                raise GraphpruneError(f"taylor: granularity must be 'element' or 'vector', not {self.granularity!r}")
            if self.order not in ("first", "second"):
                raise GraphpruneError(f"taylor: order must be 'first' or 'second', not {self.order!r}")
            if self.order == "second" and self.granularity != "element":
                raise GraphpruneError("taylor: order='second' (Fisher term) is defined for granularity='element' only")
            if self.aggregate not in AGGREGATES:
                raise GraphpruneError(f"taylor: aggregate must be one of {AGGREGATES}, not {self.aggregate!r}")

    def score(self, ctx):
        c = self.config
        grads = gradients_for(ctx, c.order, c.batch_size, desc="taylor")
        ctx.info["taylor"] = {"calibration_loss": grads.loss, "samples": grads.samples}
        out = {}
        for g in ctx.groups:
            vectors = member_scores(ctx, g, grads, c.granularity, c.order)
            out[g.name] = aggregate(vectors, c.aggregate, g.size).float()
        return out


__all__ = ["Taylor", "member_scores", "aggregate", "gradients_for", "AGGREGATES"]
