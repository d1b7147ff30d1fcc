"""Two Ray nodes on this machine (`ray.cluster_utils.Cluster`): the learner on one, the generator on the other,
placed by custom resources from the config (`ppo.resources.<role>.resources`), and two PPO iterations with the
weights crossing nodes through the object store.

The cluster runs in a subprocess: it is a second Ray (its own GCS, raylets and object stores) next to the
session's (tests/conftest.py `ray_session`), and a process can be connected to one Ray at a time. The subprocess
leaves nothing behind: it shuts the cluster down in `finally`, and the test kills its process group if it hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from worlds import local, make_world, tiny_config

from rayllama.checkpoint import load_model
from rayllama.data.formats import write_jsonl
from rayllama.rl.ppo import run_ppo

ROOT = Path(__file__).resolve().parents[1]

CLUSTER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["tests"])

    import ray
    from ray.cluster_utils import Cluster

    from actors.group import create_rl_actors, shutdown_rl_actors
    from rayllama.data.formats import read_prompts
    from rayllama.generation import SamplingParams
    from rayllama.rl.ppo import run_ppo
    from rayllama.tokenizer import Tokenizer
    from worlds import TinyWorld, tiny_config

    world = TinyWorld(Tokenizer(spec["tok"]), Path(spec["sft"]), Path(spec["rh"]), Path(spec["rs"]),
                      list(read_prompts(spec["prompts"])))
    cfg = tiny_config(iterations=2)
    cfg.ppo.resources.learner.resources = {"node_a": 0.1}
    cfg.ppo.resources.rollout.resources = {"node_b": 0.1}
    node = dict(num_cpus=1, object_store_memory=150 * 1024 * 1024)
    cluster = Cluster(initialize_head=True, head_node_args={**node, "resources": {"node_a": 1},
                                                            "include_dashboard": False})
    try:
        cluster.add_node(**node, resources={"node_b": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
        actors = create_rl_actors(cfg, world.sft, world.sft, world.reward_helpfulness, world.reward_safety)
        try:
            node_of = {name: ray.get(h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
                       for name, h in actors.names.items()}
            summary = run_ppo(cfg, actors, world.prompts, world.tokenizer, Path(spec["out"]))
            learner, generator = actors.learners[0], actors.generators[0]
            greedy = SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(world.tokenizer.eos_id,))
            prompts = [[1, 30, 31, 32], [1, 40], [1, 50, 51, 52, 53]]
            same_greedy = [c[0].token_ids for c in ray.get(generator.generate.remote(prompts, greedy))] == \\
                ray.get(learner.greedy.remote(prompts, 8, (world.tokenizer.eos_id,)))
            result = {"nodes": node_of, "head": cluster.head_node.node_id,
                      "worker": next(iter(cluster.worker_nodes)).node_id,
                      "generator_version": ray.get(generator.version.remote()), "same_greedy": same_greedy,
                      "iterations": summary["iterations"]}
        finally:
            shutdown_rl_actors(actors)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result), flush=True)
""")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_learner_and_generator_on_two_nodes_run_two_ppo_iterations(tmp_path):
    world = make_world(tmp_path / "world")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", world.prompts)
    out = tmp_path / "ppo"
    spec = {"tests": str(ROOT / "tests"), "tok": str(world.tokenizer.model_path), "sft": str(world.sft),
            "rh": str(world.reward_helpfulness), "rs": str(world.reward_safety), "prompts": str(prompts),
            "out": str(out)}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script, its cluster's GCS/raylets and workers
        output, _ = proc.communicate()
        pytest.fail(f"the 2-node run did not finish in 540 s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[len("RESULT "):])

    nodes = result["nodes"]
    assert result["head"] != result["worker"]
    assert nodes["policy-learner-0"] == result["head"]  # node_a
    assert nodes["rollout-0"] == result["worker"]  # node_b
    assert nodes["policy-learner-0"] != nodes["rollout-0"]
    # the weights crossed nodes: the generator holds version 2 (two syncs after the initial one) and its greedy
    # answers equal the learner's, and the run ends exactly where an in-process run ends
    assert result["iterations"] == 2 and result["generator_version"] == 2 and result["same_greedy"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "iteration" in r]
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["logprob_drift"] < 1e-4 for r in rows)
    cfg = tiny_config(iterations=2)
    straight = local(cfg, world)
    run_ppo(cfg, straight, world.prompts, world.tokenizer, tmp_path / "straight")
    final = load_model(out / "model")[0].state_dict()
    for name, tensor in straight.learners[0].obj.policy.state_dict().items():
        assert torch.equal(final[name], tensor), name
