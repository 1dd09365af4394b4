"""Bad arguments to the public API: a clear graphprune error naming the cause, up front; nothing silently ignored."""
from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
import transformers
from conftest import analysed

import graphprune
from graphprune import GraphpruneError, PlanError
from graphprune.evaluate import perplexity
from graphprune.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


@pytest.fixture(scope="module")
def stories(stories_dir):
    """(dense stories260K, its tokenizer, a magnitude-pruned CompiledModel at 0.3)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
    return model, tok, graphprune.compile(model, 0.3, progress=False)


def ids(n: int = 2, width: int = 32, high: int = 512) -> torch.Tensor:
    return torch.randint(0, high, (n, width), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- 1. the model's position limit
def test_compile_calibration_longer_than_the_position_limit_is_rejected_up_front(stories):
    model, _, _ = stories
    with pytest.raises(GraphpruneError, match="seq_len=600 is longer than the model's limit of 512"):
        graphprune.compile(model, 0.3, method="taylor", calib="wikitext2", seq_len=600, progress=False)
    # token ids given as windows: their width is the sequence length
    with pytest.raises(GraphpruneError, match="seq_len=600 is longer than the model's limit of 512"):
        graphprune.compile(model, 0.3, method="taylor", calib=ids(width=600), progress=False)


@pytest.mark.parametrize("backend", ["auto", "graph"])
def test_finetune_longer_than_the_position_limit_is_rejected_up_front(stories, backend):
    _, _, compiled = stories
    with pytest.raises(GraphpruneError, match="seq_len=600 is longer than the model's limit of 512"):
        finetune(compiled, "wikitext2", 1, seq_len=600, backend=backend, progress=False)
    with pytest.raises(GraphpruneError, match="seq_len=600 is longer than the model's limit of 512"):
        finetune(compiled, ids(width=600), 1, backend=backend, progress=False)


def test_a_huge_seq_len_fails_at_once(stories):
    model, _, compiled = stories
    t0 = time.perf_counter()
    with pytest.raises(GraphpruneError, match="limit of 512"):
        finetune(compiled, "wikitext2", 1, seq_len=100_000, progress=False)
    with pytest.raises(GraphpruneError, match="limit of 512"):
        graphprune.compile(model, 0.3, method="taylor", calib="wikitext2", seq_len=100_000, progress=False)
    assert time.perf_counter() - t0 < 30  # no tokenizing of a whole corpus first


# ---------------------------------------------------------------- 2. sizes named, not a wrong cause
def test_sizes_must_be_positive_and_the_error_names_them(stories):
    model, _, compiled = stories
    with pytest.raises(GraphpruneError, match="n_samples must be"):
        graphprune.compile(model, 0.3, method="taylor", calib="wikitext2", n_samples=0, progress=False)
    with pytest.raises(GraphpruneError, match="seq_len must be an integer >= 2"):
        graphprune.compile(model, 0.3, method="taylor", calib="wikitext2", seq_len=1, progress=False)
    with pytest.raises(GraphpruneError, match="batch_size must be"):
        finetune(compiled, "wikitext2", 1, batch_size=0, progress=False)
    for bad in (0, 1):
        with pytest.raises(GraphpruneError, match="seq_len must be an integer >= 2"):
            finetune(compiled, "wikitext2", 1, seq_len=bad, progress=False)


# ---------------------------------------------------------------- 3. one string is one item
def test_a_single_string_is_one_kind_or_one_ignore_pattern(stories):
    model, _, _ = stories
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning per character
        one = graphprune.compile(model, 0.3, kinds="heads", ignore="model.layers.0.*", progress=False)
    both = graphprune.compile(model, 0.3, kinds=("heads",), ignore=("model.layers.0.*",), progress=False)
    assert {g.kind for g in one.plan.groups} == {"heads"}
    assert [(g.name, g.keep) for g in one.plan.groups] == [(g.name, g.keep) for g in both.plan.groups]
    assert not any(g.name.startswith("model.layers.0.") for g in one.plan.groups)
    _, _, dg = analysed("llama_gqa")
    scores = {g.name: torch.arange(g.size, dtype=torch.float32) for g in dg.groups}
    plan = graphprune.make_plan(dg, scores, 0.3, kinds="channels")
    assert {g.kind for g in plan.groups} == {"channels"}


# ---------------------------------------------------------------- 4. no raw Python/torch/peft errors
def test_perplexity_batch_size_and_tokenizer_path(stories, stories_dir):
    model, tok, _ = stories
    for bad in (0, -1):
        with pytest.raises(GraphpruneError, match="batch_size must be"):
            perplexity(model, tok, "tinystories", max_tokens=256, batch_size=bad, progress=False)
    by_path = perplexity(model, str(stories_dir), "tinystories", max_tokens=256, progress=False)
    by_object = perplexity(model, tok, "tinystories", max_tokens=256, progress=False)
    assert by_path.ppl == by_object.ppl
    with pytest.raises(GraphpruneError, match="no local tokenizer"):
        perplexity(model, str(stories_dir / "missing"), "tinystories", max_tokens=256, progress=False)


def test_compile_tokenizer_path(stories, stories_dir):
    model, tok, _ = stories
    kw = dict(method="taylor", calib="tinystories", n_samples=2, seq_len=32, progress=False)
    by_path = graphprune.compile(model, 0.3, tokenizer=str(stories_dir), **kw)
    by_object = graphprune.compile(model, 0.3, tokenizer=tok, **kw)
    assert [g.keep for g in by_path.plan.groups] == [g.keep for g in by_object.plan.groups]
    with pytest.raises(GraphpruneError, match="tokenizer"):
        graphprune.compile(model, 0.3, tokenizer=42, **kw)


def test_finetune_lora_and_learning_rate_checks(stories):
    _, _, compiled = stories
    data = ids(4, 32)
    for bad in (0, -2, 2.5):
        with pytest.raises(GraphpruneError, match="lora_r must be"):
            finetune(compiled, data, 1, lora_r=bad, batch_size=2, progress=False)
    for bad in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(GraphpruneError, match="lr must be"):
            finetune(compiled, data, 1, lr=bad, batch_size=2, progress=False)


@pytest.mark.parametrize("backend", ["peft", "graph"])
def test_finetune_targets_that_match_nothing_name_what_exists(stories, backend):
    _, _, compiled = stories
    with pytest.raises(GraphpruneError, match=r"targets \['nope'\] match no.*q_proj"):
        finetune(compiled, ids(4, 32), 1, targets=["nope"], batch_size=2, backend=backend, progress=False)


def test_finetune_targets_by_pattern_or_name_work_on_both_backends(stories):
    _, _, compiled = stories
    for backend in ("peft", "graph"):
        tuned = finetune(compiled, ids(2, 16), 1, targets=["*.q_proj"], batch_size=2, backend=backend, progress=False)
        assert tuned.finetune_info.backend == backend and tuned.finetune_info.trainable_params > 0


def test_calibration_token_ids_are_checked(stories):
    model, _, _ = stories
    with pytest.raises(GraphpruneError, match=r"vocabulary.*512"):
        graphprune.compile(model, 0.3, method="taylor", calib=torch.full((2, 32), 10**6), progress=False)
    with pytest.raises(GraphpruneError, match="integer"):
        graphprune.compile(model, 0.3, method="taylor", calib=torch.rand(4, 32), progress=False)
    with pytest.raises(GraphpruneError, match="integer"):
        graphprune.data.calibration(torch.rand(4, 32))
    _, _, compiled = stories
    with pytest.raises(GraphpruneError, match=r"vocabulary.*512"):
        finetune(compiled, torch.full((2, 32), 10**6), 1, batch_size=2, progress=False)


def test_compile_takes_a_plan_path_or_dict(stories, tmp_path):
    model, _, compiled = stories
    compiled.plan.save(tmp_path / "plan.json")
    from_path = graphprune.compile(model, plan=str(tmp_path / "plan.json"), progress=False)
    from_dict = graphprune.compile(model, plan=compiled.plan.to_dict(), progress=False)
    assert from_path.plan.to_dict() == from_dict.plan.to_dict() == compiled.plan.to_dict()
    with pytest.raises(PlanError, match="plan must be"):
        graphprune.compile(model, plan=42, progress=False)
    with pytest.raises(graphprune.LoadError, match="no plan at"):
        graphprune.compile(model, plan=tmp_path / "missing.json", progress=False)


def test_verify_checks_its_arguments(stories):
    model, _, compiled = stories
    with pytest.raises(GraphpruneError, match="CompiledModel that compile"):
        graphprune.verify(model)
    for bad in (0, -1, 1.5):
        with pytest.raises(GraphpruneError, match="trials must be"):
            graphprune.verify(compiled, trials=bad)
    assert graphprune.verify(compiled, trials=1).trials == 1


# ---------------------------------------------------------------- 5. make_plan's min_keep
@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_make_plan_min_keep_must_be_positive(bad):
    _, _, dg = analysed("llama_gqa")
    scores = {g.name: torch.arange(g.size, dtype=torch.float32) for g in dg.groups}
    with pytest.raises(PlanError, match="min_keep must be"):
        graphprune.make_plan(dg, scores, 0.95, min_keep=bad)


# ---------------------------------------------------------------- 6. ignored arguments are said
def test_a_ratio_other_than_the_replayed_plans_warns(stories):
    model, _, compiled = stories
    with pytest.warns(UserWarning, match=r"ratio=0.7 .* plan .* 0.3"):
        replayed = graphprune.compile(model, 0.7, plan=compiled.plan, progress=False)
    assert math.isclose(replayed.report.ratio, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        graphprune.compile(model, plan=compiled.plan, progress=False)  # no ratio given: the plan's
        graphprune.compile(model, 0.3, plan=compiled.plan, progress=False)  # the same ratio


def test_calibration_data_is_checked_whatever_the_method_and_a_replay_warns(stories):
    model, _, compiled = stories
    # magnitude reads none, but a plugin pass may read calib without declaring it: a bad path is an error for all
    with pytest.raises(graphprune.GraphpruneError, match="no such text file: /missing.txt"):
        graphprune.compile(model, 0.3, calib="/missing.txt", progress=False)
    with pytest.warns(UserWarning, match="replays a plan"):
        graphprune.compile(model, plan=compiled.plan, calib="wikitext2", progress=False)
