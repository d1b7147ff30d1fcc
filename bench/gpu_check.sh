#!/usr/bin/env bash
# GPU check (issue 7 item 5): one script, at most 8 minutes on one H100/H200 with PyTorch preinstalled and no
# network. Run from the repository root:
#
#     bash bench/gpu_check.sh DIR
#
# Steps, each under its own time limit, each one line in DIR/summary.txt (ok / FAILED / skipped + why):
#   1. model parity on CUDA: tests/test_model.py's configs and the tiny preset against transformers'
#      LlamaForCausalLM, in fp32 (TF32 off; atol 1e-3) and bf16 (our bf16 error vs the fp32 oracle at most
#      1.5x transformers' own bf16 error + 1e-2)                                      -> DIR/parity.json
#   2. one PPO iteration with the torch engine on the GPU: tiny preset, local actors (no Ray needed), 16
#      prompts x 32 new tokens                                                        -> DIR/ppo_one_iteration.json
#   3. bench/train_throughput.py --device cuda --dtype bfloat16                       -> DIR/train_throughput.json
#   4. bench/generate.py --device cuda (TorchEngine vs transformers generate)         -> DIR/generate.json
#   5. bench/generate_vllm.py --device cuda --dtype bfloat16 --eager (no CUDA-graph capture: it would not fit
#      the limit twice; vLLM rows only where vllm is installed, the actor row only where ray is)
#                                                                                     -> DIR/generate_vllm.json
#   6. (runs second, so the budget never skips it) bench/fsdp_memory.py --device cuda: one FSDP2 bf16 training step (activation checkpointing) of a
#      Llama-2-7B-width model with 2 layers at 1 x 4096 tokens, peak memory against rayllama.plan's figure
#      for the same shapes                                                             -> DIR/fsdp_memory.json
#   7. (third) bench/weight_update.py --device cuda: a bf16 weight update of a Llama-2-7B-width model with 2
#      layers (1.3 GB) from a learner process to a torch engine in another process over the weight-sync
#      protocol (NCCL with 2+ GPUs; on one, CUDA IPC and host-staged gloo), seconds vs a device copy of the bytes
#                                                                                     -> DIR/weight_update.json
# All output goes to DIR/log.txt (9 files in all: the device tool brings back what fits).
#
# Packages: the machine's python3 has torch, transformers, safetensors, sentencepiece, numpy, PyYAML; rayllama
# also needs omegaconf (steps 2, 3 import rayllama.config) and sentencepiece >= 0.2.3 (0.2.2, seen on an H200
# machine, aborts step 2's tokenizer training). Carry them as wheels for the machine's python (3.12), made here with
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl omegaconf==2.4.0
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 312 \
#         --platform manylinux_2_28_x86_64 -d .whl sentencepiece==0.2.3
# and name `.whl` in the run's carry; this script installs whatever .whl holds into a temp dir. Ray's wheel
# (75 MiB) is over the carry limit: without ray, step 2 runs the actors in-process behind a stand-in `ray`
# module (`@ray.remote` only; local actors never call Ray) and step 5 skips its actor row.
#
# Dry run of the plumbing here (CPU, slow; steps may hit their limits):
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_STUB_RAY=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh /tmp/gpu-check
set -u -o pipefail

DIR=${1:?usage: bash bench/gpu_check.sh DIR}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the whole script; a step that cannot finish inside it is skipped
DEV=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of the plumbing on a machine without a GPU (slow, not a check)
PY=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
SUMMARY="$DIR/summary.txt"
LOG="$DIR/log.txt"
: >"$SUMMARY"
: >"$LOG"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

note() { echo "$*" | tee -a "$SUMMARY"; }

# ----------------------------------------------------------------------------------------------- packages
SITE=$(mktemp -d /tmp/gpu-check-site.XXXX)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="$SITE:$PYTHONPATH"
fi
if [[ ${GPU_CHECK_STUB_RAY:-0} == 1 ]] || ! "$PY" -c "import ray" >/dev/null 2>&1; then
    mkdir -p "$SITE/ray_stub/ray"
    cat >"$SITE/ray_stub/ray/__init__.py" <<'EOF'
"""Stand-in for ray where it is not installed: `@ray.remote` leaves the class as it is (local actors only)."""


def remote(*args, **kwargs):
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return lambda obj: obj


def is_initialized():
    return False
EOF
    export PYTHONPATH="$SITE/ray_stub:$PYTHONPATH"
    RAY="stand-in"
else
    RAY="installed"
fi
{
    date -u +"%Y-%m-%dT%H:%M:%SZ gpu_check"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<EOF
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "safetensors", "sentencepiece", "omegaconf", "vllm"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "missing", type(e).__name__)
print("ray", "$RAY")
EOF
} 2>&1 | tee -a "$SUMMARY" >>"$LOG"

# ----------------------------------------------------------------------------------------------- steps
step() {  # step NAME LIMIT_S COMMAND...: run under `timeout`, log everything, one summary line
    local name=$1 limit=$2 left rc start
    shift 2
    left=$((BUDGET_S - SECONDS))
    if ((left < 20)); then
        note "$name: skipped (the ${BUDGET_S}s budget is spent)"
        return
    fi
    ((limit > left)) && limit=$left
    echo "===== $name (limit ${limit}s) =====" >>"$LOG"
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    if ((rc == 0)); then
        note "$name: ok ($((SECONDS - start))s)"
    elif ((rc == 124 || rc == 137)); then
        note "$name: FAILED, over its ${limit}s limit"
    else
        note "$name: FAILED, exit $rc ($((SECONDS - start))s; see log.txt)"
    fi
}

