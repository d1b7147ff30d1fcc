"""The memory plan (rayllama.plan): exact model-state bytes against meta-device models, placement, PlanError, CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayllama.config import load_config, model_config
from rayllama.model import ModelConfig, ScalarHeadModel, Transformer, preset
from rayllama.plan import GB, PlanError, build_plan, check_plan, param_shapes, state_bytes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPES = [preset("tiny"), preset("llama2-7b"), preset("llama2-70b"),  # 70B: GQA, 8 KV heads
          ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=301, ffn_dim=100, max_seq_len=64)]


def _meta(cfg: ModelConfig, head: str) -> torch.nn.Module:
    with torch.device("meta"):
        return Transformer(cfg) if head == "lm" else ScalarHeadModel(cfg)


@pytest.mark.parametrize("cfg", SHAPES, ids=lambda c: f"{c.n_layers}x{c.dim}")
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_param_shapes_are_the_models_tensors(cfg, head):
    model = _meta(cfg, head)
    assert list(param_shapes(cfg, head).items()) == [(k, tuple(p.shape)) for k, p in model.named_parameters()]


@pytest.mark.parametrize("cfg", SHAPES[:3], ids=lambda c: f"{c.n_layers}x{c.dim}")
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_state_bytes_equal_the_meta_models_sums(cfg, head):
    """Parameters, gradients and AdamW's two moments, summed over the actual tensors (numel x element size)."""
    model = _meta(cfg, head)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()  # on meta: allocates exp_avg and exp_avg_sq like a real first step
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    st = state_bytes(cfg, head)
    assert st.params == size(params)
    assert st.grads == size(p.grad for p in params)
    assert st.optimizer == size(opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq"))
    # FSDP2's dim-0 shard: rank 0 holds torch.chunk's first (largest, ceil(rows / R)) piece of every tensor
    for ranks in (3, 8, 64):
        shard = sum(torch.chunk(p, ranks)[0].numel() * p.element_size() for p in params)
        assert state_bytes(cfg, head, ranks).params == shard


def test_7b_stages_on_one_8x80gb_node():
    plan = build_plan(load_config(CONFIGS / "llama2-7b.yaml"))
    stages = {s.stage: s for s in plan.stages}
    assert list(stages) == ["pretrain", "sft", "reward", "ppo"]
    for name in ("pretrain", "sft", "reward"):  # FSDP over the node's 8 GPUs, one worker each
        s = stages[name]
        assert s.problem is None and len(s.used_gpus) == 8 and s.roles[0].shards == 8
        assert all(g.used <= 80 * GB for g in s.used_gpus)
    ppo = stages["ppo"]
    learner = ppo.roles[0]
    assert learner.name == "policy-learner" and learner.shards == 8 and all(r.on_gpu for r in ppo.roles)
    # every GPU holds a learner (0.6) and one of reference, two reward scorers, five generators (0.4)...
    assert [len(g.procs) for g in ppo.gpus] == [2] * 8
    assert all(g.procs[0][1] is learner for g in ppo.gpus)
    # ...which fits at the configured learner micro-batch of 4 rows x 4096 tokens (peak 75.7 GB, beside a generator)
    assert plan.fits and learner.batch == "4x4096" and ppo.problem is None
    assert 75 * GB < max(g.used for g in ppo.gpus) <= 80 * GB
    # at 8 rows a learner rank needs > 50 GB (policy + value sharded 8 ways, their activations): it does not fit
    eight = build_plan(load_config(CONFIGS / "llama2-7b.yaml", ["ppo.micro_batch_size=8"])).stages[-1]
    assert eight.roles[0].batch == "8x4096" and eight.roles[0].total > 50 * GB
    assert eight.problem is not None and "policy-learner" in eight.problem and "ppo.micro_batch_size" in eight.problem
    # on two nodes (learners on one, the rest a GPU each on the other) 8 rows fit too
    two = build_plan(load_config(CONFIGS / "llama2-7b.yaml", [
        "ppo.micro_batch_size=8", "cluster.nodes=2",
        *(f"ppo.resources.{r}.num_gpus=1" for r in ("learner", "reference", "reward", "rollout"))]))
    assert two.fits and len(two.stages[-1].used_gpus) == 16


def test_without_resharding_after_forward_every_block_stays_gathered():
    """train.reshard_after_forward=false (tiny.yaml's choice) keeps all L blocks gathered in bf16 from forward to
    backward instead of two at a time: +13 GB on a 7B trainer rank (32 blocks of 202M elements), twice that on a
    PPO learner (policy + value), which then no longer fits beside a generator, and the fix names the key."""
    m = preset("llama2-7b")
    block = sum(math.prod(p.shape) for n, p in _meta(m, "lm").named_parameters() if n.startswith("model.layers.0."))
    sharded, kept = (build_plan(load_config(CONFIGS / "llama2-7b.yaml", [f"train.reshard_after_forward={v}"]))
                     for v in ("true", "false"))
    for a, b in zip(sharded.stages[:3], kept.stages[:3], strict=True):  # pretrain, sft, reward: one model each
        assert b.roles[0].gathered - a.roles[0].gathered == (m.n_layers - 2) * block * 2
    learner, learner_kept = sharded.stages[-1].roles[0], kept.stages[-1].roles[0]
    assert learner_kept.gathered - learner.gathered == (2 * m.n_layers - 2) * block * 2
    assert sharded.fits and not kept.fits
    assert "train.reshard_after_forward=true" in kept.stages[-1].problem


def test_13b_ppo_fits_two_nodes_with_a_smaller_learner_micro_batch():
    """8 learners a GPU each on node 0, the reference, reward scorers and generators a GPU each on node 1; 16
    learners would put a 32-42 GB frozen process beside every learner on node 0."""
    plan = build_plan(load_config(CONFIGS / "llama2-13b.yaml"))
    ppo = plan.stages[-1]
    assert plan.fits and ppo.roles[0].shards == 8 and ppo.roles[0].batch == "4x4096"
    assert {g.node for g in ppo.gpus if any(r is ppo.roles[0] for _, r in g.procs)} == {0}
    assert not build_plan(load_config(CONFIGS / "llama2-13b.yaml", ["ppo.micro_batch_size=8"])).fits
    shared = ["ppo.num_learners=16", "ppo.resources.learner.num_gpus=0.6",
              *(f"ppo.resources.{r}.num_gpus=0.4" for r in ("reference", "reward", "rollout"))]
    assert not build_plan(load_config(CONFIGS / "llama2-13b.yaml", shared)).fits


def test_infeasible_layout_is_one_line_plan_error():
    cfg = load_config(CONFIGS / "llama2-70b.yaml", ["cluster.nodes=1", "scaling.num_workers=1",
                                                    "pretrain.micro_batch_size=1"])
    with pytest.raises(PlanError) as e:
        check_plan(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("pretrain: trainer-0 needs") and "GB" in msg and "80 GB" in msg
    assert "fix:" in msg and "scaling.num_workers" in msg and "micro_batch_size" in msg
    # a 70B generator on one GPU holds the whole model (138 GB in bf16): no layout of 80 GB GPUs fits PPO, even where
    # the learners do (64 of them at 1 row: 59.4 GB), and the first problem and the verdict name the fix
    one_gpu = ["vllm.tensor_parallel_size=1", "ppo.resources.rollout.num_gpus=1"]
    plan = build_plan(load_config(CONFIGS / "llama2-70b.yaml", one_gpu))
    ppo = plan.stages[-1]
    assert ppo.roles[0].total < 60 * GB and not any(line.startswith("ppo: policy") for line in ppo.role_problems)
    assert [r.name for r in ppo.blockers] == ["rollout"]
    assert all(r.total < 80 * GB for r in ppo.roles[1:4]) and ppo.problem.startswith("ppo: rollout (vLLM) needs")
    with pytest.raises(PlanError, match=r"^ppo: rollout \(vLLM\) needs 141\.2 GB .*vllm\.tensor_parallel_size"):
        check_plan(load_config(CONFIGS / "llama2-70b.yaml", one_gpu))
    verdict = plan.table().splitlines()[-1]
    assert verdict.startswith("does not fit: ppo (above); no layout of 80 GB GPUs fits ppo: rollout holds")
    assert "(138.0 GB in bfloat16 per GPU at vllm.tensor_parallel_size 1; raise it)" in verdict
    # as shipped: tensor-parallel vLLM over 8 GPUs holds 1/8 of the weights and of the KV heads on each of its 8
    # GPUs, and 70B PPO fits 12 nodes
    shipped = check_plan(load_config(CONFIGS / "llama2-70b.yaml"))
    rollout = shipped.stages[-1].roles[-1]
    assert rollout.tp == 8 and rollout.params == math.ceil(plan.stages[-1].roles[-1].params / 8)
    assert rollout.kv_row * 8 == plan.stages[-1].roles[-1].kv_row  # 8 KV heads: one per GPU
    taken = [name for gpu in shipped.stages[-1].gpus for name, role in gpu.procs if role is rollout]
    assert taken == [f"rollout-{i}/tp{j}" for i in range(2) for j in range(8)]
    # one reference process holds the whole 138 GB: the fix is to shard it
    whole = build_plan(load_config(CONFIGS / "llama2-70b.yaml", ["ppo.resources.reference.shards=1"]))
    assert any(line.startswith("ppo: reference needs 158.4 GB") and "ppo.resources.reference.shards, now 1" in line
               for line in whole.stages[-1].role_problems)


def test_cpu_pipeline_plans_nothing_on_gpus():
    plan = check_plan(load_config(CONFIGS / "ppo.yaml"))  # the tiny CPU pipeline: every process on the CPU
    assert plan.fits and all(not s.used_gpus and s.cpu for s in plan.stages)


def test_plan_cli_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "rayllama.plan", str(CONFIGS / "llama2-7b.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "6.74B parameters" in out and "policy-learner" in out and "rollout" in out
    assert "act ckpt" in out and "node 0 gpu 7" in out
    assert out.strip().splitlines()[-1].startswith(("fits", "does not fit"))
    bad = subprocess.run([sys.executable, "-m", "rayllama.plan", str(CONFIGS / "llama2-7b.yaml"), "model.dim=1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_driver_checks_the_plan_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rayllama.driver", str(CONFIGS / "llama2-70b.yaml"), "cluster.nodes=1",
         "scaling.num_workers=1", "pretrain.micro_batch_size=1", f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "pretrain: trainer-0 needs" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_plan_uses_the_configs_model():
    cfg = load_config(CONFIGS / "llama2-13b.yaml")
    plan = build_plan(cfg)
    assert plan.model == model_config(cfg, 32000)
    trainer = plan.stages[0].roles[0]
    assert trainer.params == state_bytes(plan.model, "lm", 16).params


def test_vllm_generators_take_the_configured_gpu_memory_utilization():
    """The plan gives a vLLM generator vllm.gpu_memory_utilization of its GPU, the value its engine is built with."""
    def rollout(*overrides: str):
        plan = build_plan(load_config(CONFIGS / "llama2-7b.yaml", ["ppo.engine=vllm", *overrides]))
        ppo = next(s for s in plan.stages if s.stage == "ppo")
        return next(r for r in ppo.roles if r.name == "rollout"), ppo

    default, ppo = rollout()
    assert default.paged and default.share == int(0.4 * 80 * GB)
    assert any("gpu_memory_utilization 0.4 " in n for n in ppo.notes)
    half, ppo = rollout("vllm.gpu_memory_utilization=0.5")
    assert half.share == int(0.5 * 80 * GB) and any("gpu_memory_utilization 0.5 " in n for n in ppo.notes)
