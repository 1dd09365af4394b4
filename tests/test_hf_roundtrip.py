"""The Hugging Face round trip: a pruned model saved as a transformers checkpoint and loaded back.

Uniform widths go into the config (plain ``from_pretrained``); per-layer widths, and widths a
config cannot express, are recorded in the config and restored by ``graphprune.load_hf``. Broken
folders (cut files, another model's files, newer formats) fail with a LoadError that says so.
"""
from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from conftest import STORIES, analysed
from transformers import AutoModelForCausalLM

import graphprune
from graphprune.io import WIDTHS_KEY

IDS = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def stories():
    return AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()


@functools.lru_cache(maxsize=None)
def saved(ratio: float, allocation: str, root: str):
    """(compiled, folder) for one configuration, compiled and saved once per session."""
    from pathlib import Path

    compiled = graphprune.compile(stories(), ratio, allocation=allocation, progress=False)
    folder = Path(root) / f"r{ratio}-{allocation}"
    compiled.save(folder)
    return compiled, folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def manifest(folder) -> dict:
    return json.loads((folder / "graphprune.json").read_text())


def test_uniform_widths_load_with_plain_transformers(root):
    before = {k: v.clone() for k, v in stories().state_dict().items()}
    compiled, folder = saved(0.5, "uniform", root)
    assert manifest(folder)["hf"] == {"saved": True, "per_layer": False, "class": "LlamaForCausalLM"}
    config = json.loads((folder / "config.json").read_text())
    assert WIDTHS_KEY not in config and config["intermediate_size"] == 86 and config["num_key_value_heads"] == 2
    hf = AutoModelForCausalLM.from_pretrained(str(folder))
    assert type(hf).__name__ == "LlamaForCausalLM" and isinstance(hf.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert sum(p.numel() for p in hf.parameters()) == compiled.plan.params_after
    assert torch.allclose(logits(hf), logits(compiled.module), atol=1e-5, rtol=0)
    assert torch.allclose(logits(graphprune.load_hf(folder)), logits(hf), atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in stories().state_dict().items()), "the caller's model changed"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_per_layer_widths_are_restored_and_survive_save_pretrained(root, tmp_path):
    compiled, folder = saved(0.5, "global", root)
    widths = {g.name: len(g.keep) for g in compiled.plan.groups if g.kind == "channels"}
    assert len(set(widths.values())) > 1, "global allocation should give different widths per layer"
    assert manifest(folder)["hf"]["per_layer"]
    hf = graphprune.load(folder).to_hf()
    assert [m.mlp.up_proj.out_features for m in hf.model.layers] == list(widths.values())
    assert torch.allclose(logits(hf), logits(compiled.module), atol=1e-5, rtol=0)
    # after fine-tuning a user saves with save_pretrained: the record goes along
    hf.save_pretrained(str(tmp_path / "tuned"))
    again = graphprune.load_hf(tmp_path / "tuned")
    assert torch.equal(logits(again), logits(hf))


def test_widths_the_config_cannot_express_are_recorded(root):
    # 3 of 4 KV heads -> 6 query heads, and transformers rejects hidden 64 / 6 heads in a LlamaConfig
    compiled, folder = saved(0.3, "uniform", root)
    assert {len(g.keep) for g in compiled.plan.groups if g.kind == "heads"} == {3}
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == 8 and WIDTHS_KEY in config
    hf = graphprune.load_hf(folder)
    assert hf.model.layers[0].self_attn.o_proj.in_features == 6 * 8
    assert torch.allclose(logits(hf), logits(compiled.module), atol=1e-5, rtol=0)


def test_to_hf_right_after_compile_is_a_peft_ready_module(root):
    peft = pytest.importorskip("peft")
    compiled, _ = saved(0.5, "global", root)
    hf = compiled.to_hf()
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    loss = wrapped(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in wrapped.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- broken folders fail clearly
def copy_of(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def test_truncated_weights_fail_clearly(root, tmp_path):
    _, folder = saved(0.5, "global", root)
    broken = copy_of(folder, tmp_path)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(graphprune.LoadError, match="truncated"):
        graphprune.load(broken)
    with pytest.raises(graphprune.LoadError, match="truncated or corrupt"):
        graphprune.load_hf(broken)
    data = (broken / "model.pt2").read_bytes()
    (broken / "model.pt2").write_bytes(data[:1000])
    with pytest.raises(graphprune.LoadError, match="model.pt2 is corrupt or truncated"):
        graphprune.load(broken)


def test_newer_formats_fail_clearly(root, tmp_path):
    _, folder = saved(0.5, "global", root)
    broken = copy_of(folder, tmp_path)
    config = json.loads((broken / "config.json").read_text())
    config[WIDTHS_KEY]["version"] = 99
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(graphprune.LoadError, match="newer"):
        graphprune.load_hf(broken)
    plan = json.loads((broken / "plan.json").read_text())
    plan["version"] = 99
    (broken / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(graphprune.LoadError, match="newer"):
        graphprune.load(broken)


def test_another_models_files_fail_clearly(root, tmp_path):
    _, uniform = saved(0.5, "uniform", root)
    _, per_layer = saved(0.5, "global", root)
    mixed = copy_of(per_layer, tmp_path, "mixed")
    shutil.copy(uniform / "model.safetensors", mixed / "model.safetensors")  # weights of another pruning
    with pytest.raises(graphprune.LoadError, match="different model"):
        graphprune.load_hf(mixed)
    mixed = copy_of(per_layer, tmp_path, "mixed-plan")
    shutil.copy(uniform / "plan.json", mixed / "plan.json")
    with pytest.raises(graphprune.LoadError, match="belongs to a different model"):
        graphprune.load(mixed)
    # a plan replayed on another model
    plan = graphprune.load(uniform).plan
    other, _, _ = analysed("llama_gqa")
    with pytest.raises(graphprune.PlanError, match="another model"):
        graphprune.compile(other, plan=plan, progress=False)


def test_a_failed_save_leaves_the_old_folder_intact(tmp_path):
    model, traced, _ = analysed("tiny_mlp_lm")
    compiled = graphprune.compile(model, 0.3, example_kwargs=traced.example_kwargs, progress=False)
    folder = compiled.save(tmp_path / "m", plot=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert manifest(folder)["hf"] is None  # a plain module has no transformers checkpoint
    with pytest.raises(graphprune.GraphpruneError, match="not a Hugging Face model"):
        compiled.save(folder, hf=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "temporary folders left behind"
