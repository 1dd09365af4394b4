"""Recovery fine-tuning: LoRA on a pruned model, merged back into its weights.

``graphprune.finetune(compiled, data, steps=200)`` trains low-rank adapters on the pruned model
with the shared training loop (:func:`graphprune.train.train`) and folds them into the weights,
returning a new :class:`CompiledModel` that saves and loads like any other. Two back-ends:

- **peft** (default where possible): the plan applied at module level
  (:func:`graphprune.module_apply.apply_plan_to_module`, checked equal to the pruned graph) gives
  real ``nn.Linear`` layers for ``peft``; after training, ``merge_and_unload`` and the merged
  weights are copied into the pruned graph;
- **graph**: where the model's code does not follow its weights (or no module is at hand, e.g. a
  model loaded without a Hugging Face checkpoint), :func:`graphprune.lora.add_lora` adds LoRA
  branches to the graph's weights and :func:`graphprune.lora.merged_weights` folds them back.

The loss is next-token cross entropy on the data, or with ``distill_from=dense_model`` the KL
divergence from the dense model's next-token distribution (``distill_weight`` mixes the two).
Data: a ``datasets.Dataset`` (a ``text`` column, or Alpaca's ``instruction``/``input``/``output``),
a corpus name or text file (random windows), an instruction JSON file (``.json``/``.json.gz``,
Alpaca format: the loss covers the response only), a list of strings or records, or token ids.
"""
from __future__ import annotations

import copy
import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .analysis.groups import as_names, block_of
from .analysis.walk import fetch_attr
from .errors import GraphpruneError
from .train import TrainConfig, TrainResult, logits_of, segment_means, train

IGNORE = -100
# Stanford Alpaca's prompts (its train.py PROMPT_DICT), the usual format for LoRA recovery
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


# ================================================================ data
def alpaca_prompt(record: dict) -> str:
    if record.get("input", "").strip():
        return ALPACA_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_NO_INPUT.format(instruction=record["instruction"])


def read_instruction_json(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            records = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as exc:
        raise GraphpruneError(f"could not read instruction data {path}: {exc}") from exc
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "instruction" in r and "output" in r for r in records):
        raise GraphpruneError(f"{path} is not a list of {{'instruction', 'input', 'output'}} records (Alpaca format)")
    return records


def _is_instruction_path(data) -> bool:
    return isinstance(data, (str, Path)) and str(data).endswith((".json", ".json.gz"))


