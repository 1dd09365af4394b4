"""Every script in examples/ runs as written (as ``__main__``), with arguments for a tiny model."""
from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_every_example_is_tested():
    tested = {"quickstart.py", "onnx_deploy.py", "lora_recovery.py", "custom_pass.py", "non_hf_module.py", "moe_experts.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart(tmp_path, monkeypatch, capsys):
    out = run_example("quickstart.py", "--out", str(tmp_path / "q"), "--new-tokens", "4", monkeypatch=monkeypatch, capsys=capsys)
    assert "(OK," in out  # verified
    assert abs(float(re.search(r"reloaded: ([0-9.]+)%", out).group(1)) - 20) < 1  # the default ratio, after reloading
    assert (tmp_path / "q" / "model.safetensors").exists()


@pytest.mark.slow  # two ONNX exports
def test_onnx_deploy(tmp_path, monkeypatch, capsys):
    out = run_example("onnx_deploy.py", "--out", str(tmp_path), "--new-tokens", "4", monkeypatch=monkeypatch, capsys=capsys)
    diff = float(re.search(r"max abs difference ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4
    assert re.search(r"generated 4 tokens", out)


def test_lora_recovery(tmp_path, monkeypatch, capsys):
    out = run_example("lora_recovery.py", "--steps", "1", "--eval-tokens", "256", "--calib-samples", "2", "--out", str(tmp_path / "r"),
                      "--reconstruct", "16", monkeypatch=monkeypatch, capsys=capsys)
    assert re.search(r"reconstruction +\d+ layers refit on 16 samples", out)
    dense, pruned, recovered = map(float, re.search(r"dense ([0-9.]+), pruned ([0-9.]+), recovered ([0-9.]+)", out).groups())
    assert dense < pruned  # pruning half the blocks costs quality; 1 step does not have to win it all back
    assert (tmp_path / "r" / "model.pt2").exists()


def test_custom_pass(monkeypatch, capsys):
    out = run_example("custom_pass.py", monkeypatch=monkeypatch, capsys=capsys)  # asserts inside
    assert "graphprune: l1" in out and "blocks.0:channels" in out


def test_non_hf_module(monkeypatch, capsys):
    out = run_example("non_hf_module.py", monkeypatch=monkeypatch, capsys=capsys)
    assert "(OK," in out and "identical outputs: True" in out


def test_moe_experts(tmp_path, monkeypatch, capsys):
    out = run_example("moe_experts.py", "--out", str(tmp_path / "moe"), monkeypatch=monkeypatch, capsys=capsys)
    assert "4 experts, at least 2 stay" in out and "(OK," in out
    kept = [int(n) for n in re.findall(r"experts': (\d)", out)]
    assert kept and all(2 <= n < 4 for n in kept)
    assert float(re.search(r"max abs difference ([0-9.e+-]+)", out).group(1)) < 1e-5
