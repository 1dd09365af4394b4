"""The quality benchmark's recipe (which options each method runs with) and its quick mode end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import quality  # noqa: E402


def test_recipe_channels_for_all_protection_for_uniform_allocation_only():
    caps = quality.Caps(method_steps=40, reconstruct="")  # the refit's option: its own test below
    assert quality.method_config("taylor", caps, {}) == {"kinds": ["channels"], "protect_layers": [4, 2]}
    assert quality.method_config("magnitude", caps, {}) == {"kinds": ["channels"], "protect_layers": [4, 2]}
    assert quality.method_config("loraprune", caps, {})["protect_layers"] == [4, 2]
    assert quality.method_config("hywia", caps, {}) == {"kinds": ["channels"]}  # global ranking: no protection
    assert "protect_layers" not in quality.method_config("bernoulli", caps, {})
    # a method made to allocate uniformly gets the protection; explicit options win over the recipe
    assert quality.method_config("hywia", caps, {"hywia": {"allocation": "uniform"}})["protect_layers"] == [4, 2]
    assert quality.method_config("taylor", caps, {"taylor": {"kinds": ["heads"]}})["kinds"] == ["heads"]
    # "" switches the recipe off: each method's own defaults
    assert quality.method_config("taylor", quality.Caps(kinds="", protect_layers="", reconstruct=""), {}) == {}


def test_pat_trains_at_the_recovery_budget_and_keeps_its_own_kinds():
    caps = quality.Caps(finetune_steps=80, finetune_batch=4, lora_r=8, lora_alpha=16, method_steps=40, reconstruct="")
    config = quality.method_config("pat", caps, {})
    assert config == {"steps": 80, "batch_size": 4, "lora_r": 8, "lora_alpha": 16}
    assert quality.method_config("bernoulli", caps, {})["steps"] == 40  # the other trainers: method_steps
    assert quality.method_config("pat", quality.Caps(finetune_steps=0, method_steps=40, reconstruct=""), {}) == {"steps": 40}


@pytest.mark.slow
def test_quick_run_writes_rows_for_every_case(tmp_path, stories_dir):
    out = tmp_path / "q"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--quick", "--model", str(stories_dir),
                           "--methods", "taylor,pat", "--ratios", "0.5", "--seeds", "0,1", "--fresh", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GRAPHPRUNE_QUALITY_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["case"]: r for r in json.loads((out / "quality.json").read_text())["results"]}
    assert set(results) == {"dense", "taylor:0.5", "pat:0.5", "taylor:0.5:seed1", "pat:0.5:seed1"}
    assert results["taylor:0.5"]["config"] == {"kinds": ["channels"], "protect_layers": [1, 1],
                                               "reconstruct": {"calib": "wikitext2", "n_samples": 8}}
    assert results["taylor:0.5"]["reconstruction"]["layers"] > 0  # the recipe's refit ran
    pat = results["pat:0.5"]["scoring"]["pat"]  # what the pass recorded is kept: its steps (the recovery's) and losses
    assert pat["steps"] == quality.QUICK["finetune_steps"] and pat["last_loss"] > 0
    for case in results.values():
        assert [row["recovery"] for row in case["rows"]] == ["none", "lora"], case.get("error")
    taylor = results["taylor:0.5"]["rows"]
    assert taylor[1]["ppl"]["wikitext2@128"]["ppl"] < taylor[0]["ppl"]["wikitext2@128"]["ppl"]  # recovery helps
    # another seed: other calibration windows, so another model
    other = results["taylor:0.5:seed1"]["rows"]
    assert other[0]["ppl"]["wikitext2@128"]["ppl"] != taylor[0]["ppl"]["wikitext2@128"]["ppl"]
    report = (out / "results.md").read_text()
    assert "Recipe" in report and "## Seeds" in report and "| seeds |" in report and "The refit per case" in report
    assert len(list((tmp_path / "cache").glob("*.json"))) == 5  # each finished case is kept for a resumed run


def _result(method, ratio, acc, n, recovery="none"):
    zs = {t: {"score": acc, "n": n} for t in quality.TASK_LABELS}
    return {"method": method, "ratio": ratio, "rows": [{"recovery": recovery, "ppl": {}, "zeroshot": zs, "zeroshot_average": acc}]}


@pytest.mark.parametrize("n, within", [(30, True), (5000, False)])
def test_accuracy_targets_say_whether_the_gap_is_beyond_noise(n, within):
    results = [_result("taylor", 0.5, 0.40, n), _result("hywia", 0.5, 0.44, n)]
    check = next(c for c in quality.targets(results) if c["target"] == "HyWIA beats Taylor at 50%")
    assert check["result"] == "pass" and check["within_noise"] is within
    se = 100 * (0.4 * 0.6 / n) ** 0.5 / len(quality.TASK_LABELS) ** 0.5  # one row's average, 7 equal tasks
    assert check["noise"] == pytest.approx(2 * (se**2 + (100 * (0.44 * 0.56 / n) ** 0.5 / 7**0.5) ** 2) ** 0.5)
    assert ("within noise" if within else "beyond noise") in quality.targets_table([check])


def test_pat_at_50_is_also_checked_against_taylor_after_taylors_recovery():
    taylor, pat = _seeded("taylor", 0.5, 0, 250.0, 0.30), _seeded("pat", 0.5, 0, 1300.0, 0.35)
    taylor["rows"].append({**taylor["rows"][0], "recovery": "lora", "zeroshot_average": 0.44})
    pat["rows"].append({**pat["rows"][0], "recovery": "lora", "zeroshot_average": 0.50})
    check = next(c for c in quality.targets([taylor, pat]) if c["target"].startswith("PAT beats Taylor at 50%"))
    # PAT's trained row (it had the recovery's budget) against Taylor's recovered one, not either other row
    assert check["ours"] == pytest.approx(35.0) and check["reference"] == pytest.approx(44.0)
    assert check["result"] == "miss" and check["against"] == "taylor + LoRA"
    assert next(c for c in quality.targets([pat]) if c["target"].startswith("PAT beats Taylor"))["result"] == "n/a"


def test_the_table_ends_with_what_always_giving_the_most_common_answer_scores():
    from graphprune.data import data_dir

    rows = [json.loads(line) for line in (data_dir() / "zeroshot" / "boolq.jsonl").read_text().splitlines()[:40]]
    yes = sum(r["gold"] == r["choices"].index("yes") for r in rows) / 40
    majority = quality.majority_answers(40)
    assert majority["boolq"]["share"] == pytest.approx(max(yes, 1 - yes)) and majority["boolq"]["n"] == 40
    assert majority["boolq"]["answers"] == ["no", "yes"] and majority["piqa"]["answers"] is None  # PIQA's choices vary
    for results in ([_seeded("taylor", 0.5, 0, 900.0, 0.4)],
                    quality.merge_seeds([_seeded("taylor", 0.5, s, 900.0, 0.4) for s in (0, 1)])):  # with a seeds column
        head, _, *body, last = quality.table(results, 1024, majority).splitlines()
        assert last.count("|") == head.count("|") == body[0].count("|") and last.startswith("| *majority answer* |")
        shares = [100 * majority[t]["share"] for t in quality.TASK_LABELS]
        assert f"| {sum(shares) / len(shares):.2f} | – | – | – |" in last
    assert "majority" not in quality.table(results, 1024)
    share = 100 * majority["boolq"]["share"]
    word, other = ("yes", "no") if yes >= 0.5 else ("no", "yes")
    note = "\n".join(quality.majority_note(majority))
    assert f'a model that always says "{word}" scores {share:.0f}%, one that always says "{other}" {100 - share:.0f}%' in note
    assert f"moves the 7-task average by {(2 * share - 100) / 7:.1f} points" in note and "PIQA" not in note


def test_validation_cases_have_one_spelling_and_a_table_row():
    import validation

    a = validation.case_key('taylor:0.50:{"protect_layers": [4, 2],  "kinds": ["channels"]}')
    b = validation.case_key('taylor:0.5:{"kinds":["channels"],"protect_layers":[4,2]}')
    assert a == b == 'taylor:0.5:{"kinds": ["channels"], "protect_layers": [4, 2]}'
    with pytest.raises(ValueError):
        validation.case_key("taylor:0.5")
    row = {"case": a, "method": "taylor", "ratio": 0.5, "options": {"kinds": ["channels"]}, "valid_ppl": 1146.18,
           "params": 81430848, "commit": "abc1234"}
    text = validation.table({a: row})
    assert text.startswith("## Measured") and "| taylor | 50% |" in text and "| 1,146.18 | abc1234 |" in text
    # a result on today's text (no <unk> markers) keeps the older one beside it, each labelled
    new = {**row, "valid_ppl": 900.0, "valid_text": validation.VALID_TEXT}
    assert validation.result_key(new) != validation.result_key(row) == a
    text = validation.table({a: row, validation.result_key(new): new})
    assert "| with `<unk>` | 81,430,848 | 1,146.18 |" in text and "| without `<unk>` | 81,430,848 | 900.00 |" in text


def test_recovery_data_may_be_a_corpus_name():
    from graphprune.data import data_dir

    assert quality.finetune_data_path(quality.Caps()) == str(data_dir() / quality.Caps.finetune_data)
    assert quality.finetune_data_path(quality.Caps(finetune_data="wikitext2")) == "wikitext2"  # finetune reads its train split


def test_pruned_cases_rerun_when_the_calibration_text_changes(monkeypatch):
    caps = {"max_tokens": 4096}
    before = {case: quality.cache_path(case, "m", caps, {}) for case in ("dense", "taylor:0.2")}
    monkeypatch.setattr(quality, "CALIBRATION_TEXT", "some other text")
    assert quality.cache_path("dense", "m", caps, {}) == before["dense"]  # not calibrated: still cached
    assert quality.cache_path("taylor:0.2", "m", caps, {}) != before["taylor:0.2"]


def test_perplexity_only_caps_keep_old_cache_keys_and_render_without_accuracy():
    from dataclasses import asdict

    caps = asdict(quality.Caps(max_tokens=4096))
    old = {k: v for k, v in caps.items() if k not in ("perplexities", "zeroshot")}  # a case cached before these caps existed
    assert quality.cache_path("taylor:0.2", "m", caps, {}) == quality.cache_path("taylor:0.2", "m", old, {})
    narrow = {**caps, "perplexities": "wikitext2@128", "zeroshot": False}
    assert quality.cache_path("taylor:0.2", "m", narrow, {}) != quality.cache_path("taylor:0.2", "m", caps, {})
    row = {"recovery": "lora", "ppl": {"wikitext2@128": {"ppl": 55.0}}, "zeroshot": {}, "zeroshot_average": None}
    dense = {"recovery": "none", "ppl": {"wikitext2@128": {"ppl": 50.0}}, "zeroshot": {}, "zeroshot_average": None}
    results = [{"case": "dense", "method": "dense", "ratio": 0.0, "params": 10, "rows": [dense]},
               {"case": "loraprune:0.2", "method": "loraprune", "ratio": 0.2, "params": 8, "rows": [row]}]
    text = quality.table(results, 1024)
    assert "| 55.00 | – | – | – |" in text  # the columns not measured are dashes, not zeros
    checks = {c["target"]: c for c in quality.targets(results)}
    assert checks["best method at 20% with recovery within 15% of dense"]["result"] == "pass"  # 55 <= 1.15 x 50
    assert checks["HyWIA beats Taylor at 50%"]["result"] == "n/a"


def test_main_report_quotes_the_whole_split_check(tmp_path, monkeypatch):
    dense = {"recovery": "none", "ppl": {"wikitext2@128": {"ppl": 50.0, "tokens": 280000}}, "zeroshot": {}, "zeroshot_average": None}
    tuned = {**dense, "recovery": "lora", "ppl": {"wikitext2@128": {"ppl": 60.0, "tokens": 280000}}}
    results = [{"case": "dense", "method": "dense", "ratio": 0.0, "rows": [dense]},
               {"case": "taylor:0.2", "method": "taylor", "ratio": 0.2, "rows": [dense, tuned]}]
    meta = {"command": "python benchmarks/quality.py --max-tokens 0", "date": "d", "targets": quality.targets(results),
            "caps": {"finetune_steps": 80, "finetune_batch": 4}}
    (tmp_path / "quality.json").write_text(json.dumps({"meta": meta, "results": results}))
    monkeypatch.setattr(quality, "WHOLE_SPLIT_RUNS", (tmp_path, tmp_path / "absent"))
    main_report = quality.REPO / "docs" / "results.md"
    [check] = quality.whole_split_checks(main_report)  # a folder without a run is left out
    assert check["result"] == "miss" and check["ours"] == 60.0 and check["reference"] == pytest.approx(57.5)
    assert check["methods"] == ["taylor"] and check["tokens"] == 280000 and check["recovery"] == "80 steps × 4 sequences"
    assert check["recovery_steps"] == 80
    text = "\n".join(quality.whole_split_text(check))
    assert "**miss**" in text and "calibrated on WikiText-2 train with its `<unk>` markers" in text  # recorded no calibration
    assert f"[`{tmp_path.name}/results.md`]({tmp_path.name}/results.md)" in text and "recovery 80 steps" in text
    results[1]["calibration"] = quality.CALIBRATION_TEXT
    (tmp_path / "quality.json").write_text(json.dumps({"meta": meta, "results": results}))
    assert "calibrated on" not in "\n".join(quality.whole_split_text(quality.whole_split_check(main_report, tmp_path)))
    assert quality.whole_split_checks(tmp_path / "results.md") == []  # only the main report quotes it
    # the README's results section names each whole-split run with its recovery steps
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text(f"intro\n{quality.README_START}\nold\n{quality.README_END}\nrest\n")
    monkeypatch.setattr(quality, "REPO", tmp_path / "repo")
    quality.update_readme({"model_name": "m", "command": "c", "date": "d"}, [{**r, "params": 8} for r in results],
                          meta["targets"], [check])
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "test split: 60.00 (taylor) vs 57.50 after 80 steps of recovery, **miss**" in readme
    assert readme.startswith("intro\n") and readme.endswith("rest\n") and "old" not in readme
    note = "\n".join(quality.twenty_note(meta["targets"]))
    assert "1.20 × dense (taylor, the only method run at 20%)" in note and "1.38 × its dense model" in note  # 60/50; 17.37/12.62
    loraprune = {**results[1], "case": "loraprune:0.2", "method": "loraprune",
                 "rows": [dense, {**tuned, "ppl": {"wikitext2@128": {"ppl": 55.0, "tokens": 280000}}}]}
    checks = quality.targets([*results, loraprune])
    assert "1.10 × dense (loraprune)." in "\n".join(quality.twenty_note(checks))
    assert "| 55.00 (loraprune) |" in quality.targets_table(checks)
    assert quality.twenty_note(quality.targets(results[:1])) == []  # no 20% row: nothing to put in scale


def test_seed_zero_keeps_the_case_name_and_key_other_seeds_get_their_own():
    assert quality.case_name("taylor", 0.5) == quality.case_name("taylor", 0.5, 0) == "taylor:0.5"
    assert quality.case_name("taylor", 0.5, 2) == "taylor:0.5:seed2" and quality.case_name("dense") == "dense"
    assert quality.parse_case("taylor:0.5:seed2") == ("taylor", 0.5, 2)
    assert quality.parse_case("taylor:0.5") == ("taylor", 0.5, 0) and quality.parse_case("dense") == ("dense", 0.0, 0)
    caps = {"max_tokens": 4096}
    keys = {quality.cache_path(quality.case_name("taylor", 0.5, s), "m", caps, {}) for s in (0, 1, 2)}
    assert len(keys) == 3
    assert quality.cache_path("taylor:0.5", "m", caps, {}) in keys  # the cases cached before seeds existed


def test_a_method_entry_may_name_its_own_ratio():
    assert quality.method_ratios("taylor,pat:0.2", [0.5]) == [("taylor", 0.5), ("pat", 0.2)]
    assert quality.method_ratios("pat:0.2,pat:0.5,taylor", [0.2, 0.5]) == [("pat", 0.2), ("pat", 0.5), ("taylor", 0.2),
                                                                           ("taylor", 0.5)]
    assert quality.method_ratios("taylor,taylor:0.5", [0.5]) == [("taylor", 0.5)]  # no case twice
    assert quality.case_name(*quality.method_ratios("pat:0.20", [])[0]) == "pat:0.2"  # the cached case's name
    with pytest.raises(SystemExit, match="METHOD:RATIO"):
        quality.method_ratios("pat:half", [0.5])


def _seeded(method, ratio, seed, ppl, acc):
    zs = {t: {"score": acc, "n": 50} for t in quality.TASK_LABELS}
    row = {"recovery": "none", "ppl": {"wikitext2@128": {"ppl": ppl, "tokens": 4096}}, "zeroshot": zs, "zeroshot_average": acc}
    return {"case": quality.case_name(method, ratio, seed), "method": method, "ratio": ratio, "seed": seed, "params": 8,
            "score_seconds": 10.0 + seed, "rows": [row]}


def test_seeds_are_merged_into_means_and_the_targets_use_their_spread():
    taylor = [_seeded("taylor", 0.5, s, p, 0.40) for s, p in enumerate((900.0, 1000.0, 1100.0))]
    close = [_seeded("bernoulli", 0.5, s, p, 0.40) for s, p in enumerate((800.0, 950.0, 1150.0))]
    merged = quality.merge_seeds(taylor + close + [{**_seeded("hywia", 0.5, 1, 1.0, 0.4), "rows": None, "pending": True}])
    assert [m["method"] for m in merged] == ["taylor", "bernoulli", "hywia"] and merged[2]["pending"]
    row = merged[0]["rows"][0]
    assert row["ppl"]["wikitext2@128"]["ppl"] == pytest.approx(1000.0) and merged[0]["seeds"] == [0, 1, 2]
    assert row["ppl"]["wikitext2@128"]["per_seed"] == [900.0, 1000.0, 1100.0] and merged[0]["case"] == "taylor:0.5"
    assert merged[0]["score_seconds"] == pytest.approx(11.0)
    assert quality.merge_seeds([_seeded("hywia", 0.5, 0, 1.0, 0.4), {**_seeded("hywia", 0.5, 1, 1.0, 0.4), "params": 12}]
                               )[0]["params"] == 10  # the mean, when a global ranking kept different counts
    check = next(c for c in quality.targets(merged) if c["target"].startswith("Bernoulli"))
    assert check["result"] == "pass" and check["ours"] == pytest.approx(966.67, abs=0.01)  # the means decide
    assert check["within_noise"] and check["seed_ranges"] == [[800.0, 1150.0], [900.0, 1100.0]]
    assert "within noise: seeds 800.00–1,150.00 vs 900.00–1,100.00" in quality.targets_table([check])
    apart = [_seeded("bernoulli", 0.5, s, p, 0.40) for s, p in enumerate((500.0, 550.0, 600.0))]
    check = next(c for c in quality.targets(quality.merge_seeds(taylor + apart)) if c["target"].startswith("Bernoulli"))
    assert check["result"] == "pass" and not check["within_noise"]
    once = [{**_seeded("taylor", 0.5, 0, 1000.0, 0.40)}]  # one side ran once (like the dense model): a point
    check = next(c for c in quality.targets(quality.merge_seeds(once + apart)) if c["target"].startswith("Bernoulli"))
    assert check["seed_ranges"] == [[500.0, 600.0], [1000.0, 1000.0]] and not check["within_noise"]
    assert "beyond noise: seeds 500.00–600.00 vs 1,000.00)" in quality.targets_table([check])
    # the table shows means with a seeds column, and each seed's figures below
    text = quality.table(merged, 1024)
    assert "| seeds |" in text and "| taylor | 50% | 3 | none | 8 | 1,000.00 |" in text and "| hywia | 50% | 1 | *pending* |" in text
    waiting = [{**_seeded("hywia", 0.5, s, 1.0, 0.4), "rows": None, "pending": True} for s in (0, 1, 2)]
    assert "| hywia | 50% | 0 of 3 | *pending* |" in quality.table(quality.merge_seeds(waiting), 1024)
    seeds = "\n".join(quality.seeds_table(merged))
    assert "| taylor | 50% | none | 0, 1, 2 | 900.00, 1,000.00, 1,100.00 | – | 40.0, 40.0, 40.0 |" in seeds


def test_one_seed_leaves_the_table_as_it_was():
    results = [_seeded("taylor", 0.5, 0, 900.0, 0.4)]
    assert quality.merge_seeds(results) == results
    assert "seeds" not in quality.table(results, 1024) and quality.seeds_table(results) == []


def test_main_report_quotes_the_several_seed_run(tmp_path, monkeypatch):
    taylor = [_seeded("taylor", 0.5, s, p, 0.40) for s, p in enumerate((900.0, 1000.0, 1100.0))]
    bern = [_seeded("bernoulli", 0.5, s, p, 0.40) for s, p in enumerate((800.0, 950.0, 1150.0))]
    pat = [_seeded("pat", 0.2, s, p, 0.40) for s, p in enumerate((300.0, 330.0, 450.0))]  # PAT's seeds: 20% only
    for res in pat:
        res["rows"].append({**res["rows"][0], "recovery": "lora"})
    main = {"model": "m", "caps": {"max_tokens": 4096}, "method_config": {}}
    meta = {**main, "command": "python benchmarks/quality.py --seeds 0,1,2", "date": "d", "seeds": [0, 1, 2],
            "targets": quality.targets(quality.merge_seeds([_seeded("dense", 0.0, 0, 50.0, 0.4)] + taylor + bern + pat))}
    assert next(c for c in meta["targets"] if c["target"] == quality.TWENTY)["result"] == "miss"  # in the run's own report
    (tmp_path / "quality.json").write_text(json.dumps({"meta": meta, "results": taylor + bern + pat}))
    monkeypatch.setattr(quality, "SEEDS_RUN", tmp_path)
    report = quality.REPO / "docs" / "results.md"
    run = quality.seeds_check(report, main)
    # the rest: n/a, or "the best method at 20%" where the run had one method at 20%
    assert [c["target"] for c in run["targets"]] == ["Bernoulli beats Taylor at 50%, without fine-tuning"]
    text = "\n".join(quality.seeds_text(run))
    assert "over 3 seeds" in text and "**pass** (within noise: seeds 800.00–1,150.00 vs 900.00–1,100.00)" in text
    assert "whose cases are its seed 0" in text
    other = quality.seeds_check(report, {**main, "caps": {"max_tokens": 1024}})
    assert "**not the model, caps or options of this table**" in "\n".join(quality.seeds_text(other))
    # only the options of the methods that run ran count: a method it did not run may have changed since
    assert quality.seeds_check(report, {**main, "method_config": {"hywia": {"temperature": 9}}})["same_caps"]
    assert not quality.seeds_check(report, {**main, "method_config": {"bernoulli": {"lr": 9}}})["same_caps"]
    assert quality.seeds_check(tmp_path / "results.md", main) is None  # only the main report quotes it


def test_main_report_quotes_the_run_without_reconstruction(tmp_path):
    dense = _seeded("dense", 0.0, 0, 50.0, 0.4)
    lp, taylor = _seeded("loraprune", 0.2, 0, 66.0, 0.4), _seeded("taylor", 0.2, 0, 63.0, 0.4)
    for res in (dense, lp, taylor):
        res["rows"].append({**res["rows"][0], "recovery": "lora"})
    main = {"model": "m", "caps": {"max_tokens": 4096, "reconstruct": quality.RECONSTRUCT_RECIPE}, "method_config": {}}
    theirs = {**main, "caps": {"max_tokens": 4096, "reconstruct": ""}, "command": "python benchmarks/quality.py "
              "--no-reconstruct ...", "date": "d", "targets": quality.targets(quality.merge_seeds([dense, lp, taylor]))}
    (tmp_path / "quality.json").write_text(json.dumps({"meta": theirs, "results": [dense, lp, taylor]}))
    run = quality.seeds_check(quality.REPO / "docs" / "results.md", main, tmp_path)
    assert run["differ"] == ["reconstruct"] and run["methods"] == ["loraprune 20%", "taylor 20%"]
    twenty = next(c for c in run["targets"] if c["target"] == quality.TWENTY)
    assert twenty["result"] == "miss" and twenty["method"] == "taylor"  # 63 > 1.15 x 50
    text = "\n".join(quality.quoted_targets_text(run, "The targets without reconstruction"))
    assert "this table's model, caps and options, the pruned weights only sliced" in text
    assert "0 of the 1 targets that run could check met" in text
    other = quality.seeds_check(quality.REPO / "docs" / "results.md",
                                {**main, "caps": {**main["caps"], "max_tokens": 1024}}, tmp_path)
    assert ("caps that differ from this table's: max_tokens 4,096 (this table: 1,024), reconstruct none (this table: "
            f"`{quality.RECONSTRUCT_RECIPE}`)") in "\n".join(quality.quoted_targets_text(other, "The targets without reconstruction"))
    other_model = quality.seeds_check(quality.REPO / "docs" / "results.md", {**main, "model": "other"}, tmp_path)
    text = "\n".join(quality.quoted_targets_text(other_model, "The targets without reconstruction"))
    assert "this table's model" not in text and "**another model**" in text
    # a method it ran has other options here (e.g. re-tuned since): named
    other_options = quality.seeds_check(quality.REPO / "docs" / "results.md",
                                        {**main, "method_config": {"taylor": {"lr": 1}, "pat": {"lr": 2}}}, tmp_path)
    text = "\n".join(quality.quoted_targets_text(other_options, "The targets without reconstruction"))
    assert "**other options for taylor** than this table's" in text
    assert f"caps that differ from this table's: reconstruct none (this table: `{quality.RECONSTRUCT_RECIPE}`)" in text
    # a several-seed run without the refit says so, rather than just "not this table's caps"
    assert "but no refit after planning" in "\n".join(quality.seeds_text({**run, "seeds": [0, 1, 2], "same_caps": False}))
    assert "**not the model, caps or options" in "\n".join(quality.seeds_text({**other, "seeds": [0, 1], "same_caps": False}))


def test_main_report_quotes_pat_on_more_questions_with_its_noise_and_the_readme_names_it(tmp_path, monkeypatch):
    def asked(res, n):  # the same accuracy on n questions per task
        for row in res["rows"]:
            row["zeroshot"] = {t: {**v, "n": n} for t, v in row["zeroshot"].items()}
        return res

    dense, pat = _seeded("dense", 0.0, 0, 50.0, 0.44), _seeded("pat", 0.2, 0, 240.0, 0.40)
    dense["rows"].append({**dense["rows"][0], "recovery": "lora"})
    main = {"model": "m", "caps": {"max_examples": 50}, "method_config": {"pat": {"lr": 2e-3}}}
    few = quality.targets([asked(dense, 50), asked(pat, 50)])
    pat_20 = next(c for c in few if c["target"].startswith("PAT at 20%"))
    assert pat_20["result"] == "miss" and pat_20["within_noise"]  # 4 points on 50 questions per task: ±7.5
    many = [asked(dense, 300), asked(pat, 300)]
    theirs = {**main, "caps": {"max_examples": 300}, "command": "python benchmarks/quality.py --methods pat:0.2 "
              "--max-examples 300 ...", "date": "d", "targets": quality.targets(many),
              "majority": {t: {"share": 0.5 if t != "boolq" else 0.64} for t in quality.TASK_LABELS}}
    folder = tmp_path / "more_questions"
    folder.mkdir()
    (folder / "quality.json").write_text(json.dumps({"meta": theirs, "results": many}))
    monkeypatch.setattr(quality, "QUOTED_TARGET_RUNS", (("more_questions_targets", folder, "The targets on more questions"),))
    run = quality.seeds_check(quality.REPO / "docs" / "results.md", main, folder)
    [check] = run["targets"]  # PAT at 50% is n/a; "the best at 20%" of one method is not that target
    assert check["target"].startswith("PAT at 20%") and check["result"] == "miss" and not check["within_noise"]  # ±3.1
    text = "\n".join(quality.quoted_targets_text(run, "The targets on more questions"))
    assert "caps that differ from this table's: max_examples 300 (this table: 50)" in text
    assert "cases run: pat 20%" in text and "0 of the 1 targets that run could check met" in text
    assert "**miss** (beyond noise: ±" in text and "the majority answer's average on its questions: 52.00%" in text
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text(f"{quality.README_START}\n{quality.README_END}\n")
    monkeypatch.setattr(quality, "REPO", tmp_path / "repo")
    quality.update_readme({"model_name": "m", "command": "c", "date": "d"}, [], [], quoted={"more_questions_targets": run})
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert ("On 300 questions per task (`docs/more_questions/`): PAT at 20% beats the dense model's LoRA "
            "fine-tuning (same budget): 40.00 vs 44.00 (dense + LoRA), **miss** (beyond noise: ±") in readme
    # more than two targets: counted, with how many are within noise
    three = {**run, "targets": [check, {**check, "result": "pass", "within_noise": True}, check]}
    assert quality.readme_quoted_sentence(three).endswith(
        "(`docs/more_questions/`): 1 of the 3 targets it checks met; 1 of those 3 comparisons are within noise.")
    # a run with a longer budget too is named by both caps, in words; a cap without words by its key and values
    longer = {**run, "differ": ["finetune_steps", "max_examples"],
              "differ_values": {"finetune_steps": [320, 80], "max_examples": [300, 50]}}
    assert quality.readme_quoted_sentence(longer).startswith(
        " With 320 training steps, on 300 questions per task (`docs/more_questions/`): PAT at 20%")
    tokens = {**run, "differ": ["max_tokens"], "differ_values": {"max_tokens": [0, 4096]}}
    assert quality.quoted_run_lead(tokens) == "With max_tokens 0 (this table: 4,096)"


def test_reconstruction_is_the_default_recipe_reads_wikitext2_and_leaves_the_dense_key_alone():
    from dataclasses import asdict

    config = quality.method_config("loraprune", quality.Caps(), {})
    assert config["reconstruct"] == {"calib": "wikitext2", "n_samples": 256}  # not the method's own calibration windows
    caps = quality.Caps(reconstruct='{"n_samples": 64}')
    assert quality.method_config("loraprune", caps, {})["reconstruct"] == {"calib": "wikitext2", "n_samples": 64}
    assert "reconstruct" not in quality.method_config("loraprune", quality.Caps(reconstruct=""), {})
    plain, default = asdict(quality.Caps(reconstruct="")), asdict(quality.Caps())
    assert quality.cache_path("dense", "m", asdict(caps), {}) == quality.cache_path("dense", "m", plain, {})
    assert quality.cache_path("taylor:0.2", "m", default, {}) != quality.cache_path("taylor:0.2", "m", plain, {})
    # the runs made with the recipe spelled out (before it was the default) keep their key, and so do the ones without
    spelled = {**default, "reconstruct": '{"calib": "wikitext2", "n_samples": 256}'}
    assert quality.cache_path("taylor:0.2", "m", spelled, {}) == quality.cache_path("taylor:0.2", "m", default, {})
    before = {k: v for k, v in plain.items() if k != "reconstruct"}  # caps recorded before the field existed
    assert quality.cache_path("taylor:0.2", "m", before, {}) == quality.cache_path("taylor:0.2", "m", plain, {})
    assert "No reconstruction" in "\n".join(quality.recipe_note(plain))
    assert "**Reconstruction**" in "\n".join(quality.recipe_note(default))
    assert "[validation.md](../validation.md)" in "\n".join(quality.recipe_note(default, "../validation.md"))


@pytest.mark.parametrize("value", ["x", "[1]", '{"damp": -1}', '{"nope": 1}'])
def test_a_bad_reconstruct_option_exits_before_any_model_loads(value):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "quality.py"), "--reconstruct", value, "--model", "/nonexistent"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--reconstruct: takes a JSON object of reconstruct options" in proc.stderr


def test_an_earlier_report_gives_back_the_cases_this_run_would_compute_again(tmp_path):
    from dataclasses import asdict

    caps = asdict(quality.Caps(max_tokens=4096))
    config = {"taylor": {"steps": 3}}
    new_text = {"calibration": quality.CALIBRATION_TEXT}
    results = [{**_seeded("dense", 0.0, 0, 50.0, 0.4)},
               {**_seeded("taylor", 0.2, 0, 60.0, 0.4), **new_text},
               {**_seeded("taylor", 0.5, 0, 900.0, 0.4), "calibration": quality.OLD_CALIBRATION_TEXT},  # other text
               {**_seeded("magnitude", 0.2, 0, 99.0, 0.4), "commit": "?"},  # no record of its text: old
               {**_seeded("hywia", 0.2, 0, 70.0, 0.4), **new_text, "error": "boom"}]
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"meta": {"model": "m", "caps": caps, "method_config": config}, "results": results}))
    assert sorted(quality.reusable_cases(path, "m", caps, config)) == ["dense", "taylor:0.2"]
    assert quality.reusable_cases(path, "m", {**caps, "finetune_steps": 1}, config) == {}  # other caps
    assert sorted(quality.reusable_cases(path, "m", caps, {})) == ["dense"]  # other options for taylor
    # a report from before a cap existed ran at its key default: reconstruct "" (no refit), not today's recipe
    older = {k: v for k, v in caps.items() if k != "reconstruct"}
    path.write_text(json.dumps({"meta": {"model": "m", "caps": older, "method_config": config}, "results": results}))
    assert sorted(quality.reusable_cases(path, "m", {**caps, "reconstruct": ""}, config)) == ["dense", "taylor:0.2"]
    assert sorted(quality.reusable_cases(path, "m", caps, config)) == ["dense"]
    assert quality.reusable_cases(tmp_path / "none.json", "m", caps, config) == {}
    assert quality.calibration_of({"commit": quality.MARKERS_DROPPED_AT}) == quality.CALIBRATION_TEXT


def test_the_report_shows_what_the_refit_changed_per_case():
    taylor, pat = _seeded("taylor", 0.5, 0, 250.0, 0.4), _seeded("pat", 0.2, 0, 450.0, 0.4)
    taylor["reconstruction"] = {"layers": 24, "mean_error_sliced": 0.31, "mean_error_refit": 0.12, "seconds": 40.0}
    pat["reconstruction"] = {"layers": 150, "mean_error_sliced": 5e-17, "mean_error_refit": 6e-17, "seconds": 88.0}
    text = "\n".join(quality.reconstruction_table([_seeded("dense", 0.0, 0, 50.0, 0.4), taylor, pat]))
    assert "| taylor | 50% | 24 | 0.31 | 0.12 | 40 |" in text and "| pat | 20% | 150 | 5e-17 | 6e-17 | 88 |" in text
    assert "For pat the sliced error is already nil" in text  # only the case whose removed inputs carried nothing
    assert "dense |" not in text and "Not in this table" not in text
    older = {**_seeded("loraprune", 0.2, 0, 58.0, 0.4), "commit": "c8b9514"}  # ran before the summary was kept
    text = "\n".join(quality.reconstruction_table([taylor, older]))
    assert "Not in this table: loraprune 20% (run at c8b9514, before the benchmark kept the refit's summary" in text
    assert quality.reconstruction_table([taylor | {"reconstruction": {}}]) == []  # a run without the refit: no table


def test_the_report_shows_the_training_curves_on_the_recovery_text():
    dense, taylor, pat = _seeded("dense", 0.0, 0, 50.0, 0.4), _seeded("taylor", 0.5, 0, 250.0, 0.4), _seeded("pat", 0.2, 0, 450.0, 0.4)
    assert quality.training_curves([dense, taylor, pat]) == []  # nothing recorded (older cases): no section
    dense["rows"].append({**dense["rows"][0], "recovery": "lora", "finetune_loss_by_tenth": [2.0 - i / 20 for i in range(10)]})
    taylor["rows"].append({**taylor["rows"][0], "recovery": "lora", "finetune_loss_by_tenth": [0.5] * 10})  # KL, not CE
    assert quality.training_curves([dense, taylor]) == []  # the dense curve alone compares with nothing
    pat["scoring"] = {"pat": {"task_loss_by_tenth": [1.8, 1.5, 1.6, 2.2], "distill": False}}
    text = "\n".join(quality.training_curves([dense, taylor, pat]))
    assert "| dense + LoRA recovery | 2.00 | 1.95 |" in text and text.count("| 1.55 |") == 1
    assert "| pat 20%: its pat pass | 1.80 | 1.50 | 1.60 | 2.20 | – | – | – | – | – | – |" in text  # fewer steps than tenths
    assert "taylor" not in text and "| 1/10 | 2/10 |" in text
    pat["scoring"]["pat"]["distill"] = True  # trained on the dense model's logits: not cross entropy either
    assert quality.training_curves([dense, pat]) == []
