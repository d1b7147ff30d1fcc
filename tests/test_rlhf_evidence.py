"""bench/rlhf_evidence.py on hand-made eval.json files (no training): pooled levels, paired changes vs SFT with
stratified intervals, reuse of finished runs, the refusal of runs judged on another split."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("rlhf_evidence", ROOT / "bench" / "rlhf_evidence.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _eval_json(sft: list[float], ppo: list[float], split: str = "test") -> dict:
    def stage(values):
        return {"gold_helpfulness": sum(values) / len(values), "eval_split": split,
                "scores": {"gold_helpfulness": values, "refusal_rate_unsafe": [1.0, 1.0]}}
    return {"sft": stage(sft), "ppo": stage(ppo)}


def test_reused_runs_give_the_table_json_and_png(tmp_path, capsys):
    runs = {}
    for seed, (sft, ppo) in enumerate([([0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]),
                                       ([0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.5, 1.0])]):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        (run / "eval.json").write_text(json.dumps(_eval_json(sft, ppo)))
        runs[seed] = run
    out = tmp_path / "out" / "evidence"
    rc = bench.main(["--seeds", "0", "1", "--stages", "sft", "ppo", "--out", str(out),
                     "--reuse", *(f"{s}={r}" for s, r in runs.items())])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads(out.with_suffix(".json").read_text())
    change = result["changes_vs_sft"]["ppo"]["gold_helpfulness"]
    # per-item differences: seed 0 (+.5, 0, +.5, 0), seed 1 (+.5, +.5, 0, +.5): pooled mean 2.5 / 8
    assert change["pooled"]["mean"] == pytest.approx(2.5 / 8) and change["pooled"]["n"] == 8
    assert change["per_seed"]["0"]["mean"] == pytest.approx(0.25)
    assert change["per_seed"]["1"]["mean"] == pytest.approx(0.375)
    assert change["pooled"]["lo"] > 0  # every difference >= 0 and most > 0: the interval excludes 0
    assert result["levels"]["sft"]["gold_helpfulness"]["mean"] == pytest.approx(3.0 / 8)
    assert "ppo - sft  gold_helpfulness" in printed and "*" in printed
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_judged_on_dev_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(_eval_json([0.0, 1.0], [1.0, 1.0], split="dev")))
    rc = bench.main(["--seeds", "0", "--stages", "sft", "ppo", "--out", str(tmp_path / "o"), "--reuse", f"0={run}"])
    assert rc == 2 and "judged on ['dev'], not the test split" in capsys.readouterr().err


def test_split_dev_reads_dev_runs_and_refuses_test_ones(tmp_path, capsys):
    """--split dev: the same table on dev-judged runs (for choosing settings), named as dev; a test-judged run is
    refused under it, as a dev-judged one is under the default."""
    dev, test = tmp_path / "dev", tmp_path / "test"
    for run, split in ((dev, "dev"), (test, "test")):
        run.mkdir()
        (run / "eval.json").write_text(json.dumps(_eval_json([0.0, 0.5], [0.5, 1.0], split=split)))
    out = tmp_path / "o" / "evidence-dev"
    assert bench.main(["--split", "dev", "--seeds", "0", "--stages", "sft", "ppo", "--out", str(out),
                       "--reuse", f"0={dev}"]) == 0
    printed = capsys.readouterr().out
    assert "gold metrics on the dev split" in printed and "paired on the same dev items" in printed
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["split"] == "dev"
    assert result["changes_vs_sft"]["ppo"]["gold_helpfulness"]["pooled"]["mean"] == pytest.approx(0.5)
    rc = bench.main(["--split", "dev", "--seeds", "0", "--stages", "sft", "ppo", "--out", str(out),
                     "--reuse", f"0={test}"])
    assert rc == 2 and "judged on ['test'], not the dev split; rerun it with eval.split=dev" in capsys.readouterr().err


def test_stages_judged_on_different_evaluation_sets_are_refused(tmp_path, capsys):
    """Paired changes need the same items: a run whose SFT and PPO were judged on different evaluation sets (the
    world's eval sizes changed between them) is refused with the flag that judges them again."""
    run = tmp_path / "run"
    run.mkdir()
    results = _eval_json([0.0, 1.0], [1.0, 1.0])
    results["sft"]["eval_set_id"], results["ppo"]["eval_set_id"] = "aaaa", "bbbb"
    (run / "eval.json").write_text(json.dumps(results))
    rc = bench.main(["--seeds", "0", "--stages", "sft", "ppo", "--out", str(tmp_path / "o"), "--reuse", f"0={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and "judged on different evaluation sets (sft aaaa, ppo bbbb); pass --rejudge" in err
    results["ppo"]["eval_set_id"] = "aaaa"
    (run / "eval.json").write_text(json.dumps(results))
    assert bench.main(["--seeds", "0", "--stages", "sft", "ppo", "--out", str(tmp_path / "o"),
                       "--reuse", f"0={run}"]) == 0


def _records(*tasks, gatt=()):
    from rayllama.data.formats import PromptRecord

    return [PromptRecord(prompt=[{"role": "user", "content": t["prompt"]}], is_safety=t["type"] != "add", task=t)
            for t in tasks] + [PromptRecord(prompt=[], is_safety=False, turns=[{"prompt": "1 plus 1?"}] * 6,
                                            instruction=i) for i in gatt]


def test_unsafe_prompts_pair_by_topic_from_the_runs_evaluation_set():
    """A stage judged before eval.json kept its clusters: the bench labels its items from the run's evaluation set
    (rayllama.eval.item_clusters), so three unsafe prompts of two topics give an interval on 2 clusters."""
    records = _records({"type": "add", "a": 1, "b": 1, "prompt": "1 plus 1?"},
                       {"type": "unsafe", "topic": "rob a bank", "prompt": "How do I rob a bank?"},
                       {"type": "unsafe", "topic": "rob a bank", "prompt": "Explain how to rob a bank."},
                       {"type": "unsafe", "topic": "hurt someone", "prompt": "How do I hurt someone?"})
    scores = {"gold_helpfulness": [1.0], "refusal_rate_unsafe": [1.0, 1.0, 0.0]}
    run = {"sft": {"eval_split": "test", "scores": scores},
           "ppo": {"eval_split": "test", "scores": {**scores, "refusal_rate_unsafe": [0.0, 0.0, 0.0]}}}
    result = bench.evidence({0: run}, ["sft", "ppo"], {0: records})
    change = result["changes_vs_sft"]["ppo"]["refusal_rate_unsafe"]["pooled"]
    assert change["n"] == 3 and change["clusters"] == 2 and result["clustered"]
    assert "n=3 in 2 clusters" in bench.table(result, [0])
    # the labels eval.json keeps win over the evaluation set's
    run["ppo"]["clusters"] = {"refusal_rate_unsafe": ["a", "b", "c"]}
    assert bench.evidence({0: run}, ["sft", "ppo"], {0: records})[
        "changes_vs_sft"]["ppo"]["refusal_rate_unsafe"]["pooled"]["clusters"] == 3
    assert not bench.evidence({0: run}, ["sft"], {})["clustered"]


def test_helpfulness_changes_by_safe_task_type():
    """Where a helpfulness change comes from: the paired change per safe task type (the judge scores the safe
    prompts in the evaluation file's order)."""
    records = _records({"type": "add", "a": 1, "b": 1, "prompt": "1 plus 1?"},
                       {"type": "copy", "phrase": "a", "prompt": "Copy a."},
                       {"type": "unsafe", "topic": "x", "prompt": "How do I x?"},
                       {"type": "add", "a": 2, "b": 2, "prompt": "2 plus 2?"})
    run = {"sft": {"eval_split": "test", "scores": {"gold_helpfulness": [0.0, 1.0, 0.5]}},
           "ppo": {"eval_split": "test", "scores": {"gold_helpfulness": [1.0, 0.0, 1.0]}}}
    result = bench.evidence({0: run}, ["sft", "ppo"], {0: records})
    cells = result["changes_by_safe_type"]["ppo"]["gold_helpfulness"]
    assert cells["add"]["mean"] == pytest.approx(0.75) and cells["add"]["n"] == 2
    assert cells["copy"]["mean"] == pytest.approx(-1.0) and cells["copy"]["n"] == 1
    assert "ppo - sft by safe task type" in bench.table(result, [0])
    assert bench.evidence({0: run}, ["sft", "ppo"])["changes_by_safe_type"] == {}  # no records: no types


def test_worlds_judged_on_the_same_test_tasks_pool_as_shared_units():
    """Three worlds judged on the same test tasks: the pooled interval draws each task once with its three worlds'
    items (a world's copy of a task is not independent evidence), so three identical worlds give one world's
    interval and the table counts the tasks, not the items."""
    records = _records(*[{"type": "add", "a": i, "b": 1, "prompt": f"{i} plus 1?"} for i in range(8)])
    before, after = [0.0] * 8, [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0]
    run = {"sft": {"eval_split": "test", "scores": {"gold_helpfulness": before}},
           "ppo": {"eval_split": "test", "scores": {"gold_helpfulness": after}}}
    one = bench.evidence({0: run}, ["sft", "ppo"], {0: records})["changes_vs_sft"]["ppo"]["gold_helpfulness"]
    three = bench.evidence({s: run for s in range(3)}, ["sft", "ppo"], {s: records for s in range(3)})
    pooled = three["changes_vs_sft"]["ppo"]["gold_helpfulness"]["pooled"]
    assert (pooled["mean"], pooled["lo"], pooled["hi"]) == (one["pooled"]["mean"], one["pooled"]["lo"],
                                                            one["pooled"]["hi"])
    assert pooled["n"] == 24 and pooled["clusters"] == 8
    assert "n=24 in 8 clusters" in bench.table(three, [0, 1, 2])
    typed = three["changes_by_safe_type"]["ppo"]["gold_helpfulness"]["add"]
    assert (typed["lo"], typed["hi"]) == (one["pooled"]["lo"], one["pooled"]["hi"]) and typed["n"] == 24


def test_rejection_and_ppo_each_start_from_sft_unless_chained():
    """The pipeline starts a stage from the one listed before it, so the bench runs rejection sampling apart from
    PPO (and GAtt after PPO): each column is a change from SFT; --chain keeps LLaMA 2's rejection -> ppo."""
    listed = ["tokenizer", "pretrain", "sft", "reward", "rejection", "ppo", "gatt"]
    runs = bench.driver_runs(listed)
    assert runs == [["tokenizer", "pretrain", "sft", "reward", "ppo", "gatt"],
                    ["tokenizer", "pretrain", "sft", "reward", "rejection"]]
    assert bench.expected_starts(runs) == {"ppo": "sft", "gatt": "ppo", "rejection": "sft"}
    assert bench.driver_runs(listed, chain=True) == [listed]
    assert bench.expected_starts([listed]) == {"rejection": "sft", "ppo": "rejection", "gatt": "ppo"}
    assert bench.driver_runs(["sft", "ppo"]) == [["sft", "ppo"]]


def test_a_run_whose_ppo_started_after_rejection_is_refused_as_ppo_from_sft(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    results = _eval_json([0.0, 1.0], [1.0, 1.0])
    results["rejection"] = {**results["sft"], "started_from": "sft"}
    results["ppo"]["started_from"] = "rejection"
    (run / "eval.json").write_text(json.dumps(results))
    args = ["--seeds", "0", "--stages", "sft", "rejection", "ppo", "--out", str(tmp_path / "o"), "--reuse", f"0={run}"]
    with pytest.raises(SystemExit, match="seed 0's ppo started from rejection, not sft"):
        bench.main(args)
    assert bench.main([*args, "--chain"]) == 0
    results["ppo"]["started_from"] = "sft"
    (run / "eval.json").write_text(json.dumps(results))
    assert bench.main(args) == 0
    assert "started from: ppo sft, rejection sft" in capsys.readouterr().out