# ----------------------------------------------------------------------------------------------- payloads
cat >"$SITE/parity.py" <<'EOF'
"""Our Transformer vs transformers' LlamaForCausalLM on the GPU in fp32 and bf16 (tests/test_model.py's
helpers and configs, plus the tiny preset). argv: device, output JSON."""
import json
import sys

import torch

sys.path.insert(0, "tests")
from test_model import CONFIGS, hf_causal, make, tokens  # noqa: E402

from rayllama.model import preset  # noqa: E402

device = torch.device(sys.argv[1])
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
results, ok = {}, True
for name, cfg in {**CONFIGS, "tiny": preset("tiny")}.items():
    model = make(cfg)
    hf = hf_causal(model).to(device)
    model = model.to(device)
    x = tokens(4, 64 if name == "tiny" else 19, cfg.vocab_size).to(device)
    with torch.no_grad():
        ours32, hf32 = model(x).float(), hf(x).logits.float()
        ours16 = model.to(torch.bfloat16)(x).float()
        hf16 = hf.to(torch.bfloat16)(x).logits.float()
    fp32_err = (ours32 - hf32).abs().max().item()
    ours_bf16_err = (ours16 - hf32).abs().max().item()
    hf_bf16_err = (hf16 - hf32).abs().max().item()
    passed = fp32_err < 1e-3 and ours_bf16_err <= 1.5 * hf_bf16_err + 1e-2
    ok &= passed
    results[name] = {"fp32_max_abs": fp32_err, "bf16_ours_vs_fp32": ours_bf16_err,
                     "bf16_transformers_vs_fp32": hf_bf16_err,
                     "bf16_argmax_agreement": (ours16.argmax(-1) == hf16.argmax(-1)).float().mean().item(),
                     "passed": passed}
    print(name, results[name])
name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
with open(sys.argv[2], "w") as f:
    json.dump({"device": name, "results": results, "passed": ok}, f, indent=2)
sys.exit(0 if ok else 1)
EOF

cat >"$SITE/ppo_one_iteration.py" <<'EOF'
"""One PPO iteration (generate -> score -> advantages -> train -> sync) with the torch engine, local actors.
argv: device, output JSON."""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from ppo_iteration import build_world  # noqa: E402

from actors.group import create_local_rl_actors  # noqa: E402
from rayllama.config import OptimConfig, PipelineConfig  # noqa: E402
from rayllama.rl.loop import push_weights, start_loop  # noqa: E402
from rayllama.rl.ppo import PPOLoop, ppo_step  # noqa: E402

device = sys.argv[1]
cfg = PipelineConfig(seed=0, device=device)
ppo = cfg.ppo
ppo.engine, ppo.iterations, ppo.prompts_per_iteration, ppo.mini_batch_size = "torch", 1, 16, 8
ppo.max_new_tokens, ppo.num_generators, ppo.checkpoint_every = 32, 1, 10_000
ppo.optim = OptimConfig(lr=1e-5, schedule="constant")
with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    tok, sft, rm_h, rm_s, prompts = build_world(Path(tmp), 64)
    setup_s = time.perf_counter() - start
    actors = create_local_rl_actors(cfg, sft, sft, rm_h, rm_s)
    loop, _ = start_loop(PPOLoop, cfg, actors, prompts, tok, Path(tmp) / "run")
    push_weights(loop)
    start = time.perf_counter()
    metrics = ppo_step(loop)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
print({k: round(v, 4) for k, v in metrics.items()})
name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
with open(sys.argv[2], "w") as f:
    json.dump({"device": name, "setup_s": setup_s, "iteration_s": seconds, "metrics": metrics}, f, indent=2)
EOF

# ----------------------------------------------------------------------------------------------- run
step "1 model parity ($DEV, fp32 + bf16)" 90 "$PY" "$SITE/parity.py" "$DEV" "$DIR/parity.json"
step "6 FSDP2 bf16 step of a 7B-width model vs the memory plan ($DEV)" 90 "$PY" bench/fsdp_memory.py \
    --device "$DEV" $([[ $DEV == cpu ]] && echo "--dim 256 --seq 256") --out "$DIR/fsdp_memory.json"
step "7 bf16 weight update of a 7B-width model, learner -> engine process ($DEV)" 90 "$PY" \
    bench/weight_update.py --device "$DEV" $([[ $DEV == cpu ]] && echo "--dim 512") --out "$DIR/weight_update.json"
step "2 one PPO iteration (torch engine, $DEV)" 150 "$PY" "$SITE/ppo_one_iteration.py" "$DEV" \
    "$DIR/ppo_one_iteration.json"
step "3 train throughput bench ($DEV, bf16)" 75 "$PY" bench/train_throughput.py --device "$DEV" --dtype bfloat16 \
    --out "$DIR/train_throughput.json"
step "4 generate bench ($DEV)" 60 "$PY" bench/generate.py --device "$DEV" --out "$DIR/generate.json"
step "5 vLLM generate bench ($DEV, bf16)" 120 "$PY" bench/generate_vllm.py --device "$DEV" --dtype bfloat16 \
    --eager --reps 3 --out "$DIR/generate_vllm.json"
note "total: ${SECONDS}s"
rm -rf "$SITE"
! grep -q FAILED "$SUMMARY"