def instruction_examples(records, tokenizer, seq_len: int, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``n`` (input ids, labels) pairs from random records; labels cover the response and EOS only."""
    if tokenizer is None:
        raise GraphpruneError("instruction data needs a tokenizer: pass tokenizer=...")
    template = len(tokenizer(ALPACA_NO_INPUT.format(instruction=""))["input_ids"])
    if template >= seq_len:  # checked first: otherwise every record is tokenised to find this out
        raise GraphpruneError(f"no instruction example fits in seq_len={seq_len} tokens: the Alpaca prompt template "
                              f"alone is {template} tokens: raise seq_len")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in order:
        record = records[i]
        prompt = alpaca_prompt(record)
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + record["output"])["input_ids"]
        if tokenizer.eos_token_id is not None:
            full = full + [tokenizer.eos_token_id]
        full = full[:seq_len]
        labels = [IGNORE] * min(len(prompt_ids), len(full)) + full[len(prompt_ids):]
        if all(x == IGNORE for x in labels[1:]):
            continue  # the prompt alone fills the window: nothing to learn from
        out.append((full, labels))
        if len(out) == n:
            break
    if not out:
        raise GraphpruneError(f"no instruction example fits in seq_len={seq_len} tokens (its prompt alone fills the window): raise seq_len")
    return out


def _pad(examples, pad_id: int) -> dict:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    real = torch.arange(width)[None, :] < torch.tensor([len(x) for x, _ in examples])[:, None]
    return {"input_ids": ids, "labels": labels, "real": real}  # right padding: a causal model never sees it


def make_batches(data, tokenizer=None, *, batch_size: int = 4, seq_len: int = 256, n_batches: int = 1, seed: int = 0) -> list[dict]:
    """Training batches ``{"input_ids", "labels"}`` from any accepted data form (see the module docstring)."""
    from .data import Calibration, calibration

    n = batch_size * n_batches
    records = None
    if _is_instruction_path(data):
        records = read_instruction_json(data)
    elif hasattr(data, "column_names") and {"instruction", "output"} <= set(data.column_names):
        records = [dict(r) for r in data]
    elif isinstance(data, (list, tuple)) and data and all(isinstance(r, dict) for r in data):
        records = list(data)
    if records is not None:
        examples = instruction_examples(records, tokenizer, seq_len, n, seed)
        examples = (examples * (n // len(examples) + 1))[:n]  # a small set is repeated
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        return [_pad(examples[i : i + batch_size], pad) for i in range(0, n, batch_size)]
    ids = data.input_ids if isinstance(data, Calibration) else calibration(data, tokenizer, n_samples=n, seq_len=seq_len, seed=seed).input_ids
    return [{"input_ids": b, "labels": b, "real": torch.ones_like(b, dtype=torch.bool)} for b in ids.split(batch_size)]


# ================================================================ losses
def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over positions whose label is not ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=IGNORE)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, where: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, averaged over the positions whose
    next token ``where`` marks (a bool mask like the input ids; labels count as ``labels != -100``)."""
    if where.dtype != torch.bool:
        where = where != IGNORE
    keep = where[:, 1:].flatten().to(student.device)
    s = student[:, :-1].flatten(0, 1)[keep].float() / temperature
    t = teacher[:, :-1].flatten(0, 1)[keep].float().to(student.device) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


# ================================================================ fine-tuning
@dataclass
class FinetuneInfo:
    backend: str  # "peft" or "graph"
    reason: str  # why that back-end
    steps: int
    losses: list[float]
    seconds: float
    trainable_params: int
    config: dict

    @property
    def loss_by_tenth(self) -> list[float]:
        """The mean loss of each tenth of the steps: how the training moved."""
        return segment_means(self.losses)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "reason": self.reason, "steps": self.steps, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "loss_by_tenth": self.loss_by_tenth,
                "seconds": self.seconds,
                "trainable_params": self.trainable_params, "config": self.config}


def _as_compiled(model, progress: bool, first_batch: torch.Tensor):
    from .api import CompiledModel, compile
    from .trace import is_hf_model

    if isinstance(model, CompiledModel):
        return model
    if isinstance(model, torch.nn.Module):  # a dense model: a keep-all plan, LoRA on every block weight
        example = None if is_hf_model(model) else {"input_ids": first_batch[:2].repeat(2, 1)[:2]}
        return compile(model, ratio=0.0, example_kwargs=example, progress=progress)
    raise GraphpruneError(f"finetune needs a CompiledModel or an nn.Module, got {type(model).__name__}")


def _peft_targets(module: torch.nn.Module, targets) -> list[str]:
    from .lora import matches, unmatched_targets

    if targets is not None:
        # the modules of weights of 2+ dimensions (linear, embedding, conv), matched as the graph
        # back-end matches them, so both take the same targets and a typo is an error, not ignored
        names = [n for n, m in module.named_modules() if getattr(m, "weight", None) is not None and m.weight.dim() >= 2]
        patterns = list(as_names(targets))
        problem = unmatched_targets(names, patterns, "module with a weight")
        if problem:
            raise GraphpruneError(problem)
        return [n for n in names if any(matches(n, pat) for pat in patterns)]
    names = [n for n, m in module.named_modules() if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and block_of(n + ".x")]
    if not names:
        raise GraphpruneError("no nn.Linear inside a transformer block to put LoRA on: pass targets=[...]")
    return names


