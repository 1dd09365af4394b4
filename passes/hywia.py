"""HyWIA: hybrid-grained weight importance, fused per layer by a training-free attention.

Same gradients and groups as the Taylor pass. For each group (one layer's units of one kind) it
computes the fine-grained score ``I_f`` (element-wise Taylor) and the coarse-grained score
``I_c`` (vector-wise Taylor), normalises both, treats the two normalised vectors as two tokens
and weighs them with attention: ``α = softmax(q·[ĩ_f, ĩ_c]ᵀ / (√n·T))`` with the query ``q`` the
mean of the two tokens (``query="mean"``) or, with ``query="self"``, full self-attention over
the two tokens, ``α`` being the average attention each token receives. The unit score is
``α_f ĩ_f + α_c ĩ_c``. Units are then ranked globally (``compile`` defaults to
``allocation="global"`` for this pass), so layers end up with different sparsity.

Choices where the paper is not specific (no public code):

* ``normalize="mean"`` (default) divides each score vector by its mean. The methods note
  suggests z-score or L2 normalisation, but those give both tokens the same norm, and with a
  query that treats the two tokens alike (their mean, or self-attention) the two logits are then
  *equal*: ``α = (½, ½)`` whatever the data. Dividing by the mean keeps the scales comparable
  (both vectors average 1) while the squared norm, ``n·(1 + CV²)``, grows with the spread of
  the scores — so attention favours the granularity that separates the units more. ``"zscore"``
  and ``"l2"`` are available (they reduce HyWIA to an equal-weight average).
* One fusion per group: a group already is one layer's units of one kind (heads, MLP channels).
* ``temperature`` (default 1) divides the logits on top of ``√n``; the weights are sharp for
  wide layers, because the logit gap grows as ``√n`` (on SmolLM2-135M's 1536-wide MLPs the
  attention gives the coarse score almost all the weight; ``temperature≈√n`` makes it soft).
  There, softer is better at both ratios (WikiText-2 *validation* PPL, MLP channels; T = 1, 39,
  1000: 87.8, 75.7, 68.6 at 20% and 1,419, 1,090, 888 at 50%), so the quality benchmark runs
  T = 1000, where the two granularities weigh about the same (``docs/validation.md``).
* ``scale="fine"`` (default) multiplies the fused vector by the group's mean fine-grained score
  before the global ranking. Normalising makes every group average 1, which would throw away how
  much a layer matters as a whole: the global ranking would compare only the *shapes* of the
  layers' score distributions. Measured on SmolLM2-135M at 20% (MLP channels, WikiText-2
  *validation* PPL, dense 42.2): ``"none"`` 109.6, ``"fine"`` 87.8, ``"coarse"`` 87.4.

The fusion weights used and, when the target ratio is known, the sparsity the plan gives each
group are kept on the pass (``fusion_weights``, ``layer_sparsity``) and reported in
``Scores.info["hywia"]`` (and so in ``compile(...).report.scoring``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphprune.errors import GraphpruneError
from graphprune.registry import ScoringPass, register_pass

from .taylor import aggregate, gradients_for, member_scores

EPS = 1e-12


def normalise(v: torch.Tensor, how: str) -> torch.Tensor:
    """Make a score vector comparable with another one (see the module docstring)."""
    v = v.double()
    if how == "mean":
        m = v.mean()
        return v / m if m.abs() > EPS else torch.zeros_like(v)
    if how == "zscore":
        s = v.std(unbiased=False)
        return (v - v.mean()) / s if s > EPS else torch.zeros_like(v)
    if how == "l2":
        n = v.norm()
        return v / n if n > EPS else torch.zeros_like(v)
    raise GraphpruneError(f"hywia: normalize must be 'mean', 'zscore' or 'l2', not {how!r}")


def fusion_weights(fine: torch.Tensor, coarse: torch.Tensor, query: str = "mean", temperature: float = 1.0) -> torch.Tensor:
    """Attention weights ``[α_f, α_c]`` (summing to one) of two normalised score vectors."""
    tokens = torch.stack([fine.double(), coarse.double()])
    scale = math.sqrt(tokens.shape[1]) * temperature
    if query == "mean":
        return torch.softmax(tokens @ tokens.mean(0) / scale, dim=0)
    if query == "self":
        attention = torch.softmax(tokens @ tokens.T / scale, dim=-1)  # row i: how token i attends
        return attention.mean(0)
    raise GraphpruneError(f"hywia: query must be 'mean' or 'self', not {query!r}")


def fuse(i_fine: torch.Tensor, i_coarse: torch.Tensor, normalize: str = "mean", query: str = "mean",
         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused score vector, ``[α_f, α_c]``) for one group's fine and coarse scores."""
    f, c = normalise(i_fine, normalize), normalise(i_coarse, normalize)
    alpha = fusion_weights(f, c, query, temperature)
    return alpha[0] * f + alpha[1] * c, alpha


