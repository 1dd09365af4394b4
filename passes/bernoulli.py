"""Bernoulli masks learned by policy gradient, from forward passes only (no backprop through the LLM).

Every unit (a KV-head group, an MLP channel, a whole attention/MLP block or layer when those kinds
are selected) gets a keep-probability ``s``. Each step draws ``samples`` masks ``m ~ Bernoulli(s)``
(one mask per forward pass, shared by the batch), runs the masked dense graph
(:func:`graphprune.insert_masks`) under ``torch.no_grad()`` and measures each mask's loss ``L_j``.
With a moving-average baseline ``δ`` of the mean loss (the last ``baseline_window`` steps,
this step included), the gradient estimate of ``E[L]`` w.r.t. ``s`` is

    reference (the public code):  ĝ = 1/(K-1) Σ_j (L_j - δ)(m_j - s) / sqrt(s(1-s))
    textbook REINFORCE:           ĝ = 1/(K-1) Σ_j (L_j - δ)(m_j - s) / (s(1-s))

followed by plain SGD ``s ← s - lr_t ĝ`` with a cosine-decayed ``lr_t`` and a projection of each
unit type's probabilities onto ``{Σ clamp(s, eps, 1-eps) = k}`` (bisection on a shift), where ``k``
is that kind's kept-unit budget. The budget is global per kind, so layers may end up different.
``k`` comes from the target ratio: the kept units per kind that a uniform plan at that ratio would
keep. The final hard mask is the top-k by ``s`` per kind: the pass returns ``s`` as scores and its
default allocation is ``"global"`` (ties broken by the initial metric).

Initialisation (``init``): any registered scoring pass (``"magnitude"`` by default, ``"taylor"``,
...; ``None`` = uniform ``k/n``). Its scores are turned into probabilities as in the reference
(which uses Wanda-sp): ``sigmoid(z / init_temperature + v)`` of the per-kind z-score, with ``v``
chosen so that they sum to the budget.

``objective="lm"`` (default, the paper's) is the next-token loss on the calibration data;
``objective="kl"`` is the KL divergence from the dense model's next-token distribution (zero for
the dense model, so useless units cost exactly nothing — handy for checks on random-weight models).

Budget: the reference runs 15k steps of 128-token blocks on 7B-13B models (lr 2e-3); the defaults
here (``steps=200``, ``lr=0.005``, batches of 4) are scaled for small models. The step size matters
more than the step count: each step's estimate is mostly noise (two masks for tens of thousands of
units), and too large a step walks away from a good start. SmolLM2-135M, 50% of the MLP channels,
Taylor start, 100 steps, WikiText-2 *validation* PPL: the start alone 793, ``lr=0.05`` 1,522,
``lr=0.005`` 618. What ran — steps,
forwards, seconds, peak memory, the per-kind budget — is reported in ``Report.scoring``.
"""
from __future__ import annotations

import math
import resource
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphprune.errors import GraphpruneError
from graphprune.masking import insert_masks
from graphprune.plan import make_plan
from graphprune.registry import ScoringPass, get_pass, register_pass
from graphprune.train import causal_lm_loss, logits_of


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated CUDA memory on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def project_to_budget(s: torch.Tensor, k: float, lo: float, hi: float, iters: int = 60) -> torch.Tensor:
    """``clamp(s - v, lo, hi)`` with the shift ``v`` (bisection) that makes it sum to ``k``."""
    k = min(max(k, lo * s.numel()), hi * s.numel())
    a, b = float(s.min()) - hi, float(s.max()) - lo  # sum is n*hi at a, n*lo at b
    for _ in range(iters):
        v = (a + b) / 2
        if float((s - v).clamp(lo, hi).sum()) > k:
            a = v
        else:
            b = v
    return (s - (a + b) / 2).clamp(lo, hi)


def at_least(mask: torch.Tensor, s: torch.Tensor, floor: int) -> torch.Tensor:
    """``mask`` with at least ``floor`` units kept: the most probable dropped ones fill up. A router
    choosing k experts needs k to choose from (with none, its softmax is nan)."""
    short = floor - int(mask.sum())
    if short > 0:
        dropped = (mask == 0).nonzero().flatten()
        mask[dropped[s[dropped].argsort(descending=True)[:short]]] = 1
    return mask


