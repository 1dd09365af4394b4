"""LoRA recovery fine-tuning: the loss goes down, the adapters are merged, the result saves and loads."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import SHARED
from zoo import ALL, example_inputs

import graphprune
from graphprune.data import calibration
from graphprune.finetune import IGNORE, alpaca_prompt, finetune, make_batches, read_instruction_json
from graphprune.train import logits_of


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (see conftest)


def nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = logits_of(model(input_ids=ids, use_cache=False))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def stories(stories_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
    return model, tok, graphprune.compile(model, ratio=0.5, progress=False)


def test_finetune_lowers_loss_and_round_trips(stories, tmp_path):
    model, tok, compiled = stories
    dense_state = copy.deepcopy(model.state_dict())
    graph_state = copy.deepcopy(compiled.module.state_dict())
    ids = calibration("tinystories", tok, n_samples=2, seq_len=64).input_ids
    tuned = finetune(compiled, ids, steps=6, lr=5e-3, batch_size=2, progress=False)
    info = tuned.finetune_info
    assert info.backend == "peft" and info.steps == 6 and info.trainable_params > 0
    assert info.losses[-1] < info.losses[0]
    assert nll(tuned, ids) < nll(compiled, ids)  # the merged weights carry what was learnt
    assert tuned.num_parameters() == compiled.num_parameters()  # adapters merged, nothing added
    assert tuned.report.scoring["finetune"]["steps"] == 6 and "finetune" in tuned.report.seconds
    assert tuned.report.scoring["finetune"]["loss_by_tenth"] == info.losses  # six steps: one per slice
    # inputs untouched
    assert all(torch.equal(dense_state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(graph_state[k], v) for k, v in compiled.module.state_dict().items())
    # verify compares with the dense model: a fine-tuned one differs by design, which it says instead of "MISMATCH"
    assert graphprune.verify(compiled).ok
    with pytest.raises(graphprune.GraphpruneError, match="fine-tuned one differs from it by design"):
        graphprune.verify(tuned)
    with pytest.raises(graphprune.GraphpruneError, match=r"reconstruct refits .* before finetune\(\)"):
        graphprune.reconstruct(tuned, ids)  # a refit would throw away what was learnt
    # saves and loads like any compiled model
    again = graphprune.load(tuned.save(tmp_path / "tuned", hf=False, plot=False))
    assert again.finetune_info is None  # the loss curve is in the saved report, the analysis is not
    for needs_analysis in (graphprune.verify, lambda m: graphprune.reconstruct(m, ids)):
        with pytest.raises(graphprune.GraphpruneError, match=r"dense model's analysis: .* not load\(\)"):
            needs_analysis(again)
    probe = torch.tensor([[1, 403, 407, 261], [1, 300, 301, 302]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=probe, use_cache=False).logits, tuned(input_ids=probe, use_cache=False).logits)


def test_distillation_from_dense_model(stories):
    model, tok, compiled = stories
    ids = calibration("tinystories", tok, n_samples=2, seq_len=48, seed=1).input_ids
    tuned = finetune(compiled, ids, steps=4, lr=5e-3, batch_size=2, distill_from=model, backend="graph", progress=False)
    info = tuned.finetune_info
    assert info.backend == "graph" and info.losses[-1] < info.losses[0]
    assert info.config["distill"] is True


def test_graph_backend_where_module_level_is_impossible(tmp_path):
    model = ALL["fused_qkv_attn"]()  # reshapes by a stored width: pruned heads cannot run at module level
    compiled = graphprune.compile(model, ratio=0.4, kinds=("heads", "channels"), example_kwargs=example_inputs("fused_qkv_attn"), progress=False)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    tuned = finetune(compiled, ids, steps=5, lr=1e-2, batch_size=4, progress=False)
    info = tuned.finetune_info
    assert info.backend == "graph" and "module level impossible" in info.reason
    assert info.losses[-1] < info.losses[0]
    with pytest.raises(graphprune.GraphpruneError, match="backend='peft' is impossible"):
        finetune(compiled, ids, steps=1, backend="peft", progress=False)
    again = graphprune.load(tuned.save(tmp_path / "g", plot=False))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids[:2]), tuned(input_ids=ids[:2]))


def test_dense_module_is_finetuned_too():
    model = ALL["tiny_mlp_lm"]()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    tuned = finetune(model, ids, steps=3, lr=1e-2, batch_size=2, progress=False)
    assert isinstance(tuned, graphprune.CompiledModel) and tuned.plan.params_after == tuned.plan.params_before
    assert tuned.finetune_info.backend == "peft"
    assert not torch.equal(tuned(input_ids=ids), model(input_ids=ids))


def test_alpaca_batches_train_on_the_response_only(stories_dir, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
    path = SHARED / "data" / "instruct" / "alpaca_data.json.gz"
    batches = make_batches(str(path), tok, batch_size=2, seq_len=400, n_batches=2, seed=0)
    assert len(batches) == 2
    records = read_instruction_json(path)
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == labels.shape and ids.shape[0] == 2
        for row in range(2):
            labelled = (labels[row] != IGNORE).nonzero().flatten()
            assert len(labelled) > 0
            first = int(labelled[0])
            prompt = tok.decode(ids[row, :first])
            assert "### Response:" in prompt and prompt.rstrip().endswith("### Response:")
            assert torch.equal(labels[row, labelled], ids[row, labelled])
    assert "### Input:" in alpaca_prompt({"instruction": "x", "input": "y", "output": "z"})
    assert "### Input:" not in alpaca_prompt(records[0] | {"input": ""})
    (tmp_path / "bad.json").write_text('[{"prompt": "x"}]')
    with pytest.raises(graphprune.GraphpruneError, match="Alpaca format"):
        read_instruction_json(tmp_path / "bad.json")
    started = time.perf_counter()  # a window the prompt template fills: said at once, not after 52k records
    with pytest.raises(graphprune.GraphpruneError, match="template alone is .* tokens: raise seq_len"):
        make_batches(str(path), tok, batch_size=2, seq_len=8, n_batches=1)
    assert time.perf_counter() - started < 3


def test_distillation_positions_labels_or_every_real_token(stories, stories_dir):
    from graphprune.finetune import distill_loss

    tok = transformers.AutoTokenizer.from_pretrained(stories_dir)
    batch = make_batches(str(SHARED / "data" / "instruct" / "alpaca_data.json.gz"), tok, batch_size=2, seq_len=2000, n_batches=1, seed=0)[0]
    ids, labels, real = batch["input_ids"], batch["labels"], batch["real"]
    lengths = real.sum(1)
    assert lengths.min() < ids.shape[1]  # one row is padded
    assert torch.equal(real, torch.arange(ids.shape[1])[None] < lengths[:, None])
    assert not (labels != IGNORE)[~real].any()  # a label is always on a real token

    teacher = torch.randn(*ids.shape, 7, generator=torch.Generator().manual_seed(0))
    # the student disagrees with the teacher before one prompt token (0 → 1 predicts token 1) and on padding
    student = teacher.clone()
    student[0, 0, 3] += 5.0
    padded = int((~real).nonzero()[0, 0]), int((~real).nonzero()[0, 1])
    student[padded[0], padded[1] - 1, 3] += 5.0
    assert distill_loss(student, teacher, labels).item() == 0.0  # prompt and padding are not labelled
    assert distill_loss(student, teacher, real).item() > 0.0  # the prompt token counts, padding never does
    student[0, 0, 3] -= 5.0
    assert distill_loss(student, teacher, real).item() == 0.0

    model, _, compiled = stories
    tuned = finetune(compiled, [{"instruction": "Tell a story.", "input": "", "output": "Once upon a time there was a cat."}] * 2,
                     tokenizer=tok, steps=2, lr=5e-3, batch_size=2, distill_from=model, distill_positions="all", progress=False)
    assert tuned.finetune_info.config["distill_positions"] == "all" and len(tuned.finetune_info.losses) == 2
    with pytest.raises(graphprune.GraphpruneError, match="distill_positions"):
        finetune(compiled, [{"instruction": "x", "output": "y"}], tokenizer=tok, steps=1, distill_positions="prompt", progress=False)
