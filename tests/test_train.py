"""The shared training loop: it learns, it is deterministic, and it resumes from a checkpoint."""
import pytest
import torch

from graphprune.errors import GraphpruneError
from graphprune.train import TrainConfig, causal_lm_loss, lr_factor, segment_means, train


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 1)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return model, batches


def _mse(module, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(module(x), y)


def test_loss_goes_down_and_is_deterministic():
    runs = []
    for _ in range(2):
        model, batches = _problem()
        res = train(model, batches, _mse, TrainConfig(steps=40, lr=5e-2, progress=False))
        runs.append((res.losses, model.weight.detach().clone()))
    losses, w = runs[0]
    assert len(losses) == 40
    assert losses[-1] < 0.2 * losses[0]
    assert runs[1][0] == losses and torch.equal(runs[1][1], w)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(steps=12, lr=5e-2, grad_accum=2, progress=False, schedule="constant")
    model, batches = _problem()
    full = train(model, batches, _mse, cfg)
    w_full = model.weight.detach().clone()

    model, batches = _problem()
    ckpt = dict(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=3)
    stopped = train(model, batches, _mse, TrainConfig(**{**cfg.__dict__, **ckpt}), on_step=lambda s, r: "stop" if s == 6 else None)
    assert stopped.steps == 6
    model2, batches2 = _problem(seed=0)
    torch.nn.init.zeros_(model2.weight)  # resumed weights must come from the checkpoint
    # constant schedule and a 4-batch cycle of 2-batch steps: step 6 starts the data cycle again
    resumed = train(model2, batches2, _mse, TrainConfig(**{**cfg.__dict__, **ckpt}))
    assert resumed.steps == 12 and resumed.losses[:6] == full.losses[:6]
    assert torch.allclose(model2.weight, w_full, atol=1e-6)


def test_extra_logs_bad_config_and_no_params():
    model, batches = _problem()
    res = train(model, batches, lambda m, b: (_mse(m, b), {"half": 0.5}), TrainConfig(steps=2, progress=False))
    assert res.logs == [{"half": 0.5}, {"half": 0.5}]
    with pytest.raises(GraphpruneError, match="schedule"):
        TrainConfig(schedule="step")
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(GraphpruneError, match="nothing to train"):
        train(frozen, batches, _mse, TrainConfig(steps=1, progress=False))


def test_schedule_and_lm_loss():
    cfg = TrainConfig(steps=10, warmup_steps=2)
    assert lr_factor(cfg, 0) == 0.5 and lr_factor(cfg, 2) == 1.0 and lr_factor(cfg, 10) == pytest.approx(0.0)
    ids = torch.tensor([[1, 2, 3]])
    logits = torch.full((1, 3, 5), -1e4)
    logits[0, 0, 2] = logits[0, 1, 3] = 0.0  # predicts the next token perfectly
    assert causal_lm_loss(logits, ids).item() == pytest.approx(0.0, abs=1e-6)
    assert causal_lm_loss({"logits": torch.zeros(1, 3, 5)}, ids).item() == pytest.approx(torch.log(torch.tensor(5.0)).item())


def test_segment_means_split_the_steps_in_order():
    assert segment_means([1.0, 3.0, 5.0, 7.0], parts=2) == [2.0, 6.0]
    assert segment_means([1.0, 2.0, 3.0], parts=10) == [1.0, 2.0, 3.0]  # fewer values than parts: one each
    assert segment_means(list(map(float, range(25))))[0] == 0.5  # 25 steps in tenths: 2 or 3 steps each
    assert segment_means([]) == []
