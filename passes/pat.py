"""PAT (Pruning-Aware Tuning): one hidden-size mask shared by all layers, learned with HSMs.

The pass copies the traced graph and puts a Hybrid Sparsification Module on every write into the
residual stream (:func:`graphprune.hsm.insert_hsms`: after the token embedding and after every
projection that feeds a residual add). All HSMs share the soft mask

    m_t = sigmoid(T_t z) + b_t,   T_t = 1 / (1 - log(max(1, t)) / log G),   b_t = max(0.5 - t/G, 0),

over the ``d`` hidden channels (``z`` init 0, frozen from ``freeze_at``·G; G = ``steps``). The HSM
operators (L0, L1, σ), ``z`` and optionally LoRA adapters (``lora_r > 0``, reference r = 20) are
trained with :func:`graphprune.train.train` on the calibration batches to minimise

    LM loss + sparsity_weight · |#{z ≥ 0} − D| / D            (straight-through count)
            + polarize_weight · (mean((z − ½)²) over z > 0 + mean((z + ½)²) over z ≤ 0)
            + identity_weight · Σ_HSM MSE(L0 L0ᵀ, I_r)         (every HSM, not only the last)

where ``D`` is the number of hidden channels the plan keeps at the target ratio. The binary mask
keeps the channels with ``z > 0`` when they are exactly ``D``, else the top-``D`` by ``z`` (recorded
as ``exact_count`` in the report). The HSMs are then folded into the writers' weights
(``W' = diag(σ m) (I + L1 L0) W``, σ included; :func:`graphprune.hsm.merged_weights`), LoRA into
its weights, and handed to the rewrite with ``ctx.update_weight``; the returned scores are ``z``
with the kept channels lifted above the rest, so the plan removes exactly the masked channels.
The pruned model then equals the trained HSM graph under the binary mask (the rewrite keeps the
RMSNorm divisors of the full hidden size). LayerNorm models are refused
(:func:`graphprune.hsm.check_supported`), and so is any model where that equality fails on a
calibration batch (:func:`graphprune.hsm.merge_error`, checked before training with a probe mask and
again after it; e.g. MoE experts that write into the stream through stacked-weight ops).

``mask_lr`` (default: ``lr``) gives ``z`` its own step size: ``z = (mask_lr / lr)·u`` with ``u``
trained, which under Adam moves ``z`` by about ``mask_lr`` per step (gradient clipping is shared).
Short budgets leave ``|z|`` small, so the soft mask is still far from binary when ``z`` freezes.

``init`` (default ``None``: ``z = 0``, the paper's) names a scoring pass whose ranking of the hidden
channels sets the starting logits: ``+init_margin`` for its top ``D``, ``−init_margin`` for the rest
(the polarisation targets at the default ½). Not in the paper. It is for budgets far below the
paper's: there the task loss barely separates the logits before they freeze, and the kept set is
close to a random one (SmolLM2-135M, 20%, 40 steps: 367 of 461 kept channels shared with Taylor's
choice, where chance gives 369). The logits still train, so the mask can move away from its start.
``init_calib`` (default: the text PAT trains on) is the text that pass scores on — anything
``calib=`` takes, as ``n_samples`` windows of ``seq_len``. It matters: on SmolLM2-135M, Taylor's
choice of 20% of the hidden channels scored on 32 × 128 tokens of WikiText-2 gives WikiText-2
validation perplexity 300 untrained; scored on 160 × 256 tokens of Alpaca (prompt + response) it
gives 2,231 (``docs/validation.md``; both on the validation text that still had ``<unk>`` markers).

``distill`` (default ``False``: cross entropy on the training text, the paper's) makes the task
loss the KL divergence from the unpruned model's next-token distribution at every position of the
training windows (the analysed graph is the teacher: one more forward pass per batch, no gradient).
Not in the paper; it is how ``graphprune.finetune`` recovers pruned models (``distill_from=``).

Budget: the paper tunes 7B models on instruction data for whole epochs (r = 200 at d = 4096);
the defaults here (``steps=100`` of ``batch_size=2`` calibration windows, ``lr=1e-3``, rank scaled
as ``round(d·200/4096)``) are sized for tiny models. What ran is put in ``Report.scoring["pat"]``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from graphprune.errors import GraphpruneError
from graphprune.finetune import distill_loss
from graphprune.hsm import check_supported, hidden_group, identity_loss, insert_hsms, merge_error, merged_weights
from graphprune.lora import add_lora
from graphprune.lora import merged_weights as lora_merged_weights
from graphprune.registry import ScoringPass, get_pass, register_pass
from graphprune.train import TrainConfig, causal_lm_loss, logits_of, segment_means, train


def mask_schedule(step: int, total: int) -> tuple[float, float]:
    """``(T_t, b_t)``: the mask temperature and bias at ``step`` of ``total`` (G)."""
    if total <= 1:
        return 1.0, 0.0
    frac = math.log(max(1, step)) / math.log(total)
    temperature = 1.0 / max(1.0 - frac, 1e-6)
    return temperature, max(0.5 - step / total, 0.0)


def sparsity_loss(z: torch.Tensor, temperature: float, keep: int) -> torch.Tensor:
    """``|#{z ≥ 0} − D| / D`` with the count's gradient taken from ``sigmoid(T z)`` (straight-through)."""
    soft = torch.sigmoid(temperature * z)
    count = ((z >= 0).to(soft.dtype) + soft - soft.detach()).sum()
    return (count - keep).abs() / max(keep, 1)


