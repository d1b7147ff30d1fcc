"""rayllama.checkpoint: round trips, transformers export/import as the oracle, errors, atomic replacement."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from rayllama import checkpoint
from rayllama.checkpoint import (
    CheckpointError,
    config_from_hf,
    hf_config_dict,
    is_complete,
    load_model,
    load_train_state,
    save_model,
    weights_fingerprint,
)
from rayllama.model import ModelConfig, ScalarHeadModel, Transformer
from rayllama.tokenizer import train_tokenizer

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=53, ffn_dim=64, max_seq_len=32)


def make(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def tokens(b: int = 2, t: int = 7) -> torch.Tensor:
    return torch.randint(1, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(3))


def leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_weights_meta_train_state_tokenizer(tmp_path) -> None:
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(tokens()).sum().backward()
    opt.step()
    tok = train_tokenizer([f"line {i} of a tiny corpus for the tokenizer" for i in range(50)], tmp_path / "spm",
                          vocab_size=380)
    train_state = {"optimizer": opt.state_dict(), "step": 7, "rng": torch.get_rng_state()}
    with pytest.raises(ValueError, match="differs"):
        save_model(tmp_path / "ckpt", model, ModelConfig())
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DistributedDataParallel looks like: save_model unwraps it
    out = save_model(tmp_path / "ckpt", wrapped, CFG, tokenizer_model=tok, meta={"step": 7, "stage": "sft"},
                     train_state=train_state)
    assert is_complete(out)
    assert sorted(p.name for p in out.iterdir()) == [  # the HF tokenizer files: tests/test_vllm_hf_export.py
        "config.json", "generation_config.json", "model.safetensors", "rayllama.json", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json", "train_state.pt"]
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    loaded, cfg, meta = load_model(out)
    assert isinstance(loaded, Transformer) and cfg == CFG
    assert meta == {"kind": "causal", "step": 7, "stage": "sft"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert all(p.requires_grad for p in loaded.parameters())  # trainable after load
    state = load_train_state(out)
    assert state["step"] == 7 and torch.equal(state["rng"], train_state["rng"])
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])  # resumable
    assert leftovers(tmp_path) == []


def test_scalar_round_trip_and_config(tmp_path) -> None:
    rm = ScalarHeadModel.from_transformer(make(), score_std=0.1)
    out = save_model(tmp_path / "rm", rm, CFG, meta={"step": 3})
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["num_labels"] == 1
    assert hf["pad_token_id"] == 0 and config_from_hf(hf) == CFG
    loaded, _, meta = load_model(out)
    assert isinstance(loaded, ScalarHeadModel) and meta["kind"] == "scalar"
    assert load_train_state(out) is None
    x, mask = tokens(), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(loaded.last_token_score(x, mask), rm.last_token_score(x, mask))


def test_export_loads_in_transformers_with_equal_logits(tmp_path) -> None:
    import transformers

    model = make()
    out = save_model(tmp_path / "export", model, CFG)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)

    rm = ScalarHeadModel.from_transformer(model, score_std=0.1).eval()
    out = save_model(tmp_path / "export_rm", rm, CFG)
    hf_rm = transformers.LlamaForSequenceClassification.from_pretrained(out, attn_implementation="eager")
    hf_rm.eval()
    mask = torch.ones_like(x)
    with torch.no_grad():
        torch.testing.assert_close(hf_rm(x).logits[:, 0], rm.last_token_score(x, mask), atol=1e-4, rtol=0)


def test_import_from_transformers_save_pretrained(tmp_path) -> None:
    import transformers

    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(CFG).items()
                                         if k not in ("architectures", "torch_dtype", "dtype")},
                                      attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, cfg, meta = load_model(tmp_path / "hf")
    assert cfg == CFG and meta == {"kind": "causal"}
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_import_pytorch_bin_and_sharded_index(tmp_path) -> None:
    model = make()
    src = save_model(tmp_path / "src", model, CFG)
    state = model.state_dict()
    # pytorch_model.bin
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    torch.save(state, d / "pytorch_model.bin")
    # two safetensors shards + index
    from safetensors.torch import save_file
    s = tmp_path / "sharded"
    s.mkdir()
    (s / "config.json").write_text((src / "config.json").read_text())
    keys = list(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, s / name)
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (s / "model.safetensors.index.json").write_text(json.dumps(index))
    for path in (d, s):
        loaded, _, _ = load_model(path)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items()), path


def test_weights_fingerprint_follows_the_weights_not_the_path(tmp_path) -> None:
    """Copies of one checkpoint share the fingerprint; a model trained again (other weights) at the same path does
    not; a sharded checkpoint reads every shard."""
    import shutil

    a = save_model(tmp_path / "a", make(0), CFG)
    shutil.copytree(a, tmp_path / "copy")
    fp = weights_fingerprint(a)
    assert len(fp) == 12 and weights_fingerprint(tmp_path / "copy") == fp
    save_model(a, make(1), CFG)  # retrained in place
    assert weights_fingerprint(a) != fp
    state = make(2).state_dict()
    from safetensors.torch import save_file
    s = tmp_path / "sharded"
    s.mkdir()
    keys = list(state)
    for name, ks in {"a.safetensors": keys[:3], "b.safetensors": keys[3:]}.items():
        save_file({k: state[k].contiguous() for k in ks}, s / name)
    (s / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "a.safetensors" if i < 3 else
                                                                               "b.safetensors"
                                                                               for i, k in enumerate(keys)}}))
    before = weights_fingerprint(s)
    save_file({k: torch.zeros_like(state[k]) for k in keys[3:]}, s / "b.safetensors")  # the second shard changed
    assert weights_fingerprint(s) != before
    with pytest.raises(CheckpointError, match="does not exist"):
        weights_fingerprint(tmp_path / "missing")


def test_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    out = save_model(tmp_path / "c", make(), CFG)
    weights = out / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[:-100])  # truncated
    assert not is_complete(out)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(out)
    weights.write_bytes(data[:5])  # not even a header
    with pytest.raises(CheckpointError, match=str(weights)):
        load_model(out)

    weights.write_bytes(data)
    hf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**hf, "intermediate_size": 48}))  # wrong shapes
    assert is_complete(out)  # files intact; the mismatch shows when the weights meet the config
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight has shape"):
        load_model(out)

    (out / "config.json").write_text(json.dumps(hf))
    weights.unlink()
    assert not is_complete(out)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(out)
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(out)
    with pytest.raises(CheckpointError, match="rope_type"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(CheckpointError, match="n_kv_heads"):
        config_from_hf({**hf, "num_key_value_heads": 3})


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where: str) -> None:
    """An exception while the new files are written, or between moving the old one aside and renaming the
    new one in, leaves the previous checkpoint complete at the target and no temp dirs behind."""
    old = make(seed=0)
    target = save_model(tmp_path / "ckpt", old, CFG, meta={"step": 1})

    class Boom(RuntimeError):
        pass

    if where == "writing":
        def boom(*args, **kwargs):
            raise Boom("killed while writing train_state.pt")
        monkeypatch.setattr(checkpoint.torch, "save", boom)
    else:
        real_rename = os.rename

        def boom(src, dst):
            if str(src).endswith(f".tmp-{os.getpid()}"):
                raise Boom("killed between the two renames")
            real_rename(src, dst)
        monkeypatch.setattr(checkpoint.os, "rename", boom)
    with pytest.raises(Boom):
        save_model(target, make(seed=1), CFG, meta={"step": 2}, train_state={"x": 1})
    monkeypatch.undo()
    loaded, _, meta = load_model(target)
    assert meta["step"] == 1
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in old.state_dict().items())
    assert leftovers(tmp_path) == []


def test_kill_between_renames_loads_the_aside_copy(tmp_path) -> None:
    """A SIGKILL after `target -> .target.old-PID` but before `tmp -> target`: the loaders use the aside
    copy; the next save replaces it and cleans up."""
    old = make(seed=0)
    target = save_model(tmp_path / "ckpt", old, CFG, meta={"step": 1})
    dead_pid = 2**22 + 12345  # above Linux's pid_max default range, so not a live process
    os.rename(target, tmp_path / f".ckpt.old-{dead_pid}")
    (tmp_path / f".ckpt.tmp-{dead_pid}").mkdir()  # the dead writer's half-written new checkpoint
    assert is_complete(target)
    loaded, _, meta = load_model(target)
    assert meta["step"] == 1 and torch.equal(loaded.lm_head.weight, old.lm_head.weight)
    save_model(target, make(seed=1), CFG, meta={"step": 2})
    assert load_model(target)[2]["step"] == 2
    assert leftovers(tmp_path) == []
