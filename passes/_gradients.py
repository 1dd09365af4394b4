"""Gradients of the LM loss over the calibration set, w.r.t. chosen weights of the traced graph.

Shared by the Taylor and HyWIA passes. The graph is run with ``torch.func.functional_call`` on
*detached* views of its weights (same storage, new autograd leaves): the caller's parameters
never receive a ``.grad`` and keep their ``requires_grad``. Gradients accumulate in place in
those leaves' ``.grad`` (one gradient-sized buffer per weight, as LLM-Pruner's ``backward()``
does), averaged over samples; with ``fisher=True`` every sample gets its own backward pass, and
the mean of the squared per-sample gradients (the diagonal of the empirical Fisher) is kept too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from graphprune.errors import GraphpruneError
from graphprune.train import causal_lm_loss


@dataclass
class Gradients:
    grads: dict[str, torch.Tensor]  # mean gradient over the calibration samples (float32)
    fisher: dict[str, torch.Tensor] | None  # mean over samples of the squared per-sample gradient
    loss: float  # mean calibration loss
    samples: int


def member_params(ctx) -> list[str]:
    """Names of the trainable weights that belong to a group being scored."""
    trainable = {n for n, _ in ctx.dg.gm.named_parameters(remove_duplicate=False)}
    return sorted({m.param for g in ctx.groups for m in g.members if m.param in trainable})


def loss_gradients(ctx, names: list[str], batch_size: int = 4, fisher: bool = False, desc: str = "gradients") -> Gradients:
    """Mean gradient of the causal-LM loss over ``ctx.calibration()`` for each weight in ``names``."""
    gm = ctx.dg.gm
    every = dict(gm.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in every]
    if missing:
        raise GraphpruneError(f"cannot take gradients of {missing[:3]}: not parameters of the traced graph")
    primary = {}  # tied weights: one autograd leaf per tensor, reported under every name
    by_id: dict[int, str] = {}
    for n, p in gm.named_parameters():
        by_id.setdefault(id(p), n)
    for n in names:
        primary[n] = by_id[id(every[n])]
    overrides = {n: p.detach() for n, p in gm.named_parameters()}
    leaves = {p: ctx.param(p).detach().requires_grad_(True) for p in sorted(set(primary.values()))}
    overrides.update(leaves)
    order = list(leaves)

    calib = ctx.calibration()
    n_total = len(calib)
    step = 1 if fisher else max(1, batch_size)
    squares = {p: None for p in order} if fisher else None
    loss_sum = 0.0
    bar = tqdm(total=n_total, desc=desc, disable=not ctx.progress, leave=False)
    try:
        for ids in calib.batches(step):
            out = torch.func.functional_call(gm, overrides, (), ctx.inputs(ids), strict=False)
            loss = causal_lm_loss(out, ids)
            if not torch.isfinite(loss):
                raise GraphpruneError(f"the calibration loss is {loss.item()}: the model produces non-finite logits (fp16 overflow?)")
            share = ids.shape[0] / n_total
            loss_sum += loss.item() * share
            if squares is None:
                # accumulate into our own leaves' .grad, in place as backward produces them: one
                # gradient-sized buffer per weight, never a second copy
                (loss * share).backward()
            else:  # one sample: its own gradient, squared into the Fisher diagonal, then summed
                grads = torch.autograd.grad(loss, [leaves[p] for p in order], allow_unused=True)
                for p, g in zip(order, grads):
                    if g is None:
                        continue
                    g = g.detach().float()
                    sq = g.square().div_(n_total)
                    squares[p] = sq if squares[p] is None else squares[p].add_(sq)
                    leaf = leaves[p]
                    leaf.grad = g.mul_(share) if leaf.grad is None else leaf.grad.add_(g, alpha=share)
                del grads
            del out, loss
            bar.update(ids.shape[0])
    finally:
        bar.close()
    sums = {p: (leaves[p].grad.float() if leaves[p].grad is not None else None) for p in order}
    for leaf in leaves.values():
        leaf.grad = None

    def zero_if_none(p, t):
        return t if t is not None else torch.zeros(leaves[p].shape, dtype=torch.float32, device=leaves[p].device)

    mean = {n: zero_if_none(primary[n], sums[primary[n]]) for n in names}
    for n, g in mean.items():
        if not torch.isfinite(g).all():
            raise GraphpruneError(f"the gradient of {n!r} is not finite: check the model's precision (fp16 overflows)")
    fish = {n: zero_if_none(primary[n], squares[primary[n]]) for n in names} if squares is not None else None
    return Gradients(mean, fish, loss_sum, n_total)
