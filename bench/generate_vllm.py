"""Generation throughput and weight-update time: vLLM inside a Ray rollout actor vs bare vLLM vs the torch engine.

    .venv/bin/python bench/generate_vllm.py [--preset tiny] [--batch 32] [--prompt 32] [--new 128] [--reps 3]
                                            [--threads 2] [--device cpu] [--dtype float32] [--no-actor] [--eager]

One random-weight model (the preset), saved as an HF Llama directory; greedy decoding of `--new` tokens for
`--batch` prompts of `--prompt` random tokens, no early stop, with the sampled token's log-prob returned (what
rollouts need). Rows:

    torch engine          rayllama.generation.TorchEngine in this process
    bare vLLM             vllm.LLM.generate in this process (the LLM object inside the VLLMEngine below)
    VLLMEngine            rayllama.vllm_engine.VLLMEngine in this process (bare vLLM + our Completion layer)
    VLLMEngine in actor   the same engine inside a Ray actor built like RolloutGenerator (make_engine("vllm")),
                          timed from the driver: the call, generation and the Completions coming back

Runs alternate between rows so machine noise hits all; the best of `--reps` counts. `update_s` is one
`load_weights` of the full state as numpy arrays (the learner's format); for the actor, `ray.put` + the call.
Prints a table and writes bench/results/generate_vllm.json (with whether the rows' greedy tokens agree).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rayllama.checkpoint import save_model  # noqa: E402
from rayllama.config import VLLMSettings  # noqa: E402
from rayllama.engines import make_engine  # noqa: E402
from rayllama.generation import GenerationEngine, SamplingParams  # noqa: E402
from rayllama.model import Transformer, count_params, preset  # noqa: E402
from rayllama.rl.actors_api import state_to_numpy  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class EngineHost:
    """The rollout generator's shape without its PPO checks: build an engine with make_engine, generate, load."""

    def __init__(self, kind: str, model_dir: str, device: str, dtype: str, threads: int, **options: Any) -> None:
        torch.set_num_threads(threads)  # before vLLM, which pins torch's thread count in its process
        start = time.perf_counter()
        self.engine = make_engine(kind, model_dir, device, dtype=dtype, max_batch_size=256, **options)
        self.build_s = time.perf_counter() - start

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        return [s[0].token_ids for s in self.engine.generate(prompts, params)]

    def timed_generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        out = self.generate(prompts, params)
        return time.perf_counter() - start, out

    def load_weights(self, state: dict[str, Any], version: int) -> int:
        """As RolloutGenerator.update_weights does: tensors over the received numpy arrays, no copy."""
        with warnings.catch_warnings():  # Ray's arrays are read-only; the engines only read them
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
        self.engine.load_weights(tensors, version)
        return version

    def get_build_s(self) -> float:
        return self.build_s