def kind_budgets(ctx, ratio: float) -> dict[str, int]:
    """Kept units per kind that a uniform plan at ``ratio`` keeps (the search's budget)."""
    flat = {g.name: torch.ones(g.size) for g in ctx.groups}
    plan = make_plan(ctx.dg, flat, ratio, kinds=tuple(ctx.kinds), allocation="uniform", round_to=1, ignore=ctx.ignore)
    out: dict[str, int] = {}
    for pg in plan.groups:
        out[pg.kind] = out.get(pg.kind, 0) + len(pg.keep)
    return out


@dataclass
class SearchRecord:
    """What a search did (also put into ``ctx.info``, hence ``Report.scoring``)."""

    steps: int
    forwards: int
    seconds: float
    peak_memory_bytes: int
    budget: dict  # kind -> [kept units, units]
    losses: list  # mean sampled loss per step
    grad_enabled: bool  # was autograd on during any forward pass (must be False)
    config: dict


@register_pass("bernoulli")
class Bernoulli(ScoringPass):
    needs_calibration = True
    default_allocation = "global"  # the learned probabilities are ranked across layers per kind

    @dataclass(frozen=True)
    class Config:
        steps: int = 200  # policy-gradient steps (one calibration batch each)
        samples: int = 2  # K masks per step
        lr: float = 0.005  # SGD step on the probabilities, cosine-decayed to 0 (reference: 2e-3 on 7B)
        baseline_window: int = 5  # steps in the moving average of the mean loss
        gradient: str = "reference"  # "reference": / sqrt(s(1-s)); "textbook": / (s(1-s))
        init: str | None = "magnitude"  # a scoring pass to start from, or None (uniform)
        init_temperature: float = 1.0  # z-scores are divided by this before the sigmoid
        eps: float = 0.01  # probabilities stay in [eps, 1 - eps] so every unit keeps being sampled
        batch_size: int = 4
        objective: str = "lm"  # "lm" (next-token loss) or "kl" (from the dense model's predictions)
        keep: float | None = None  # kept fraction per kind; default: from the target ratio
        seed: int | None = None  # of the mask samples; None: compile's seed (which also draws the calibration)
        on_done: Callable | None = None  # called with the SearchRecord (benchmarks)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        if c.gradient not in ("reference", "textbook"):
            raise GraphpruneError(f"bernoulli: gradient must be 'reference' or 'textbook', not {c.gradient!r}")
        if c.objective not in ("lm", "kl"):
            raise GraphpruneError(f"bernoulli: objective must be 'lm' or 'kl', not {c.objective!r}")
        if c.samples < 2:
            raise GraphpruneError("bernoulli: samples must be at least 2 (the estimate divides by K - 1)")
        if not 0 < c.eps < 0.5:
            raise GraphpruneError(f"bernoulli: eps must be in (0, 0.5), got {c.eps}")

    # ------------------------------------------------------------ set-up
    def budgets(self, ctx) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for g in ctx.groups:
            sizes[g.kind] = sizes.get(g.kind, 0) + g.size
        if self.config.keep is not None:
            return {k: max(1, round(self.config.keep * n)) for k, n in sizes.items()}
        if ctx.ratio is None:
            raise GraphpruneError("bernoulli needs the target ratio (compile passes it) or keep=<kept fraction>")
        return kind_budgets(ctx, ctx.ratio)

    def initial(self, ctx, kinds: dict[str, list], budgets: dict[str, int]) -> tuple[dict, dict]:
        """Starting probabilities and the metric used to break ties, both ``{group: tensor}``."""
        c = self.config
        metric = get_pass(c.init)().score(ctx) if c.init else {g.name: torch.zeros(g.size) for g in ctx.groups}
        probs = {}
        for kind, groups in kinds.items():
            x = torch.cat([metric[g.name].double() for g in groups])
            n, k = x.numel(), budgets[kind]
            if c.init is None or x.std() == 0:
                s = torch.full((n,), k / n, dtype=torch.float64)
            else:
                z = (x - x.mean()) / x.std() / c.init_temperature
                lo, hi = -50.0, 50.0  # sigmoid(z + v) sums to k
                for _ in range(60):
                    v = (lo + hi) / 2
                    lo, hi = (v, hi) if float(torch.sigmoid(z + v).sum()) < k else (lo, v)
                s = torch.sigmoid(z + (lo + hi) / 2)
            s = project_to_budget(s, k, c.eps, 1 - c.eps)
            for g, part in zip(groups, s.split([g.size for g in groups])):
                probs[g.name] = part.clone()
        return probs, metric

    # ------------------------------------------------------------ search
    def score(self, ctx):
        c = self.config
        kinds: dict[str, list] = {}
        for g in ctx.groups:
            kinds.setdefault(g.kind, []).append(g)
        budgets = self.budgets(ctx)
        probs, metric = self.initial(ctx, kinds, budgets)
        floors = {g.name: g.min_units for g in ctx.groups if g.kind == "experts"}  # other groups may sample empty
        calib = ctx.calibration()
        masked = insert_masks(ctx.dg, ctx.groups, weights=ctx.weights)
        device = next((b.device for b in masked.module.buffers()), torch.device("cpu"))
        reset_peak_memory(device)
        grad_seen = []
        hook = masked.module.register_forward_pre_hook(lambda *_: grad_seen.append(torch.is_grad_enabled()))
        gen = torch.Generator().manual_seed(ctx.seed if c.seed is None else c.seed)
        batches = [ids for ids in calib.batches(c.batch_size)]
        window: deque = deque(maxlen=c.baseline_window)
        losses, t0 = [], time.perf_counter()
        bar = tqdm(total=c.steps, desc="bernoulli", disable=not ctx.progress, leave=False)
        try:
            with torch.no_grad():
                dense_cache: dict[int, torch.Tensor] = {}
                for step in range(c.steps):
                    i = step % len(batches)
                    ids, inputs = batches[i], ctx.inputs(batches[i])
                    if c.objective == "kl" and i not in dense_cache:
                        for g in ctx.groups:
                            masked.set_mask(g.name, torch.ones(g.size))
                        dense_cache[i] = F.log_softmax(logits_of(masked(**inputs)).float(), -1)
                    sampled, step_losses = [], []
                    for _ in range(c.samples):
                        m = {name: at_least(torch.bernoulli(s, generator=gen), s, floors.get(name, 0)) for name, s in probs.items()}
                        for name, mask in m.items():
                            masked.set_mask(name, mask.float())
                        out = masked(**inputs)
                        if c.objective == "lm":
                            loss = causal_lm_loss(out, ids)
                        else:
                            logp = F.log_softmax(logits_of(out).float(), -1)
                            ref = dense_cache[i]
                            loss = (ref.exp() * (ref - logp)).sum(-1).mean()
                        sampled.append(m)
                        step_losses.append(float(loss))
                    window.append(sum(step_losses) / len(step_losses))
                    baseline = sum(window) / len(window)
                    lr = c.lr * 0.5 * (1 + math.cos(math.pi * step / max(c.steps, 1)))
                    for name, s in probs.items():
                        var = (s * (1 - s)).clamp_min(1e-12)
                        scale = var.sqrt() if c.gradient == "reference" else var
                        grad = sum((L - baseline) * (m[name] - s) for L, m in zip(step_losses, sampled)) / (c.samples - 1) / scale
                        probs[name] = s - lr * grad
                    for kind, groups in kinds.items():
                        flat = project_to_budget(torch.cat([probs[g.name] for g in groups]), budgets[kind], c.eps, 1 - c.eps)
                        for g, part in zip(groups, flat.split([g.size for g in groups])):
                            probs[g.name] = part
                    losses.append(window[-1])
                    bar.update(1)
                    bar.set_postfix(loss=f"{window[-1]:.4f}")
        finally:
            bar.close()
            hook.remove()
        record = SearchRecord(
            steps=c.steps, forwards=c.steps * c.samples, seconds=time.perf_counter() - t0,
            peak_memory_bytes=peak_memory_bytes(device),
            budget={k: [budgets[k], sum(g.size for g in gs)] for k, gs in kinds.items()},
            losses=losses, grad_enabled=any(grad_seen),
            config={k: v for k, v in vars(c).items() if k != "on_done"},
        )
        ctx.info["bernoulli"] = {k: v for k, v in vars(record).items() if k != "losses"}
        if c.on_done is not None:
            c.on_done(record)
        self.probabilities = {name: s.float() for name, s in probs.items()}
        # ties (probabilities pinned at the bounds) are broken by the initial metric's rank
        out = {}
        for kind, groups in kinds.items():
            x = torch.cat([metric[g.name].double() for g in groups])
            rank = torch.argsort(torch.argsort(x, stable=True)).double() / max(x.numel(), 1)
            for g, r in zip(groups, rank.split([g.size for g in groups])):
                out[g.name] = (probs[g.name] + 1e-4 * r).float()
        return out
