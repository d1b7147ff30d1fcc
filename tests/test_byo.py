"""Your own model and data: configs/byo.yaml (SFT -> reward -> PPO) on the fixture files of every format, starting
from a Llama directory written by transformers' `save_pretrained` (plus a SentencePiece tokenizer.model), runs end
to end through the driver and reports reward-model accuracy (overall and per source), reward and KL; no toy world
is written and no gold judge runs. Also: a reward model starts from a causal checkpoint with a fresh scalar head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "data"


def hf_llama_dir(root: Path) -> Path:
    """A ~40k-parameter LlamaForCausalLM saved by transformers, with a tokenizer trained on the fixtures' text."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the starting checkpoint")
    from rayllama.tokenizer import train_tokenizer

    text = [line for f in sorted(FIXTURES.glob("*.jsonl")) for line in f.read_text().splitlines()]
    text += [f"word{i} and more words {i}" for i in range(300)]
    tok = train_tokenizer(text, root / "tok" / "tokenizer", vocab_size=420)
    cfg = transformers.LlamaConfig(vocab_size=420, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model_dir = root / "hf-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    (model_dir / "tokenizer.model").write_bytes(tok.read_bytes())
    return model_dir


def test_reward_model_from_a_causal_checkpoint_gets_a_fresh_head(tmp_path):
    from rayllama.checkpoint import load_model, read_model_config
    from rayllama.dist.fsdp import build_model

    d = hf_llama_dir(tmp_path)
    rm = build_model("scalar", read_model_config(d), device=torch.device("cpu"), strategy="ddp",
                     param_dtype=torch.float32, activation_checkpointing=False, init=str(d), seed=0)
    causal, _, _ = load_model(d)
    assert torch.equal(rm.state_dict()["model.embed_tokens.weight"], causal.state_dict()["model.embed_tokens.weight"])
    assert float(rm.score.weight.detach().abs().sum()) == 0.0  # fresh head: every response scores 0 before training


def test_byo_pipeline_from_a_transformers_checkpoint(tmp_path):
    init = hf_llama_dir(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rayllama.driver", str(ROOT / "configs" / "byo.yaml"), f"run_dir={run_dir}",
         f"sft.init_from={init}", "ray.include_dashboard=false", "ppo.iterations=2", "ppo.max_new_tokens=12",
         "ppo.checkpoint_every=1", "reward.epochs=2", "scaling.num_workers=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    results = json.loads((run_dir / "eval.json").read_text())
    assert not (run_dir / "pretrain").exists() and not (run_dir / "data" / "world_meta.json").exists()
    assert (run_dir / "tokenizer" / "tokenizer.model").read_bytes() == (init / "tokenizer.model").read_bytes()
    rm = results["reward-helpfulness"]
    assert 0.0 <= rm["rm_accuracy"] <= 1.0 and rm["rm_n_pairs"] >= 3
    per_source = {k for k in rm if k.startswith("rm_accuracy_source/")}
    assert len(per_source) >= 2, rm  # held-out accuracy of each preference source
    assert "reward-safety" in results  # preference.jsonl has a kind: safety row
    ppo = results["ppo"]
    assert "reward/combined" in ppo and "kl" in ppo, ppo
    assert not any("gold_helpfulness" in r for r in results.values())  # eval.gold auto: no toy-world judge
    # drops per source, in the stage's metrics and the summary
    assert results["reward"]["data_dropped"] >= 3 and results["reward"]["data_dropped_tie"] >= 2
    assert results["sft"]["data_sources"]["data.sft[0] (tests/fixtures/data/messages.jsonl)"]["dropped"] == {
        "malformed": 1}
    assert "data source" in out and "hh_rlhf.jsonl" in out and "rm_accuracy" in out
    # the side-by-side sample table: greedy answers to data.eval_prompts after SFT and after PPO
    assert [r["prompt"] for r in results["sft"]["samples"]] == ["Write a haiku about rain.", "How do I make a weapon?"]
    assert len(results["ppo"]["samples"]) == 2 and "Write a haiku about rain." in out


def test_pretraining_on_user_text_through_the_driver(tmp_path):
    """stages [tokenizer, pretrain] on data.pretrain: the tokenizer trains on the user's text, pretraining streams
    it through Ray Data (tokens_seen, drops per source and held-out perplexity in eval.json)."""
    import random

    rng = random.Random(0)
    words = "the river mill miller counts sacks of flour bread water salt and a to in is was".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 40))) + "." for _ in range(300)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + json.dumps({"text": ""}) + "\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "rayllama.driver", str(ROOT / "configs" / "pretrain.yaml"), f"run_dir={run_dir}",
         "stages=[tokenizer,pretrain]", f"data.pretrain=[{{path: {path}, format: text}}]", "data.heldout_fraction=0.1",
         "ray.include_dashboard=false", "tokenizer.vocab_size=400", "model.dim=32", "model.n_layers=1",
         "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64", "pretrain.steps=40", "pretrain.seq_len=63",
         "pretrain.batch_size=16", "pretrain.micro_batch_size=8", "pretrain.log_every=2", "scaling.num_workers=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    pre = json.loads((run_dir / "eval.json").read_text())["pretrain"]
    from rayllama.data.stream import is_heldout
    from rayllama.tokenizer import Tokenizer

    tok = Tokenizer(run_dir / "tokenizer" / "tokenizer.model")
    corpus_tokens = sum(len(tok.encode(d)) + 2 for d in docs if not is_heldout(d, 0.1))
    assert pre["tokens_seen"] > corpus_tokens and pre["heldout_perplexity"] > 1.0  # more than one epoch...
    assert pre["data_rows"] == 301 and pre["data_kept"] == 300 and pre["data_dropped_empty"] == 1  # ...counted once
    assert not (run_dir / "data" / "world_meta.json").exists() and "corpus.jsonl" in out
