"""The command lines (`python -m rayllama.driver`, `python -m rayllama.serve`): --help, --print-config, --dry-run,
`--key=value`, "did you mean" and the range of every numeric key. Called as main(argv) in-process (one subprocess
checks the real entry point); none of these may start Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayllama import driver
from rayllama import serve as serve_cli
from rayllama.config import (
    PIPELINE_RANGES,
    ConfigError,
    PipelineConfig,
    load_config,
    numeric_leaves,
    range_rule,
)
from serve.config import SERVE_RANGES, ServeConfig, load_serve_config

# Ray Serve's own pydantic models warn on import (PydanticDeprecatedSince20); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
PPO = str(ROOT / "configs" / "ppo.yaml")
SMALL_WORLD = [f"world.{k}=4" for k in ("pretrain_world", "pretrain_world_heldout", "sft", "pref_helpfulness",
                                        "pref_safety", "pref_helpfulness_heldout", "pref_safety_heldout", "prompts",
                                        "gatt", "eval_safe", "eval_unsafe", "eval_borderline", "eval_gatt")]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """The command line validates without Ray: ray.init fails the test if anything calls it (a check of
    ray.is_initialized() would trip on the test session's own Ray instance)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("the command line started Ray")

    monkeypatch.setattr(ray, "init", refuse)
    yield


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_driver_help_lists_bundled_configs_and_sections(capsys):
    code, out, _ = run_main(driver.main, ["--help"], capsys)
    assert code == 0
    for path in (ROOT / "configs").glob("*.yaml"):
        listed = [line for line in out.splitlines() if line.strip().startswith(path.name)]
        if path.name == "serve.yaml":
            assert not listed  # the serve command's config
        else:
            assert len(listed) == 1 and len(listed[0].split(path.name, 1)[1].strip()) > 10, (path.name, listed)
    assert "ppo.yaml                tokenizer -> pretrain -> SFT -> reward models -> PPO" in out
    for section in ("ppo.*", "rejection.*", "gatt.*", "pretrain.*", "scaling.*", "vllm.*", "stages"):
        assert f"\n  {section} " in out, section
    for option in ("--print-config", "--dry-run", "--key=value"):
        assert option in out
    assert run_main(driver.main, [], capsys)[0] == 2  # no config: usage, non-zero


def test_serve_help_lists_serve_config_and_sections(capsys):
    code, out, _ = run_main(serve_cli.main, ["-h"], capsys)
    assert code == 0 and "serve.yaml" in out and "ppo.yaml" not in out
    for section in ("limits.*", "batch.*", "auth.*", "replicas.*", "http.*", "vllm.*", "model_dir"):
        assert f"\n  {section} " in out, section


def test_help_through_the_real_entry_point():
    result = subprocess.run([sys.executable, "-m", "rayllama.driver", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0 and "bundled configs" in result.stdout and "ppo.yaml" in result.stdout


def test_print_config_equals_the_runs_config_yaml(tmp_path, capsys):
    # stages=[pretrain] without a tokenizer: the real run writes config.yaml, then stops (before Ray) at the input
    # check
    argv = [PPO, f"run_dir={tmp_path / 'run'}", "--ppo.iterations=3", "ppo.temperature=0.5", "stages=[pretrain]",
            *SMALL_WORLD]
    code, printed, _ = run_main(driver.main, [*argv, "--print-config"], capsys)
    assert code == 0
    assert not (tmp_path / "run").exists()  # printing writes nothing
    loaded = yaml.safe_load(printed)
    assert loaded["ppo"]["iterations"] == 3 and loaded["ppo"]["temperature"] == 0.5
    assert loaded["run_dir"] == str(tmp_path / "run")
    code, _, err = run_main(driver.main, argv, capsys)
    assert code == 2 and "no tokenizer" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == printed


def test_key_value_with_dashes_is_an_override(capsys):
    assert load_config(PPO, ["--ppo.iterations=3"]).ppo.iterations == 3
    assert load_serve_config(None, ["--limits.max_n=2"]).limits.max_n == 2
    code, _, err = run_main(driver.main, [PPO, "--dry-run", "--verbose"], capsys)
    assert code == 2 and "unknown option '--verbose'" in one_error_line(err)


def test_dry_run_of_a_good_config_exits_0_and_writes_nothing(tmp_path, capsys):
    code, out, err = run_main(driver.main, [PPO, "--dry-run", f"run_dir={tmp_path / 'run'}"], capsys)
    assert code == 0 and not err
    assert out.strip().splitlines() == [out.strip()] and "dry run OK" in out and "stages tokenizer, pretrain" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["tokenizer.model_path={tmp}/missing.model"], "tokenizer.model_path '{tmp}/missing.model' does not exist"),
    (["tokenizer.model_path={tmp}/not_spm.model"], "is not a SentencePiece model"),
    (["ppo.temperature=-0.5"], "ppo.temperature -0.5 must be >= 0"),
    (["--ppo.top_p=1.5"], "ppo.top_p 1.5 must be in (0, 1]"),
    (["ppo.iterations=0"], "ppo.iterations 0 must be >= 1"),
    (["ppo.max_new_tokens=0"], "ppo.max_new_tokens 0 must be >= 1"),
    (["rejection.temperature_schedule=[1.0,-1.0,1.0,1.0]"], "rejection temperatures"),
    (["ppo.temprature=0.7"], "did you mean 'ppo.temperature'?"),
    (["--ppo.iteratons=3"], "did you mean 'ppo.iterations'?"),
    (["top_p=0.9"], "did you mean"),
    (["ray.address=not an address"], "ray.address 'not an address' is not auto, host:port"),
    (["stages=[ppo]"], "no tokenizer at"),  # a stage's input checkpoint that no listed stage writes
    (["run_dir={tmp}/not_spm.model/run"], "cannot be created or written"),  # under a file
])
def test_dry_run_catches_mistakes_in_one_line_before_ray(tmp_path, capsys, argv, fragment):
    (tmp_path / "not_spm.model").write_bytes(b"not a sentencepiece model")
    argv = [a.format(tmp=tmp_path) for a in argv]
    run_dir = [] if any(a.startswith("run_dir=") for a in argv) else [f"run_dir={tmp_path / 'run'}"]
    code, out, err = run_main(driver.main, [PPO, "--dry-run", *run_dir, *argv], capsys)
    line = one_error_line(err)
    assert code == 2 and fragment.format(tmp=tmp_path) in line and line.startswith("rayllama: error: "), line
    assert not (tmp_path / "run").exists()


