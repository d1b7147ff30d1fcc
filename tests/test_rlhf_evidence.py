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


def test_stratified_interval_by_hand():
    mean, lo, hi = bench.stratified_ci([[1.0, 1.0], [0.0, 0.0, 0.0]])
    assert mean == pytest.approx(0.4) and lo == hi == pytest.approx(0.4)  # no spread within a seed: no width
    mean, lo, hi = bench.stratified_ci([[0.0, 1.0] * 20])
    assert mean == 0.5 and 0.3 < lo < 0.5 < hi < 0.7
    assert all(x != x for x in bench.stratified_ci([[], []]))  # NaN when empty


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
