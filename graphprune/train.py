"""One training loop for every method that trains (LoRAPrune, PAT, recovery fine-tuning).

AdamW over the given tensors, gradient accumulation, warm-up + cosine/linear/constant schedule,
gradient clipping, bf16 autocast where the device supports it, a progress bar showing the loss,
deterministic with a seed, and resumable: with ``checkpoint_dir`` the trainable tensors, the
optimiser, the step and the RNG state are saved atomically every ``checkpoint_every`` steps and
picked up again by the next call with the same directory.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import GraphpruneError
from .plan import atomic_write

CHECKPOINT = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimiser steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_accum: int = 1  # batches per optimiser step
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warm-up)
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # "auto": bf16 autocast on a CUDA device that supports it, else fp32
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0 = only at the end (when checkpoint_dir is set)

    def __post_init__(self):
        if self.steps < 0 or self.grad_accum < 1:
            raise GraphpruneError(f"steps must be >= 0 and grad_accum >= 1 (got {self.steps}, {self.grad_accum})")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not math.isfinite(self.lr) or self.lr < 0:
            raise GraphpruneError(f"lr must be a finite number >= 0, got {self.lr!r}")  # not torch's "Invalid learning rate"
        if self.schedule not in ("cosine", "linear", "constant"):
            raise GraphpruneError(f"schedule must be cosine, linear or constant, not {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise GraphpruneError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimiser step (mean over accumulation)
    logs: list[dict] = field(default_factory=list)  # extra values returned by loss_fn, per step
    steps: int = 0
    seconds: float = 0.0


def segment_means(values: list[float], parts: int = 10) -> list[float]:
    """How a training curve moved: the mean of each of ``parts`` consecutive, near-equal slices of ``values`` (fewer when there are fewer values)."""
    n = len(values)
    slices = [values[i * n // parts:(i + 1) * n // parts] for i in range(parts)]
    return [sum(v) / len(v) for v in slices if v]


def causal_lm_loss(output, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``output``'s logits on ``input_ids``."""
    logits = logits_of(output)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten().to(logits.device))


def logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"] if "logits" in output else next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output[0]
    raise GraphpruneError(f"cannot find logits in a model output of type {type(output).__name__}")


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(config: TrainConfig, device: torch.device):
    use_bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _save_checkpoint(path: Path, params, optimizer, result: TrainResult) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "params": [p.detach().cpu() for p in params],
        "optimizer": optimizer.state_dict(),
        "result": asdict(result),
        "rng": torch.get_rng_state(),
    }
    atomic_write(path / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, params, optimizer) -> TrainResult | None:
    file = path / CHECKPOINT
    if not file.exists():
        return None
    try:
        state = torch.load(file, weights_only=False)
    except Exception as exc:
        raise GraphpruneError(f"corrupt training checkpoint {file}: {type(exc).__name__}: {exc}") from exc
    if len(state["params"]) != len(params) or any(a.shape != b.shape for a, b in zip(state["params"], params)):
        raise GraphpruneError(f"the checkpoint {file} was written for other trainable tensors")
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved.to(p.device))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return TrainResult(**state["result"])


def _cycle(batches: Iterable):
    if isinstance(batches, Iterable) and not hasattr(batches, "__next__"):
        return itertools.chain.from_iterable(itertools.repeat(batches))  # re-iterate a list/Dataset forever
    return batches  # an iterator (or generator) is consumed as is


def train(
    module: torch.nn.Module,
    batches: Iterable,
    loss_fn: Callable,
    config: TrainConfig | None = None,
    params: list[torch.Tensor] | None = None,
    on_step: Callable[[int, TrainResult], object] | None = None,
) -> TrainResult:
    """Minimise ``loss_fn(module, batch)`` over ``params`` for ``config.steps`` optimiser steps."""
    config = config or TrainConfig()
    params = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    if not params:
        raise GraphpruneError("nothing to train: no tensor with requires_grad=True")
    torch.manual_seed(config.seed)
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    result = (_load_checkpoint(ckpt, params, optimizer) if ckpt else None) or TrainResult()
    stream = _cycle(batches)
    was_training = module.training
    module.train()
    t0 = time.perf_counter() - result.seconds
    bar = tqdm(total=config.steps, initial=result.steps, desc=config.desc, disable=not config.progress, leave=False)
    try:
        while result.steps < config.steps:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(config, result.steps)
            total, extras = 0.0, {}
            for _ in range(config.grad_accum):
                try:
                    batch = next(stream)
                except StopIteration:
                    raise GraphpruneError(f"the training data ran out after {result.steps} steps") from None
                with _autocast(config, device):
                    out = loss_fn(module, batch)
                loss, logged = out if isinstance(out, tuple) else (out, {})
                if not torch.isfinite(loss):
                    raise GraphpruneError(f"the loss became {loss.item()} at step {result.steps}: lower lr or use fp32")
                (loss / config.grad_accum).backward()
                total += loss.item() / config.grad_accum
                for k, v in logged.items():
                    extras[k] = extras.get(k, 0.0) + float(v) / config.grad_accum
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.losses.append(total)
            result.logs.append(extras)
            result.seconds = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            if ckpt and config.checkpoint_every and result.steps % config.checkpoint_every == 0:
                _save_checkpoint(ckpt, params, optimizer, result)
            if on_step is not None and on_step(result.steps, result) == "stop":
                break
    finally:
        bar.close()
        module.train(was_training)
    if ckpt:
        _save_checkpoint(ckpt, params, optimizer, result)
    return result