def test_serve_dry_run_and_print_config(tmp_path, capsys):
    serve_yaml = str(ROOT / "configs" / "serve.yaml")
    code, out, _ = run_main(serve_cli.main, [serve_yaml, "--print-config", "--limits.max_n=2"], capsys)
    assert code == 0 and yaml.safe_load(out)["limits"]["max_n"] == 2
    code, _, err = run_main(serve_cli.main, [serve_yaml, "--dry-run", f"model_dir={tmp_path}/none"], capsys)
    assert code == 2 and "does not exist" in one_error_line(err)
    code, _, err = run_main(serve_cli.main, [serve_yaml, "--dry-run", "limits.max_tokenz=5"], capsys)
    assert code == 2 and "did you mean 'limits.max_tokens'?" in one_error_line(err)
    code, _, err = run_main(serve_cli.main, [serve_yaml, "--dry-run", "batch.max_rows=0"], capsys)
    assert code == 2 and "batch.max_rows 0 must be >= 1" in one_error_line(err)


@pytest.mark.parametrize("schema, rules", [(PipelineConfig, PIPELINE_RANGES), (ServeConfig, SERVE_RANGES)],
                         ids=["pipeline", "serve"])
def test_every_numeric_key_has_a_range(schema, rules):
    """A new numeric key needs a rule in the table (what its numbers mean), or this names it."""
    cfg = schema()
    if schema is PipelineConfig:  # a number in the list and the dict (empty by default)
        cfg.ppo.resources.learner.resources = {"node_a": 0.5}
        cfg.rejection.temperature_schedule = [1.0]
    for opt in ("ray.num_cpus", "vllm.max_model_len"):  # optional numbers (None by default)
        section, key = opt.split(".")
        setattr(getattr(cfg, section), key, 1)
    missing = [key for key, _ in numeric_leaves(cfg) if range_rule(rules, key) is None]
    assert not missing, f"numeric keys without a range rule: {missing}"