def finetune(
    model,
    data,
    steps: int = 100,
    *,
    tokenizer=None,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    grad_accum: int = 1,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    distill_from=None,
    distill_weight: float = 1.0,
    distill_positions: str = "labels",
    temperature: float = 1.0,
    targets=None,
    backend: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    checkpoint_dir: str | None = None,
    progress: bool = True,
):
    """LoRA recovery fine-tuning of a pruned ``CompiledModel`` (or a dense ``nn.Module``); adapters merged.

    ``backend``: ``"auto"`` (peft at module level when the plan applies there, else the graph
    pass), ``"peft"`` or ``"graph"``. ``targets``: module names, dotted suffixes (``"q_proj"``) or
    fnmatch patterns (``"*.q_proj"``), alike for both back-ends; one that matches nothing is an
    error (default: every linear weight inside the transformer blocks).
    ``distill_from``: a dense model (anything :mod:`graphprune.evaluate` can run) whose logits
    are the target; the loss is ``distill_weight · KL + (1 − distill_weight) · CE``.
    ``distill_positions``: where the KL is taken — ``"labels"`` (the positions the cross entropy
    covers: an instruction's response) or ``"all"`` (every real token, prompt included: the dense
    model has a distribution to teach there too; padding never counts).
    Returns a new ``CompiledModel`` (the input is not modified) whose ``report.seconds["finetune"]``
    and ``report.scoring["finetune"]`` record the run; ``.finetune_info`` holds the loss curve.
    """
    from .data import as_tokenizer, check_fits, check_seq_len, check_size, load_tokenizer

    if backend not in ("auto", "peft", "graph"):
        raise GraphpruneError(f"backend must be 'auto', 'peft' or 'graph', got {backend!r}")
    if distill_positions not in ("labels", "all"):
        raise GraphpruneError(f"distill_positions must be 'labels' or 'all', got {distill_positions!r}")
    if not 0.0 <= distill_weight <= 1.0:
        raise GraphpruneError(f"distill_weight must be in [0, 1], got {distill_weight}")
    # sizes, limits and the training options before any tokenizing or tracing: a bad one must not
    # cost minutes first, nor surface as a nan loss, a peft ValueError or torch.export's guard
    check_size(batch_size, "batch_size")
    check_size(lora_r, "lora_r")
    check_seq_len(seq_len)
    check_fits(model, data, seq_len, "data")
    train_config = TrainConfig(steps=steps, lr=lr, grad_accum=grad_accum, warmup_steps=warmup_steps, schedule=schedule,
                               precision=precision, seed=seed, progress=progress, desc="finetune", checkpoint_dir=checkpoint_dir)
    tokenizer = as_tokenizer(tokenizer)
    if tokenizer is None and not isinstance(data, torch.Tensor) and not hasattr(data, "input_ids"):
        raw = getattr(model, "config", None)
        config = raw if isinstance(raw, dict) else (raw.to_dict() if hasattr(raw, "to_dict") else {})
        where = (config or {}).get("_name_or_path") or (config or {}).get("name_or_path")
        if not where:
            raise GraphpruneError("text data needs a tokenizer: pass tokenizer=...")
        tokenizer = load_tokenizer(where)
    batches = make_batches(data, tokenizer, batch_size=batch_size, seq_len=seq_len, n_batches=max(1, steps * grad_accum), seed=seed)
    compiled = _as_compiled(model, progress, batches[0]["input_ids"])
    teacher = None
    if distill_from is not None:
        from .evaluate.runner import LogitsRunner

        teacher = LogitsRunner(distill_from)

    def loss_fn(call, batch):
        logits = logits_of(call(batch["input_ids"]))
        labels = batch["labels"]
        if teacher is None:
            return lm_loss(logits, labels)
        where = labels if distill_positions == "labels" else batch["real"]
        kl = distill_loss(logits, teacher(batch["input_ids"]), where, temperature)
        if distill_weight == 1.0:
            return kl, {"kl": kl.item()}
        ce = lm_loss(logits, labels)
        return distill_weight * kl + (1 - distill_weight) * ce, {"kl": kl.item(), "ce": ce.item()}

    small, reason = None, "backend='graph' asked for"
    if backend != "graph":
        small, reason = _module_level(compiled, strict=backend == "peft")
    t0 = time.perf_counter()
    if small is not None:
        weights, result, n_train = _train_peft(small, targets, lora_r, lora_alpha, seed, loss_fn, batches, train_config)
        used = "peft"
    else:
        weights, result, n_train = _train_graph(compiled, targets, lora_r, lora_alpha, seed, loss_fn, batches, train_config)
        used = "graph"
    info = FinetuneInfo(used, reason, result.steps, result.losses, time.perf_counter() - t0, n_train, {
        "steps": steps, "lora_r": lora_r, "lora_alpha": lora_alpha, "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
        "grad_accum": grad_accum, "distill": distill_from is not None, "distill_weight": distill_weight,
        "distill_positions": distill_positions, "seed": seed})
    return _with_weights(compiled, weights, info)


