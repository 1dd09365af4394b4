"""The supported-architecture matrix of the README, generated from the test matrix (tests/zoo.py).

For every architecture of the zoo this runs the invariant checks of tests/test_invariants.py
once (deterministically) and the user-level path, and records what passed:

    groups     the group kinds the analysis finds (units per kind, summed over layers)
    keep-all   a keep-everything plan rewrites to the original outputs (<= 1e-6)
    masked     a random plan over every kind: pruned graph == masked dense graph (<= 1e-5 relative)
               and the parameter count is what the plan predicts
    compile    graphprune.compile(model, 0.3) with the default kinds passes graphprune.verify
    module     the plan applies at module level (CompiledModel.to_hf(): real nn.Linear layers for
               peft, and the transformers checkpoint that save() writes), checked equal to the graph;
               then saved and loaded back with graphprune.load_hf, outputs compared (<= 1e-4 relative)

    python benchmarks/arch_matrix.py            # writes docs/arch_matrix.md and docs/arch_matrix.json
    python benchmarks/arch_matrix.py --no-write # prints the table only
    python benchmarks/arch_matrix.py --update --arch bloom --arch phi3   # re-checks these rows only
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402

import graphprune  # noqa: E402
from graphprune.api import random_inputs  # noqa: E402
from graphprune.trace import is_hf_model  # noqa: E402
from graphprune.plan import atomic_write_text, random_plan  # noqa: E402


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _max_rel(a_out, b_out) -> float:
    worst = 0.0
    for a, b in zip(_tensors(a_out), _tensors(b_out)):
        if a.shape != b.shape:
            return float("inf")
        worst = max(worst, ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item())
    return worst


def check(name: str) -> dict:
    row: dict = {"arch": name}
    t0 = time.perf_counter()
    model = zoo.ALL[name]()
    row["class"] = type(model).__name__
    traced = graphprune.trace(model, example_kwargs=zoo.example_inputs(name))
    dg = graphprune.analyze(traced)
    units = Counter()
    for g in dg.groups:
        units[g.kind] += g.size
    row["groups"] = dict(sorted(units.items()))
    gen = torch.Generator().manual_seed(1)
    kwargs = random_inputs(traced.example_kwargs, 3, 7, gen, zoo._vocab_size(name))
    with torch.no_grad():
        keep_all = graphprune.rewrite(dg, graphprune.keep_all_plan(dg, kinds=graphprune.ALL_KINDS).leaf_keep(dg))
        row["keep_all"] = _max_rel(keep_all(**kwargs), model(**kwargs)) <= 1e-6
        plan = random_plan(dg)
        pruned = graphprune.rewrite(dg, plan.leaf_keep(dg))
        masked = graphprune.insert_masks(dg, [dg.group(g.name) for g in plan.groups])
        masked.set_keep({g.name: g.keep for g in plan.groups})
        n = sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values())
        row["masked"] = _max_rel(pruned(**kwargs), masked(**kwargs)) <= 1e-5 and n == plan.params_after
    compiled = graphprune.compile(model, 0.3, example_kwargs=traced.example_kwargs, progress=False)
    row["achieved"] = round(compiled.report.achieved_ratio, 3)
    row["compile"] = graphprune.verify(compiled).ok
    try:
        compiled.to_hf()
        row["module"], row["module_why"] = True, ""
    except Exception as exc:  # GraphpruneError, or a model-specific failure: recorded, not fatal
        row["module"], row["module_why"] = False, str(exc).split(":")[0][:80]
    row["hf_round_trip"] = None  # not a transformers model
    if row["module"] and is_hf_model(model):
        with tempfile.TemporaryDirectory() as tmp:
            compiled.save(tmp, plot=False)
            hf = json.loads((Path(tmp) / "graphprune.json").read_text())["hf"]
            if not hf["saved"]:
                row["hf_round_trip"], row["module_why"] = False, "no checkpoint: " + hf["reason"].split(":")[0][:80]
            else:
                try:
                    again = graphprune.load_hf(tmp)
                    with torch.no_grad():
                        row["hf_round_trip"] = _max_rel(again(**kwargs), compiled.module(**kwargs)) <= 1e-4
                except Exception as exc:  # e.g. a kernel that rejects the pruned widths after reloading
                    row["hf_round_trip"], row["module_why"] = False, f"reloaded model fails: {type(exc).__name__}: {str(exc)[:60]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def table(rows: list[dict]) -> str:
    mark = {True: "yes", False: "**no**"}
    lines = ["| arch | class | groups found (units) | keep-all | pruned == masked | compile 30% + verify | module level / HF checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r.get('class', '?')} | error: {r['error']} | | | | |")
            continue
        groups = ", ".join(f"{k} {v}" for k, v in r["groups"].items())
        module = "yes" if r["module"] else f"no ({r['module_why']})"
        if r.get("hf_round_trip") is not None:
            module += ", saved and reloaded: " + mark[r["hf_round_trip"]]
            if r["module"] and not r["hf_round_trip"] and r["module_why"]:
                module += f" ({r['module_why']})"
        lines.append(f"| {r['arch']} | {r['class']} | {groups} | {mark[r['keep_all']]} | {mark[r['masked']]} | "
                     f"{mark[r['compile']]} ({r['achieved']:.0%}) | {module} |")
    return "\n".join(lines)


def _arch(name: str) -> str:
    if name not in zoo.ALL:
        raise argparse.ArgumentTypeError(f"unknown architecture {name!r}; choose from {', '.join(sorted(zoo.ALL))}")
    return name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true",
                        help="print the table only; do not write docs/arch_matrix.md and docs/arch_matrix.json")
    parser.add_argument("--arch", action="append", type=_arch, metavar="NAME",
                        help="only this zoo architecture (repeatable); needs --update or --no-write")
    parser.add_argument("--update", action="store_true",
                        help="re-check only the --arch rows and merge them into the existing docs/arch_matrix.json")
    args = parser.parse_args(argv)
    if args.update and not args.arch:
        parser.error("--update needs the rows to re-check (--arch NAME ...)")
    if args.arch and not args.update and not args.no_write:
        parser.error("--arch alone would overwrite docs/arch_matrix.md/.json with only these rows; add --update (merge) or --no-write")
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.arch or sorted(zoo.ALL):
        try:
            rows.append(check(name))
        except Exception as exc:  # one broken architecture must not hide the others
            rows.append({"arch": name, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:120]}"})
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    if args.update:
        fresh = {r["arch"]: r for r in rows}
        old = json.loads((ROOT / "docs" / "arch_matrix.json").read_text())
        rows = sorted([r for r in old if r["arch"] not in fresh] + rows, key=lambda r: r["arch"])
    text = table(rows)
    print(text)
    if not args.no_write:
        header = ("# Supported architectures\n\nGenerated by `python benchmarks/arch_matrix.py` from the test matrix "
                  f"(`tests/zoo.py`, {len(rows)} tiny random-weight models); torch {torch.__version__}. "
                  "Columns are explained in the script's docstring.\n\n")
        atomic_write_text(ROOT / "docs" / "arch_matrix.md", header + text + "\n")
        atomic_write_text(ROOT / "docs" / "arch_matrix.json", json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