@pytest.mark.parametrize("override, fragment", [
    ("ppo.gamma=1.5", "ppo.gamma 1.5 must be in [0, 1]"),
    ("ppo.kl_beta=-0.1", "ppo.kl_beta -0.1 must be >= 0"),
    ("gatt.top_p=0", "gatt.top_p 0.0 must be in (0, 1]"),
    ("rejection.top_p=2", "rejection.top_p 2.0 must be in (0, 1]"),
    ("pretrain.optim.beta2=1", "pretrain.optim.beta2 1.0 must be in [0, 1)"),
    ("sft.optim.warmup_ratio=1.5", "sft.optim.warmup_ratio 1.5 must be in [0, 1)"),
    ("world.sft=-1", "world.sft -1 must be >= 0"),
    ("reward.safety_helpfulness_share=2", "reward.safety_helpfulness_share 2.0 must be in [0, 1]"),
    ("ppo.resources.rollout.num_gpus=-1", "ppo.resources.rollout.num_gpus -1.0 must be >= 0"),
    ("ppo.resources.learner.resources={node_a: -1}", "ppo.resources.learner.resources.node_a -1"),
    ("pretrain.log_every=0", "pretrain.log_every 0 must be >= 1"),
    ("ray.dashboard_port=70000", "ray.dashboard_port 70000 must be in [1, 65535]"),
    ("eval.split=heldout", "eval.split 'heldout' is not dev or test; tune on dev, report on test"),
])
def test_range_checks(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(PPO, [override])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_ray_worker_notices_leave_the_console_and_other_worker_lines_do_not(capsys):
    """After `quiet_worker_notices` the driver's printer of worker lines (Ray's log_to_driver handler) drops Ray
    Train's PreemptionWatcher note (ERROR from C++, once per stage) and prints every other line as Ray does."""
    from ray._private import worker

    from rayllama.driver import quiet_worker_notices

    dispatcher = worker.global_worker_stdstream_dispatcher
    before = list(dispatcher.handlers)
    try:
        dispatcher.handlers = [h for h in before if h[0] != "ray_print_logs"]
        quiet_worker_notices()  # nothing to replace: log_to_driver is off, nothing is added
        assert not any(name == "ray_print_logs" for name, _ in dispatcher.handlers)
        dispatcher.add_handler("ray_print_logs", lambda data: None)  # what ray.init(log_to_driver=True) adds
        quiet_worker_notices()
        assert [name for name, _ in dispatcher.handlers].count("ray_print_logs") == 1
        notice = ("[2026-12-05 23:14:32,049 E 7388 7433] core_worker.cc:2330: Actor with class name: "
                  "'PreemptionWatcher' and ID: 'ab1b85e4' has constructor arguments in the object store and "
                  "max_restarts > 0.")
        data = {"ip": "127.0.0.1", "localhost": "127.0.0.1", "pid": 7388, "job": "01000000", "is_err": True,
                "actor_name": "TrainController", "task_name": ""}
        dispatcher.emit({**data, "lines": [notice, "rank 0: step 3 loss 1.25"]})
        dispatcher.emit({**data, "lines": [notice]})
        err = capsys.readouterr().err
        assert "rank 0: step 3 loss 1.25" in err and "TrainController pid=7388" in err
        assert "PreemptionWatcher" not in err
    finally:
        dispatcher.handlers = before


def test_ray_notices_about_settings_are_quiet_and_others_are_not():
    """The driver (and every Ray worker, through the job's setup hook) drops Ray's zero-copy warnings and the
    placement-group cleaner's once-a-second 'state API unavailable' warning (the dashboard is off), nothing else."""
    import logging
    import warnings

    from rayllama.driver import PLACEMENT_GROUP_CLEANER_LOGGER, quiet_ray_notices

    logger = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    before = list(logger.filters)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_ray_notices()
            quiet_ray_notices()  # idempotent: one filter
            warnings.warn("Zero-copy tensor serialization is enabled for this tensor", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["something else"]
        logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
        logger.warning("Failed to query placement group table: boom")
        assert seen == ["Failed to query placement group table: boom"]
        assert sum(getattr(f, "rayllama", False) for f in logger.filters) == 1
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = before