def polarization_loss(z: torch.Tensor) -> torch.Tensor:
    """Pull positive logits to +½ and the others to −½ (an empty side adds nothing)."""
    pos, neg = z[z > 0], z[z <= 0]
    total = z.new_zeros(())
    if pos.numel():
        total = total + (pos - 0.5).square().mean()
    if neg.numel():
        total = total + (neg + 0.5).square().mean()
    return total


def binary_mask(z: torch.Tensor, keep: int) -> tuple[torch.Tensor, bool]:
    """The kept channels (``z > 0``, or the top-``keep`` by ``z`` when that count is not ``keep``)."""
    positive = z > 0
    if int(positive.sum()) == keep:
        return positive, True
    top = torch.zeros_like(positive)
    top[torch.argsort(z, descending=True, stable=True)[:keep]] = True
    return top, False


@register_pass("pat")
class PAT(ScoringPass):
    needs_calibration = True
    default_allocation = "uniform"  # one group (the hidden size): allocation makes no difference
    default_kinds = ("hidden",)

    @dataclass(frozen=True)
    class Config:
        steps: int = 100  # optimiser steps (G of the mask schedule)
        lr: float = 1e-3
        batch_size: int = 2
        grad_accum: int = 1
        rank: int | None = None  # HSM rank r (default: round(d * 200 / 4096), the paper's 200 at d = 4096)
        freeze_at: float = 0.8  # z is frozen from this fraction of the steps
        sparsity_weight: float = 10.0
        polarize_weight: float = 1.0
        identity_weight: float = 1.0
        mask_lr: float | None = None  # the logits' own learning rate (default: lr); see score()
        init: str | None = None  # a scoring pass whose top-D channels start at +init_margin (None: z = 0, the paper's)
        init_margin: float = 0.5
        init_calib: object = None  # text the init pass scores on (a corpus name, texts, token ids; None: the training text)
        lora_r: int = 0  # LoRA rank trained alongside (0 = none; the reference uses 20)
        lora_alpha: float = 40.0
        lora_targets: tuple | None = None  # weight-name patterns (default: all block weights)
        distill: bool = False  # task loss: KL to the unpruned model's next-token distribution instead of cross entropy
        precision: str = "auto"  # TrainConfig.precision
        merge_tolerance: float = 1e-3  # max relative gap, pruned vs trained, on one calibration batch

        def __post_init__(self):
            if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
                raise GraphpruneError("pat: steps, batch_size and grad_accum must be at least 1")
            if not 0.0 < self.freeze_at <= 1.0:
                raise GraphpruneError(f"pat: freeze_at must be in (0, 1], got {self.freeze_at!r}")
            if self.lr <= 0 or (self.mask_lr is not None and self.mask_lr <= 0):
                raise GraphpruneError("pat: lr and mask_lr must be positive")
            if self.lora_r < 0:
                raise GraphpruneError(f"pat: lora_r must be >= 0, got {self.lora_r!r}")
            if self.init is not None and self.init_margin <= 0:
                raise GraphpruneError(f"pat: init_margin must be positive, got {self.init_margin!r}")
            if self.init_calib is not None and self.init is None:
                raise GraphpruneError("pat: init_calib is the text the init pass scores on; it needs init=")
            if self.init == "pat":
                raise GraphpruneError("pat: init names the pass that ranks the channels before training; it cannot be pat")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.hsm_graph = None  # the trained HSM graph; its mask is the binary one after scoring
        self.logits: torch.Tensor | None = None  # z after training
        self.keep: torch.Tensor | None = None  # the binary mask (bool per hidden channel)

    def target_keep(self, ctx, group) -> int:
        """D: the hidden channels the plan keeps at the target ratio."""
        if ctx.ratio is None:
            raise GraphpruneError("pat trains towards a target size: pass ratio= to graphprune.score (compile does)")
        plan = ctx.plan({group.name: torch.ones(group.size)})
        return len(next(pg for pg in plan.groups if pg.name == group.name).keep)

    def initial_logits(self, ctx, group, keep_count: int) -> torch.Tensor:
        """``z`` at step 0: zeros, or ``±init_margin`` from the ``init`` pass's top ``D`` channels."""
        c = self.config
        if c.init is None:
            return torch.zeros(group.size)
        if c.init_calib is not None:  # the init pass sees the other text; its facts stay out of PAT's report
            ctx = dataclasses.replace(ctx, calib=c.init_calib, info={})
        scores = get_pass(c.init)().score(ctx)[group.name].float().flatten()
        top = torch.zeros(group.size, dtype=torch.bool)
        top[torch.argsort(scores, descending=True, stable=True)[:keep_count]] = True
        return torch.where(top, c.init_margin, -c.init_margin)

    def build(self, ctx):
        """The HSM graph (with LoRA adapters when asked; the adapters sit inside the HSMs, so each
        write's LoRA branch is masked too) and its LoraGraph or None."""
        c = self.config
        check_supported(ctx.dg)
        hsm = insert_hsms(ctx.dg, rank=c.rank, seed=ctx.seed)
        if not c.lora_r:
            return hsm, None
        lora = add_lora(hsm.module, targets=list(c.lora_targets) if c.lora_targets else None, r=c.lora_r,
                        alpha=c.lora_alpha, seed=ctx.seed)
        for name in (n for s in hsm.operator_sites for n in (s.l0, s.l1, s.sigma)):
            frozen = getattr(lora.module, name)  # add_lora froze every copied parameter
            setattr(lora.module, name, torch.nn.Parameter(frozen.detach().clone()))
        hsm.module = lora.module
        return hsm, lora

    @staticmethod
    def task_loss(module, teacher, inputs: dict, ids: torch.Tensor) -> torch.Tensor:
        """Cross entropy on the window's next tokens, or (``teacher`` given) the KL divergence from the
        teacher's next-token distribution at every position of the window."""
        output = module(**inputs)
        if teacher is None:
            return causal_lm_loss(output, ids)
        with torch.no_grad():
            target = logits_of(teacher(**inputs))
        return distill_loss(logits_of(output), target, torch.ones_like(ids, dtype=torch.bool))

    def _check_merge(self, ctx, hsm, keep, base, inputs) -> float:
        """Refuse when the pruned model would not equal the HSM graph under ``keep``."""
        merged = {**base, **merged_weights(hsm, keep.float(), base)}
        error = merge_error(ctx.dg, hsm, keep, merged, inputs)
        if error > self.config.merge_tolerance:
            raise GraphpruneError(
                f"pat: the pruned model would differ from the trained one (relative error {error:.3g} > "
                f"merge_tolerance={self.config.merge_tolerance:g}): some write into the residual stream of this "
                "model is not an embedding or linear PAT can put an HSM on (e.g. stacked MoE experts)")
        return error

    def score(self, ctx):
        c = self.config
        group = hidden_group(ctx.dg)
        others = [g.name for g in ctx.groups if g.name != group.name]
        if others:
            raise GraphpruneError(f"pat prunes only the hidden size: use kinds=('hidden',) (also selected: {others})")
        if group.name not in {g.name for g in ctx.groups}:
            raise GraphpruneError("pat prunes the hidden size, but the hidden group is not selected: include 'hidden' in "
                                  "kinds= and do not ignore= modules that read or write the residual stream")
        keep_count = self.target_keep(ctx, group)
        calib = ctx.calibration()
        hsm, lora = self.build(ctx)
        device = hsm.mask.device
        probe_inputs = ctx.inputs(next(iter(calib.batches(c.batch_size))).to(device))
        self._check_merge(ctx, hsm, torch.arange(group.size) % 2 == 0, {}, probe_inputs)  # refuse before training
        # z = scale * u with u trained: Adam's steps are scale-free, so z moves at about mask_lr
        scale = (c.mask_lr / c.lr) if c.mask_lr is not None else 1.0
        u = torch.nn.Parameter((self.initial_logits(ctx, group, keep_count) / scale).to(device))
        params = [u, *hsm.hsm_parameters(), *(lora.lora_parameters() if lora is not None else [])]
        state = {"step": 0}
        teacher = ctx.dg.gm if c.distill else None  # the analysed graph: the model's own weights, untouched here
        freeze_step = int(c.freeze_at * c.steps)

        def loss_fn(module, ids):
            ids = ids.to(device)
            t = state["step"]
            temperature, bias = mask_schedule(t, c.steps)
            z = scale * u
            logits = z if t < freeze_step else z.detach()
            hsm.set_mask(torch.sigmoid(temperature * logits) + bias)
            lm = self.task_loss(module, teacher, ctx.inputs(ids), ids)
            sparse = sparsity_loss(logits, temperature, keep_count)
            polar = polarization_loss(logits)
            ident = identity_loss(hsm.l0s()).to(lm.device)
            total = lm + c.sparsity_weight * sparse + c.polarize_weight * polar + c.identity_weight * ident
            return total, {"lm": lm.item(), "sparsity": sparse.item(), "polarize": polar.item(),
                           "identity": ident.item(), "kept": int((logits.detach() >= 0).sum())}

        def on_step(step, result):
            state["step"] = step

        config = TrainConfig(steps=c.steps, lr=c.lr, grad_accum=c.grad_accum, precision=c.precision,
                             seed=ctx.seed, progress=ctx.progress, desc="pat")
        result = train(hsm.module, list(calib.batches(c.batch_size)), loss_fn, config, params=params, on_step=on_step)

        logits = (scale * u).detach().float().cpu()
        keep, exact = binary_mask(logits, keep_count)
        hsm.set_mask(keep.to(device=device, dtype=torch.float32))
        self.hsm_graph, self.logits, self.keep = hsm, logits, keep
        base = lora_merged_weights(lora) if lora is not None else {}
        error = self._check_merge(ctx, hsm, keep, base, probe_inputs)
        merged = {**base, **merged_weights(hsm, keep.float(), base)}
        for name, value in merged.items():
            ctx.update_weight(name, value)
        last = result.logs[-1] if result.logs else {}
        ctx.info["pat"] = {
            "steps": result.steps, "seconds": result.seconds, "batch_size": c.batch_size, "lr": c.lr, "mask_lr": c.mask_lr or c.lr,
            "rank": hsm.rank, "hsms": len(hsm.operator_sites), "mask_only_sites": len(hsm.sites) - len(hsm.operator_sites),
            "lora_r": c.lora_r, "init": c.init, "distill": c.distill,
            "init_calib": c.init_calib if c.init_calib is None or isinstance(c.init_calib, str) else type(c.init_calib).__name__,
            "keep": keep_count, "hidden": group.size, "exact_count": exact,
            "first_loss": result.losses[0], "last_loss": result.losses[-1], "last_terms": last,
            # the task loss as the mask hardens (it rises where the model cannot yet make up for the channels lost)
            "task_loss_by_tenth": segment_means([log["lm"] for log in result.logs]),
            "merge_error": error,
        }
        lift = float(logits.max() - logits.min()) + 1.0  # kept channels rank above every pruned one
        return {group.name: logits + lift * keep.float()}


__all__ = ["PAT", "binary_mask", "mask_schedule", "polarization_loss", "sparsity_loss"]
