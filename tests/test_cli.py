"""The ``graphprune`` command line, end to end on stories260K (compile -> inspect -> eval -> export)
through real subprocesses, plus help texts, exit codes and one-line errors (in-process: fast)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STORIES

import graphprune
from graphprune import cli

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "custom_pass.py"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def stdout_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- end to end, real processes
def test_compile_inspect_eval_export(tmp_path, stories_dir):
    out = tmp_path / "stories-50"
    report = stdout_json(run("compile", stories_dir, "--ratio", "0.5", "--out", out, "--verify", "--json", "-q"))
    assert abs(report["report"]["achieved_ratio"] - 0.5) < 0.02
    assert report["verify"]["ok"] and report["verify"]["max_rel"] <= 1e-5
    assert report["hf"]["saved"] and not report["hf"]["per_layer"]
    for name in ("model.pt2", "plan.json", "report.json", "widths.png", "config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "report.json").read_text())
    assert saved["flops_after"] < saved["flops_before"] and saved["params_after"] < saved["params_before"]
    assert {"load", "trace", "score", "rewrite", "save"} <= set(saved["seconds"])
    assert [row["block"] for row in saved["per_layer"]] == [f"model.layers.{i}" for i in range(5)]

    info = stdout_json(run("inspect", out, "--json", "-q"))
    assert info["form"] == "graphprune" and info["method"] == "magnitude"
    kept = {g["name"]: g["units"] for g in info["groups"]}
    for name, (k, total) in info["plan"].items():  # the saved model's groups have the kept widths
        assert kept[name] == k < total
    assert any("embedding" in f["why"] for f in info["frozen"])

    scores = stdout_json(run("eval", out, "--ppl", "wikitext2", "--max-tokens", "512", "--tasks", "piqa", "--limit", "4", "--json", "-q"))
    ppl = scores["ppl"]["wikitext2"]
    assert ppl["seq_len"] == 128 and ppl["windows"] == 4 and 1 < ppl["ppl"] < 1e5
    piqa = scores["zeroshot"]["tasks"]["piqa"]
    assert piqa["n"] == 4 and 0 <= piqa["acc"] <= 1

    exported = stdout_json(run("export", out, "--onnx", "--json", "-q"))
    onnx_path = Path(exported["onnx"])
    assert onnx_path == out / "model.onnx" and onnx_path.stat().st_size == exported["bytes"] > 0
    # the file runs in ONNX Runtime at another batch size and length, like the saved graph
    session = graphprune.OnnxSession.open(onnx_path, quiet=True)
    ids = torch.randint(0, 512, (3, 21))
    expected = graphprune.load(out)(input_ids=ids, use_cache=False).logits
    got = session(input_ids=ids)["logits"]
    assert np.abs(got - expected.detach().numpy()).max() < 1e-4


def test_compile_with_reconstruct(tmp_path, stories_dir):
    out = tmp_path / "refit"
    result = stdout_json(run("compile", stories_dir, "--ratio", "0.3", "--out", out, "--reconstruct", "32", "--calib", "tinystories",
                             "--verify", "--json", "-q", "--no-plot"))
    r = result["report"]["reconstruction"]
    assert r["layers"] > 0 and r["samples"] == 32 and r["mean_error_refit"] < r["mean_error_sliced"]
    assert result["verify"]["ok"] and "reconstruct" in result["report"]["seconds"]


def test_a_bad_argument_exits_2_with_one_line_in_a_real_process(stories_dir, tmp_path):
    proc = run("compile", stories_dir, "--out", tmp_path / "x", "--ratio", "2")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "--ratio" in lines[0] and "[0, 1)" in lines[0], proc.stderr


# ---------------------------------------------------------------- help texts (in-process)
@pytest.mark.parametrize("argv, must_mention", [
    ([], ["compile", "inspect", "eval", "export", "methods", "Exit status"]),
    (["compile"], ["MODEL", "--ratio", "--method", "--calib", "--out", "--onnx", "--finetune-steps", "--kinds",
                   "--allocation", "--round-to", "--ignore", "--protect-layers", "--option", "--plan", "--plugin", "--json", "--verify"]),
    (["inspect"], ["MODEL", "--json", "--members"]),
    (["eval"], ["DIR_OR_MODEL", "--ppl", "--tasks", "--seq-len", "--max-tokens", "--limit", "--onnx"]),
    (["export"], ["DIR", "--onnx", "--output", "--dtype", "--optimize"]),
    (["methods"], ["--plugin", "--json"]),
])
def test_help_is_complete(argv, must_mention, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in must_mention:
        assert word in text, f"{argv} --help does not mention {word}"


# ---------------------------------------------------------------- exit codes (in-process)
def _bad_arguments(tmp: Path) -> list[tuple[list[str], str]]:
    s = str(STORIES)
    return [
        (["compile", s], "--out"),                                             # required option missing
        (["compile", s, "--out", str(tmp), "--ratio", "abc"], "--ratio"),
        (["compile", str(tmp / "missing"), "--out", str(tmp)], "no such file"),
        (["compile", s, "--out", str(tmp), "--method", "nope"], "unknown --method"),
        (["compile", s, "--out", str(tmp), "-O", "nope=1"], "has no option 'nope'"),
        (["compile", s, "--out", str(tmp), "--plugin", str(tmp / "missing.py")], "no such file"),
        (["compile", s, "--out", str(tmp), "--protect-layers", "4"], "--protect-layers"),
        (["compile", s, "--out", str(tmp), "--protect-layers", "4,-1"], "--protect-layers"),
        (["frobnicate"], "invalid choice"),
        (["eval", s, "--tasks", "nope"], "unknown task"),
        (["eval", s, "--seq-len", "x"], "--seq-len"),
        (["export", s, "--onnx"], "not a folder saved by"),
        (["export", s], "--onnx"),
        (["compile", s, "--out", str(tmp), "-O", "p=abc"], "should be a number"),   # a wrong type, not a TypeError
        (["compile", s, "--out", str(tmp), "--kinds", "channels,bogus"], "unknown kind 'bogus'"),
        (["compile", s, "--out", str(tmp), "--calib", str(tmp / "missing.txt")], "no such text file"),
        (["compile", s, "--out", str(tmp), "--calib", "wikitext3"], "unknown corpus 'wikitext3'"),
        (["compile", s, "--out", str(tmp), "--finetune-data", str(tmp / "missing.json")], "no such text file"),
        (["compile", s, "--out", str(tmp), "--plan", str(PLUGIN), "--kinds", "heads"], "--kinds has no effect"),
        (["eval", s, "--ppl", "bogus"], "unknown corpus 'bogus'"),
        (["compile", s, "--out", str(_user_folder(tmp))], "not a folder saved by graphprune"),  # before compiling
    ]


def _user_folder(tmp: Path) -> Path:
    folder = tmp.with_name(tmp.name + "-notes")  # beside tmp, which the other cases use as --out
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    return folder


def test_bad_arguments_exit_2_with_one_clear_line(tmp_path, capsys):
    for argv, words in _bad_arguments(tmp_path):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        lines = error_lines(err)
        assert len(lines) == 1 and words in lines[0], (argv, err)


def test_a_failed_run_exits_1_with_one_line(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    assert cli.main(["inspect", str(broken)]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("graphprune inspect: error:") and str(broken) in lines[0]


def test_plugin_pass_from_the_command_line(tmp_path, capsys, stories_dir):
    assert cli.main(["methods", "--plugin", str(PLUGIN), "--json"]) == 0
    methods = {m["name"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
    assert methods["l1"]["options"] == {"normalize": True} and "magnitude" in methods
    out = tmp_path / "l1"
    code = cli.main(["compile", str(stories_dir), "--plugin", str(PLUGIN), "--method", "l1", "-O", "normalize=false",
                     "--ratio", "0.3", "--out", str(out), "--no-hf", "--no-plot", "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["report"]["method"] == "l1" and abs(result["report"]["achieved_ratio"] - 0.3) < 0.02
    assert "config.json" not in result["files"] and "widths.png" not in result["files"]


def test_a_plan_is_replayed_from_the_command_line(tmp_path, capsys, stories_dir):
    # made at 0.3, replayed without --ratio: the plan's own ratio, no warning about the default
    first, again = tmp_path / "a", tmp_path / "b"
    assert cli.main(["compile", str(stories_dir), "--ratio", "0.3", "--out", str(first), "--no-hf", "--no-plot", "-q"]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = cli.main(["compile", str(stories_dir), "--plan", str(first / "plan.json"), "--out", str(again),
                         "--no-hf", "--no-plot", "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((again / "plan.json").read_text())["groups"] == json.loads((first / "plan.json").read_text())["groups"]
    for flag in (["--ratio", "0.5"], ["--method", "taylor"]):
        assert cli.main(["compile", str(stories_dir), "--plan", str(first / "plan.json"), *flag, "--out",
                         str(tmp_path / "c")]) == 2
        assert f"{flag[0]} has no effect" in capsys.readouterr().err


def test_calib_is_the_finetuning_text_without_a_warning(tmp_path, capsys, stories_dir):
    # magnitude reads no calibration data, but --calib is also the default recovery text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = cli.main(["compile", str(stories_dir), "--ratio", "0.3", "--calib", "tinystories", "--finetune-steps", "1",
                         "--out", str(tmp_path / "f"), "--no-hf", "--no-plot", "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["finetune"]["data"] == "tinystories"


def test_plugin_module_in_the_current_folder(tmp_path, capsys, monkeypatch):
    # package.module form, found in the current folder as `python -m` would find it
    (tmp_path / "my_rules.py").write_text(PLUGIN.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert cli.main(["methods", "--plugin", "my_rules", "--json"]) == 0
    assert "l1" in {m["name"] for m in json.loads(capsys.readouterr().out)["methods"]}


def test_a_closed_pipe_is_not_an_error():
    # `graphprune methods | head -1`: the reader stops early; no "unexpected BrokenPipeError" line
    proc = subprocess.run(f"{sys.executable} -m graphprune.cli methods | head -1", shell=True, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert len(proc.stdout.splitlines()) == 1
    assert "BrokenPipe" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_round_to_option_parses_one_or_per_kind_multiples():
    import argparse

    from graphprune.cli import _round_to

    assert _round_to("64") == 64
    assert _round_to("channels=64, heads=2") == {"channels": 64, "heads": 2}
    for bad in ("0", "channels=0", "=8", "channels=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _round_to(bad)
