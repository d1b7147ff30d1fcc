"""Typed configs: YAML + overrides, and one-line errors for user mistakes (before Ray starts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rayllama.config import ConfigError, load_config, model_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in ("tiny.yaml", "serve.yaml")], ids=lambda p: p.name)
def test_every_shipped_pipeline_config_loads(path):
    cfg = load_config(path)
    assert cfg.stages and cfg.stages[0] == "tokenizer"
    assert model_config(cfg, vocab_size=cfg.tokenizer.vocab_size).vocab_size == cfg.tokenizer.vocab_size


def test_base_file_and_overrides_merge_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("name: a\npretrain: {steps: 7, seq_len: 64}\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\npretrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "top.yaml", ["pretrain.optim.lr=0.5", "model.n_layers=3"])
    assert (cfg.name, cfg.pretrain.steps, cfg.pretrain.seq_len) == ("a", 9, 64)
    assert cfg.pretrain.optim.lr == 0.5 and cfg.model.n_layers == 3
    assert cfg.run_dir == "runs/a"  # ${name} interpolation resolved


def test_llama2_defaults():
    cfg = load_config(None)
    o = cfg.pretrain.optim
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip, o.final_lr_ratio) == (0.9, 0.95, 1e-5, 0.1, 1.0, 0.1)
    assert cfg.sft.optim.lr == 2e-5 and cfg.sft.batch_size == 64 and cfg.sft.epochs == 2
    assert cfg.reward.optim.lr == 1e-5 and cfg.reward.epochs == 1 and cfg.reward.margin == "small"
    p = cfg.ppo
    assert (p.optim.lr, p.optim.schedule, p.prompts_per_iteration, p.mini_batch_size, p.clip, p.kl_beta) == (
        1e-6, "constant", 512, 64, 0.2, 0.01,
    )
    assert p.safety_gate == 0.15


def _one_line(err: ConfigError) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_unknown_key_names_key_source_and_accepted_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pretrain.stepz=5"])
    msg = _one_line(e.value)
    assert "pretrain.stepz" in msg and "override" in msg and "steps" in msg and "seq_len" in msg

    (tmp_path / "c.yaml").write_text("sft:\n  epohcs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    msg = _one_line(e.value)
    assert "sft.epohcs" in msg and "c.yaml" in msg and "epochs" in msg


def test_wrong_type_names_key_and_source(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pretrain.steps=abc"])
    msg = _one_line(e.value)
    assert "pretrain.steps" in msg and "abc" in msg
    (tmp_path / "c.yaml").write_text("scaling:\n  num_workers: [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert "scaling.num_workers" in _one_line(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in _one_line(e.value) and "not found" in str(e.value)
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "bad.yaml")
    assert "bad.yaml" in _one_line(e.value) and "line" in str(e.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stages=[tokenizer,sft,pretrain]", "out of order"),
        ("stages=[tokenizer,warp]", "unknown stage 'warp'"),
        ("model.preset=llama3", "llama2-7b"),
        ("pretrain.batch_size=20", "not a multiple"),
        ("reward.margin=huge", "reward.margin"),
        ("ppo.mini_batch_size=100", "ppo.prompts_per_iteration"),
        ("pretrain", "key=value"),
        ("vllm.gpu_memory_utilization=0", "vllm.gpu_memory_utilization 0.0 must be in (0, 1]"),
        ("vllm.gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization 1.5 must be in (0, 1]"),
        ("vllm.tensor_parallel_size=0", "vllm.tensor_parallel_size 0 must be >= 1"),
        ("vllm.tensor_parallel_size=2", "vllm.tensor_parallel_size 2 needs device cuda (it is cpu); set it to 1"),
        ("vllm.dtype=fp8", "vllm.dtype 'fp8' is not auto"),
        ("vllm.max_model_len=0", "vllm.max_model_len 0 must be >= 1"),
        ("ppo.async_rollouts=true vllm.enable_sleep_mode=true", "set vllm.enable_sleep_mode=false"),
        ("ppo.prefetch_scoring=both", "ppo.prefetch_scoring 'both' is not auto, serial or parallel"),
        ("reward.policy_pairs=0 reward.policy_pairs_from=[runs/r1/ppo/model]",
         "reward.policy_pairs_from lists 1 policies but reward.policy_pairs is 0"),
        ("reward.policy_pairs_with_sft=true", "reward.policy_pairs_from is empty; list the later policies there"),
    ],
)
def test_semantic_errors_name_the_key_and_the_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override.split())
    assert needle in _one_line(e.value)


def test_vllm_section_defaults_and_tensor_parallel_on_cuda():
    from rayllama.config import vllm_dtype

    v = load_config(None).vllm
    assert (v.dtype, v.tensor_parallel_size, v.gpu_memory_utilization, v.max_model_len) == ("auto", 1, 0.4, None)
    assert (v.enable_prefix_caching, v.enforce_eager, v.enable_sleep_mode) == (True, None, False)
    assert (vllm_dtype(v, "cpu"), vllm_dtype(v, "cuda")) == ("float32", "bfloat16")
    cfg = load_config(None, ["device=cuda", "vllm.tensor_parallel_size=4", "vllm.enable_sleep_mode=true"])
    assert cfg.vllm.tensor_parallel_size == 4 and cfg.vllm.enable_sleep_mode
    # a vLLM generator of a stage that runs needs the GPUs of its shards (the torch engine ignores the key)
    tp4 = ["device=cuda", "vllm.tensor_parallel_size=4", "stages=[tokenizer,pretrain,sft,ppo]", "ppo.engine=vllm"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*tp4, "ppo.resources.rollout.num_gpus=1"])
    assert _one_line(e.value) == ("vllm.tensor_parallel_size 4 needs ppo.resources.rollout.num_gpus >= 4 (it is 1); "
                                  "give each generator 4 GPUs or lower vllm.tensor_parallel_size")
    assert load_config(None, [*tp4, "ppo.resources.rollout.num_gpus=4"]).vllm.tensor_parallel_size == 4


def test_serve_config_has_the_same_vllm_section():
    from serve.config import load_serve_config

    assert load_serve_config(None, ["vllm.gpu_memory_utilization=0.9"]).vllm.gpu_memory_utilization == 0.9
    with pytest.raises(ConfigError) as e:
        load_serve_config(None, ["vllm.tensor_parallel_size=2"])
    assert _one_line(e.value).endswith("vllm.tensor_parallel_size 2 needs device cuda (it is cpu); set it to 1")


def test_learners_need_an_equal_share_of_each_mini_batch_only():
    """Every learner gets all the rollouts and trains on its 1/N share of each mini-batch (actors.policy): the
    rollouts must be a multiple of ppo.mini_batch_size and N a divisor of it, nothing more."""
    assert load_config(None, ["ppo.num_learners=16"]).ppo.num_learners == 16  # 512 rollouts, mini-batches of 64
    assert load_config(None, ["ppo.num_learners=64"]).ppo.num_learners == 64
    assert "ppo.num_learners 3" in _one_line(pytest.raises(ConfigError, load_config, None, ["ppo.num_learners=3"]).value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["ppo.micro_batch_size=0"])
    assert "ppo.micro_batch_size 0 must be >= 1" in _one_line(e.value)


def test_driver_prints_one_line_and_exits_2_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rayllama.driver", str(ROOT / "configs" / "sft.yaml"), "sft.epohcs=1",
         f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "sft.epohcs" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a config mistake


def test_real_preset_refuses_a_leftover_shape_override():
    # ppo.yaml's base tiny.yaml sets model.n_layers 4 and max_seq_len 256: a 7B preset must not silently take them
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "ppo.yaml", ["model.preset=llama2-7b"])
    msg = _one_line(e.value)
    assert "model.preset llama2-7b" in msg and "model.n_layers=4" in msg and "model.max_seq_len=256" in msg
    assert "tiny" in msg
    with pytest.raises(ConfigError, match="model.dim=4096"):
        load_config(None, ["model.preset=llama2-13b", "model.dim=4096"])
    assert load_config(None, ["model.n_layers=3"]).model.n_layers == 3  # the tiny preset keeps its overrides


def test_bad_model_shape_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.dim=100"])
    assert "n_heads" in _one_line(e.value)


@pytest.mark.parametrize("size, billions, digits", [("7b", 6.74, 2), ("13b", 13.0, 1), ("70b", 69.0, 1)])
def test_real_size_configs_have_the_papers_shapes_and_settings(size, billions, digits):
    import torch

    from rayllama.model import PRESETS, Transformer

    path = ROOT / "configs" / f"llama2-{size}.yaml"
    import yaml

    assert "base" not in yaml.safe_load(path.read_text())  # tiny.yaml's per-field shapes must not reach a real preset
    assert path.read_text().startswith(f"# python -m rayllama.driver configs/llama2-{size}.yaml")
    cfg = load_config(path)
    assert cfg.model.preset == f"llama2-{size}"
    m = model_config(cfg, cfg.tokenizer.vocab_size)
    assert m == PRESETS[f"llama2-{size}"] and m.vocab_size == 32000 and m.max_seq_len == 4096
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(m).parameters())
    assert round(n / 1e9, digits) == billions
    if size == "7b":
        assert n == 6_738_415_616
    if size == "70b":
        assert m.n_kv_heads == 8
    assert cfg.pretrain.seq_len == cfg.sft.max_seq_len == cfg.reward.max_seq_len == 4096
    o = cfg.pretrain.optim
    assert (o.lr, o.warmup_steps, o.schedule, o.final_lr_ratio) == (1.5e-4 if size == "70b" else 3e-4, 2000, "cosine", 0.1)
    for opt in (cfg.pretrain.optim, cfg.sft.optim, cfg.reward.optim, cfg.ppo.optim):
        assert (opt.beta1, opt.beta2, opt.eps, opt.weight_decay, opt.grad_clip) == (0.9, 0.95, 1e-5, 0.1, 1.0)
    assert (cfg.sft.optim.lr, cfg.sft.batch_size) == (2e-5, 64)
    assert (cfg.reward.optim.lr, cfg.reward.batch_size, cfg.reward.epochs) == (5e-6 if size == "70b" else 1e-5, 512, 1)
    p = cfg.ppo
    assert (p.optim.lr, p.optim.schedule, p.prompts_per_iteration, p.mini_batch_size, p.clip) == (
        1e-6, "constant", 512, 64, 0.2)
    assert p.kl_beta == (0.005 if size == "70b" else 0.01)
    assert cfg.device == "cuda" and cfg.scaling.use_gpu and cfg.scaling.strategy == "fsdp"
    assert cfg.train.param_dtype == "bfloat16" and cfg.train.activation_checkpointing
    assert cfg.cluster.gpus_per_node == 8 and cfg.cluster.gpu_memory_gb == 80
    # Ray Train stages: a GPU per worker, 1, 2 and 4 nodes' worth; 70B's PPO needs 12 nodes (92 GPUs: 64 learner
    # ranks, 12 frozen-model shards, 2 generators tensor-parallel over 8 GPUs each; README "Memory plan")
    assert cfg.scaling.num_workers == {"7b": 8, "13b": 16, "70b": 32}[size] and cfg.scaling.gpus_per_worker == 1
    assert cfg.cluster.nodes == {"7b": 1, "13b": 2, "70b": 12}[size]
    if size == "70b":
        assert (p.num_learners, p.num_generators, cfg.vllm.tensor_parallel_size, p.resources.rollout.num_gpus) == (
            64, 2, 8, 8)
    res = p.resources
    assert all(r.num_gpus > 0 for r in (res.learner, res.reference, res.reward, res.rollout))


def test_the_world_seed_follows_the_run_seed_unless_set():
    """Runs with different seeds are different worlds (and eval sets), not one world sampled three times."""
    assert load_config(None).world_seed == 0
    assert load_config(None, ["seed=5"]).world_seed == 5
    assert load_config(None, ["seed=5", "world.seed=2"]).world_seed == 2


@pytest.mark.parametrize("stage,key", [("ppo", "ppo.ptx_coef"), ("rejection", "rejection.replay_share"),
                                       ("gatt", "gatt.replay_share")])
def test_replaying_sft_dialogues_needs_some_in_the_users_data(stage, key):
    """With a data: section that lists no SFT source, a listed stage that replays SFT dialogues is refused before
    Ray starts, naming the key and the fix; set to 0 it runs (the toy world always has SFT dialogues)."""
    prompts = "data.prompts=[{path: tests/fixtures/data/prompts.jsonl, format: prompts}]"
    with pytest.raises(ConfigError) as e:
        load_config(None, [prompts, f"stages=[{stage}]", f"{key}=0.5"])
    assert f"{key} 0.5 replays SFT dialogues and data.sft is empty; add a data.sft source or set {key}=0" == \
        _one_line(e.value)
    assert getattr(getattr(load_config(None, [prompts, f"stages=[{stage}]", f"{key}=0"]), stage),
                   key.split(".")[1]) == 0
    assert load_config(None, [f"stages=[{stage}]", f"{key}=0.5"]).stages == [stage]  # the toy world


def test_a_role_threads_override_threads_per_worker():
    """`<stage>.resources.<role>.threads` sets that role's torch threads; the others keep threads_per_worker
    (tiny.yaml: PPO's and rejection sampling's learner take both cores while the other actors wait)."""
    from actors.group import _learner_kwargs, _threads

    cfg = load_config(ROOT / "configs" / "ppo.yaml", ["threads_per_worker=1"])
    assert _learner_kwargs(cfg, cfg.ppo.resources)["threads"] == 2
    assert _learner_kwargs(cfg, cfg.rejection.resources)["threads"] == 2
    assert [_threads(cfg, r) for r in (cfg.ppo.resources.rollout, cfg.ppo.resources.reference)] == [1, 1]
    cfg = load_config(ROOT / "configs" / "ppo.yaml", ["ppo.resources.learner.threads=3", "threads_per_worker=4"])
    assert _learner_kwargs(cfg, cfg.ppo.resources)["threads"] == 3 and _threads(cfg, cfg.ppo.resources.rollout) == 4
    with pytest.raises(ConfigError, match="ppo.resources.learner.threads"):
        load_config(ROOT / "configs" / "ppo.yaml", ["ppo.resources.learner.threads=0"])


def test_config_checks_answer_without_importing_torch():
    """Key, type, range and model-shape checks (the driver's and serve's config errors, the start of `--dry-run`)
    need no torch, so a mistyped override is answered in a fraction of a second rather than after its ~1.5 s import."""
    code = ("import sys; from rayllama.config import ConfigError, load_config\n"
            "cfg = load_config('configs/ppo.yaml', ['model.dim=96', 'model.n_heads=4'])\n"
            "try:\n    load_config('configs/ppo.yaml', ['model.n_heads=5'])\nexcept ConfigError as e:\n    print(e)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "is not divisible by n_heads 5" in out and out.splitlines()[-1] == "[]", out