def time_call(fn, device: str) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def bare_vllm_run(engine: GenerationEngine, prompts: list[list[int]], new: int) -> list[list[int]]:
    from vllm import SamplingParams as VLLMSamplingParams

    params = VLLMSamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True, logprobs=0, detokenize=False)
    outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per engine (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-actor", action="store_true", help="skip the Ray actor row (also skipped without ray)")
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs on GPU (always eager on CPU)")
    ap.add_argument("--out", default="bench/results/generate_vllm.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    cfg.max_seq_len = max(cfg.max_seq_len, args.prompt + args.new)
    torch.manual_seed(0)
    model = Transformer(cfg)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt)).tolist()
    state = state_to_numpy(model.state_dict())
    params = SamplingParams(max_new_tokens=args.new, temperature=0.0, stop_token_ids=())
    options: dict[str, Any] = {"vllm": VLLMSettings(dtype=args.dtype, enforce_eager=True if args.eager else None)}
    tmp = tempfile.TemporaryDirectory(prefix="bench-vllm-")
    model_dir = str(save_model(Path(tmp.name) / "policy", model, cfg))
    options["cache_root"] = str(Path(tmp.name) / "vllm-cache")
    del model

    hosts = {"torch engine": EngineHost("torch", model_dir, args.device, args.dtype, args.threads)}
    runs: dict[str, Any] = {}
    runs["torch engine"] = lambda: hosts["torch engine"].generate(prompts, params)
    try:
        hosts["VLLMEngine"] = EngineHost("vllm", model_dir, args.device, args.dtype, args.threads, **options)
    except Exception as e:  # noqa: BLE001 - report and bench what runs
        print(f"vLLM rows skipped: {type(e).__name__}: {e}")
    if "VLLMEngine" in hosts:
        vllm_engine = hosts["VLLMEngine"].engine
        runs["bare vLLM"] = lambda: bare_vllm_run(vllm_engine, prompts, args.new)
        runs["VLLMEngine"] = lambda: hosts["VLLMEngine"].generate(prompts, params)
    actor, ray = None, None
    if "VLLMEngine" in hosts and not args.no_actor:
        try:
            import ray

            ray.init  # noqa: B018 - a stand-in `ray` module (bench/gpu_check.sh) has no init
        except (ImportError, AttributeError):
            ray = None
            print("actor row skipped: ray is not installed")
    if ray is not None:
        gpus = 1 if args.device.startswith("cuda") else 0
        ray.init(num_cpus=max(2, args.threads), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        actor_cls = ray.remote(EngineHost).options(
            num_cpus=args.threads, num_gpus=gpus,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
        actor = actor_cls.remote("vllm", model_dir, args.device, args.dtype, args.threads, **options)
        runs["VLLMEngine in actor"] = lambda: ray.get(actor.generate.remote(prompts, params))

    build_s = {name: h.build_s for name, h in hosts.items()}
    build_s["bare vLLM"] = build_s.get("VLLMEngine", float("nan"))
    if actor is not None:
        build_s["VLLMEngine in actor"] = ray.get(actor.get_build_s.remote())  # waits for the actor to be ready
    try:
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        outputs: dict[str, list[list[int]]] = {}
        for _ in range(args.reps):
            for name, fn in runs.items():
                seconds, outputs[name] = time_call(fn, args.device)
                times[name].append(seconds)
        update_s: dict[str, float] = {}
        for name in ("torch engine", "VLLMEngine"):
            if name in hosts:
                update_s[name] = time_call(lambda n=name: hosts[n].load_weights(state, 1), args.device)[0]
        if actor is not None:
            update_s["VLLMEngine in actor"] = time_call(
                lambda: ray.get(actor.load_weights.remote(ray.put(state), 1)), args.device)[0]
    finally:
        if ray is not None:
            ray.shutdown()
        if "VLLMEngine" in hosts:
            hosts["VLLMEngine"].engine.close()
        tmp.cleanup()

    tokens = args.batch * args.new
    reference = outputs["torch engine"]
    rows = {name: {"best_s": min(ts), "tokens_per_s": tokens / min(ts), "all_s": ts, "build_s": build_s[name],
                   "update_s": update_s.get(name, float("nan")),
                   "greedy_identical_to_torch": sum(a == b for a, b in zip(outputs[name], reference)) / len(reference)}
            for name, ts in times.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{args.preset}: {count_params(cfg) / 1e6:.1f}M params, {device}, {args.dtype}, {args.threads} threads, "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, greedy + log-probs, best of {args.reps}")
    print(f"{'engine':<22}{'seconds':>9}{'tokens/s':>10}{'build s':>9}{'update s':>10}{'same as torch':>15}")
    for name, row in rows.items():
        print(f"{name:<22}{row['best_s']:>9.2f}{row['tokens_per_s']:>10.0f}{row['build_s']:>9.1f}"
              f"{row['update_s']:>10.3f}{row['greedy_identical_to_torch']:>15.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "device": device, "params": count_params(cfg),
                                          "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