def _module_level(compiled, strict: bool):
    """(pruned nn.Module, why) or (None, why not)."""
    from .module_apply import ModuleApplyError

    try:
        return compiled.to_hf(check=True), "the plan applies at module level (checked equal to the graph)"
    except (ModuleApplyError, GraphpruneError) as exc:
        if strict:
            raise GraphpruneError(f"backend='peft' is impossible here: {exc}") from exc
        return None, f"module level impossible, LoRA branches added to the graph: {str(exc)[:300]}"


def _train_peft(small, targets, r, alpha, seed, loss_fn, batches, config):
    import peft

    from .module_apply import graph_weights

    torch.manual_seed(seed)  # peft initialises A at random
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=_peft_targets(small, targets), bias="none")
    try:
        wrapped = peft.get_peft_model(small, lora)
    except (ValueError, TypeError) as exc:  # e.g. a targeted module of a type peft cannot adapt
        raise GraphpruneError(f"peft could not put LoRA on targets {targets}: {exc}") from exc
    params = [p for p in wrapped.parameters() if p.requires_grad]

    device = next(small.parameters()).device
    hf = getattr(small, "config", None) is not None

    def call(ids):
        ids = ids.to(device)
        return wrapped(input_ids=ids, use_cache=False) if hf else wrapped(input_ids=ids)

    result = train(wrapped, batches, lambda _, b: loss_fn(call, b), config, params=params)
    merged = wrapped.merge_and_unload()
    weights = {n: p.detach() for n, p in merged.named_parameters(remove_duplicate=False)}
    return graph_weights(small, weights), result, sum(p.numel() for p in params)  # rescaled norms mapped back


def _train_graph(compiled, targets, r, alpha, seed, loss_fn, batches, config):
    from .data import model_inputs
    from .lora import add_lora, merged_weights

    lg = add_lora(compiled.module, targets=targets, r=r, alpha=alpha, seed=seed)
    params = lg.lora_parameters()
    kwargs = compiled.example_kwargs

    def call(ids):
        return lg.module(**model_inputs(kwargs, ids))

    result = train(lg.module, batches, lambda _, b: loss_fn(call, b), config, params=params)
    return merged_weights(lg), result, sum(p.numel() for p in params)


def _with_weights(compiled, weights: dict[str, torch.Tensor], info: FinetuneInfo):
    """A copy of ``compiled`` whose graph holds ``weights`` (by parameter name)."""
    from .api import CompiledModel

    module = copy.deepcopy(compiled.module)
    for name, tensor in weights.items():
        try:
            old = fetch_attr(module, name)
        except AttributeError:
            continue  # not in the graph (e.g. an unused parameter)
        if not isinstance(old, torch.Tensor):
            continue
        if old.shape != tensor.shape:
            raise GraphpruneError(f"fine-tuned weight {name} has shape {tuple(tensor.shape)}, the graph's is {tuple(old.shape)}")
        with torch.no_grad():
            old.copy_(tensor.to(old.dtype))
    report = copy.deepcopy(compiled.report)
    if report is not None:
        report.seconds["finetune"] = info.seconds
        report.scoring = {**(report.scoring or {}), "finetune": info.to_dict()}
    out = CompiledModel(
        module=module, plan=compiled.plan, report=report, traced=compiled.traced, dg=compiled.dg,
        example_kwargs=compiled.example_kwargs, dynamic_shapes=compiled.dynamic_shapes, config=compiled.config,
        source=compiled.source, path=None, finetune_info=info,
    )
    return out