@register_pass("hywia")
class HyWIA(ScoringPass):
    needs_calibration = True
    default_allocation = "global"

    @dataclass(frozen=True)
    class Config:
        order: str = "first"  # fine score: "first" |gW| or "second" |gW - W²F/2|
        aggregate: str = "sum"  # over a group's members: sum, mean or max
        normalize: str = "mean"  # "mean", "zscore" or "l2" (see the module docstring)
        query: str = "mean"  # "mean" (mean of the two tokens) or "self" (self-attention)
        temperature: float = 1.0
        scale: str = "fine"  # "fine", "coarse" or "none": the group's own scale the fused score is put back on
        batch_size: int = 4

        def __post_init__(self):
            if self.order not in ("first", "second"):
                raise GraphpruneError(f"hywia: order must be 'first' or 'second', not {self.order!r}")
            if self.aggregate not in ("sum", "mean", "max"):
                raise GraphpruneError(f"hywia: aggregate must be 'sum', 'mean' or 'max' (scores must stay non-negative), not {self.aggregate!r}")
            if self.normalize not in ("mean", "zscore", "l2") or self.query not in ("mean", "self"):
                raise GraphpruneError(f"hywia: normalize in mean/zscore/l2 and query in mean/self, got {self.normalize!r}, {self.query!r}")
            if self.scale not in ("none", "fine", "coarse"):
                raise GraphpruneError(f"hywia: scale must be 'none', 'fine' or 'coarse', not {self.scale!r}")
            if not self.temperature > 0:
                raise GraphpruneError(f"hywia: temperature must be positive, got {self.temperature!r}")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.fusion_weights: dict[str, tuple[float, float]] = {}
        self.layer_sparsity: dict[str, float] = {}

    def score(self, ctx):
        c = self.config
        grads = gradients_for(ctx, c.order, c.batch_size, desc="hywia")
        out = {}
        self.fusion_weights, self.layer_sparsity = {}, {}
        for g in ctx.groups:
            i_f = aggregate(member_scores(ctx, g, grads, "element", c.order), c.aggregate, g.size)
            i_c = aggregate(member_scores(ctx, g, grads, "vector"), c.aggregate, g.size)
            fused, alpha = fuse(i_f, i_c, c.normalize, c.query, c.temperature)
            if c.scale != "none":
                fused = fused * (i_f if c.scale == "fine" else i_c).double().mean()
            out[g.name] = fused.float()
            self.fusion_weights[g.name] = (float(alpha[0]), float(alpha[1]))
        if ctx.ratio is not None and ctx.groups:
            plan = ctx.plan(out)
            self.layer_sparsity = {pg.name: 1 - len(pg.keep) / pg.size for pg in plan.groups}
        ctx.info["hywia"] = {
            "fusion_weights": {k: {"fine": a, "coarse": b} for k, (a, b) in self.fusion_weights.items()},
            "layer_sparsity": dict(self.layer_sparsity),
            "allocation": ctx.allocation,
            "calibration_loss": grads.loss,
        }
        return out


__all__ = ["HyWIA", "fuse", "fusion_weights", "normalise"]
