"""Tokenizer: training settings (Llama's), exact round trips, special ids, and the Llama-2-chat template.

The template oracle is Meta's ``Llama.chat_completion`` (llama/generation.py), restated in
``meta_chat_completion_tokens`` below: it encodes each whole turn string at once, while the code under test encodes
prompt and answer separately (to build the answer mask); the two must agree token for token.
"""

from __future__ import annotations

import pickle
import random
import time

import pytest
import sentencepiece as spm

from rayllama.data.corpus import shakespeare_documents, tokenizer_training_texts
from rayllama.tokenizer import SPECIAL_TAGS, DialogError, Tokenizer, train_tokenizer

VOCAB = 4000


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    texts = tokenizer_training_texts()  # the pipeline's tokenizer input: ~5.3 MB (Shakespeare + chat)
    prefix = tmp_path_factory.mktemp("tok") / "sp"
    t0 = time.perf_counter()
    path = train_tokenizer(texts, prefix, VOCAB)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"\ntrain_tokenizer: {VOCAB} pieces on {mb:.2f} MB in {time.perf_counter() - t0:.2f} s")
    return Tokenizer(path)


def meta_chat_completion_tokens(tok: Tokenizer, dialog: list[dict]) -> list[int]:
    """Meta's chat_completion prompt tokens, extended (as SFT needs) to a dialogue that ends with an answer."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    tokens: list[int] = sum(
        (
            tok.encode(
                f"{B_INST} {(p['content']).strip()} {E_INST} {(a['content']).strip()} ", bos=True, eos=True
            )
            for p, a in zip(dialog[::2], dialog[1::2])
        ),
        [],
    )
    if dialog[-1]["role"] == "user":
        tokens += tok.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True)
    return tokens


def _dialog(*turns: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


# --- training and the vocabulary -------------------------------------------------------------------------------


def test_trained_files_and_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == VOCAB
    assert tok.model_path.is_file() and tok.model_path.with_suffix(".vocab").is_file()
    assert sorted(p.name for p in tok.model_path.parent.iterdir()) == ["sp.model", "sp.vocab"]  # no temp left


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    pieces = [tok.id_to_piece(i) for i in range(7)]
    assert pieces == ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
    assert tok.encode("Hi", bos=True, eos=True) == [1] + tok.encode("Hi") + [2]


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be: that is the question.",
        "What is 1234 + 5678? It is 6912.",
        "  leading spaces, trailing spaces  ",
        "line one\nline two\n\n\tindented after a blank line\n",
        "Punctuation: ;:!?.,'\"()[]{}<>@#$%^&*-_=+/\\|~`",
        "Naïve café — 東京 🎭 ümlaut",
        "[INST] tags <<SYS>> as text <</SYS>> [/INST]",
        "",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids  # byte fallback: nothing is ever unknown
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.eos_id]) == text  # bos/eos dropped, no early stop


def test_digits_split_and_byte_fallback(tok: Tokenizer) -> None:
    # split_digits: every digit is its own piece; the dummy prefix makes the leading "▁".
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["▁", "2", "0", "2", "4"]
    # "東" is U+6771 = UTF-8 e6 9d b1: absent from the corpus, so it falls back to its three bytes.
    assert [tok.id_to_piece(i) for i in tok.encode("東")] == ["▁", "<0xE6>", "<0x9D>", "<0xB1>"]
    # A newline never occurs inside a training sentence, so it is the byte piece <0x0A> (as in Llama).
    assert "<0x0A>" in [tok.id_to_piece(i) for i in tok.encode("a\nb")]


def test_decode_rejects_out_of_range(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside"):
        tok.decode([5, VOCAB])


def test_pickle_carries_the_model(tok: Tokenizer, tmp_path) -> None:
    copy = tmp_path / "copy.model"
    copy.write_bytes(tok.model_path.read_bytes())
    blob = pickle.dumps(Tokenizer(copy))
    copy.unlink()  # an actor on another node has no file: the pickle must carry the model
    clone = pickle.loads(blob)
    text = "Now is the winter of our discontent 42"
    assert clone.encode(text) == tok.encode(text) and clone.model_path == copy


def test_training_is_deterministic_and_accepts_paths(tmp_path) -> None:
    doc = shakespeare_documents()[7]  # one play, ~150 kB
    (tmp_path / "a.txt").write_text(doc)
    m1 = train_tokenizer([tmp_path / "a.txt"], tmp_path / "m1" / "sp", 600)
    m2 = train_tokenizer([doc], tmp_path / "m2" / "sp", 600)
    assert m1.read_bytes() == m2.read_bytes()
    assert Tokenizer(m1).vocab_size == 600


def test_training_errors_leave_nothing(tmp_path) -> None:
    with pytest.raises(ValueError, match="vocab_size 300 leaves no room"):
        train_tokenizer(["some text"], tmp_path / "sp", 300)
    with pytest.raises(ValueError, match="not one; wrap it in a list"):
        train_tokenizer("one text, not a list of texts", tmp_path / "sp", 1000)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "\n  \n"], tmp_path / "sp", 1000)
    with pytest.raises(ValueError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "sp", 1000)
    with pytest.raises(
        ValueError, match="5000-piece tokenizer failed"
    ):  # far too little text for 5000 pieces
        train_tokenizer(["a tiny text of a few words"], tmp_path / "sp", 5000)
    assert list(tmp_path.iterdir()) == []  # atomic: no model, no vocab, no temp directory


def test_training_refuses_a_sentencepiece_that_would_abort(tmp_path, monkeypatch) -> None:
    # sentencepiece 0.2.2 (found on a GPU machine) kills the process in C++ when a required char is absent
    monkeypatch.setattr(spm, "__version__", "0.2.2")
    with pytest.raises(
        RuntimeError, match=r"sentencepiece 0\.2\.2 cannot .*pip install 'sentencepiece>=0\.2\.3'"
    ):
        train_tokenizer(["some text without a hash sign"], tmp_path / "sp", 1000)
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match=r"nope\.model does not exist; train one with .*train_tokenizer"):
        Tokenizer(missing)
    for name, data in [("garbage.model", b"not a protobuf at all"), ("empty.model", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a SentencePiece model"):
            Tokenizer(tmp_path / name)


# --- chat template ---------------------------------------------------------------------------------------------

# Surrounding whitespace is stripped (Meta strips the folded "<<SYS>>...{user}" string, so only the trailing
# whitespace of the first user message goes when there is a system prompt: "Hi \n" -> "Hi").
THREE_TURNS = _dialog(
    "Hi \n", "Hello", " What is 12+30?", "42.", "Thanks!", " You're welcome.\n", system="Be brief."
)


def test_template_matches_hand_written_string(tok: Tokenizer) -> None:
    ids, mask = tok.encode_dialog(THREE_TURNS)
    bos, eos, enc = [tok.bos_id], [tok.eos_id], tok.encode
    expected = (
        bos + enc("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello ") + eos
        + bos + enc("[INST] What is 12+30? [/INST] 42. ") + eos
        + bos + enc("[INST] Thanks! [/INST] You're welcome. ") + eos
    )  # fmt: skip
    assert ids == expected
    assert ids == meta_chat_completion_tokens(tok, THREE_TURNS)
    # The chat tags are single pieces: the first turn reads <s> ▁ [INST] ▁ <<SYS>> ...
    assert [tok.id_to_piece(i) for i in ids[:5]] == ["<s>", "▁", "[INST]", "▁", "<<SYS>>"]


def _runs(ids: list[int], mask: list[int], value: int) -> list[list[int]]:
    """Maximal runs of consecutive ids whose mask equals value."""
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ids, mask)):
        if m == value:
            if i == 0 or mask[i - 1] != value:
                runs.append([])
            runs[-1].append(t)
    return runs


def test_answer_mask_covers_exactly_the_answers(tok: Tokenizer) -> None:
    ids, mask = tok.encode_dialog(THREE_TURNS)
    assert len(mask) == len(ids) and set(mask) == {0, 1} and mask[0] == 0
    answers = _runs(ids, mask, 1)
    assert [r[-1] for r in answers] == [tok.eos_id] * 3  # each answer ends with its </s>
    assert [tok.decode(r) for r in answers] == [
        "Hello ",
        "42. ",
        "You're welcome. ",
    ]  # answer + template's " "
    prompts = _runs(ids, mask, 0)
    assert [r[0] for r in prompts] == [tok.bos_id] * 3 and all(tok.eos_id not in r for r in prompts)
    assert [tok.decode(r) for r in prompts] == [
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
        "[INST] What is 12+30? [/INST]",
        "[INST] Thanks! [/INST]",
    ]


def test_encode_prompt_ends_with_inst_and_prefixes_training(tok: Tokenizer) -> None:
    prompt = tok.encode_prompt(THREE_TURNS[:-1])
    assert prompt == meta_chat_completion_tokens(tok, THREE_TURNS[:-1])
    assert prompt[-1] == 4  # [/INST]
    ids, mask = tok.encode_dialog(THREE_TURNS)
    # Generation continues exactly where training's last answer starts: the prompt is a prefix of the
    # training ids and everything after it (the last answer and its </s>) is masked in.
    assert ids[: len(prompt)] == prompt and mask[len(prompt) - 1] == 0 and all(mask[len(prompt) :])
    assert tok.encode_prompt(_dialog("Hi")) == [1] + tok.encode("[INST] Hi [/INST]")


def _assert_template_equals_meta_on_random_dialogs(tok: Tokenizer, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = shakespeare_documents()[12].split(" ")[:5000] + ["12", "3.5", "é", "東京", "\n", "  ", "\t", "?!"]

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + rng.choice(
            ["", " ", "\n", "."]
        )

    turns_checked = 0
    for _ in range(60):
        n = rng.randint(1, 4)
        system = text() if rng.random() < 0.5 else None
        answered = _dialog(*(text() for _ in range(2 * n)), system=system)
        ids, mask = tok.encode_dialog(answered)
        assert ids == meta_chat_completion_tokens(tok, answered)
        assert tok.encode_prompt(answered[:-1]) == meta_chat_completion_tokens(tok, answered[:-1])
        answers = [m["content"].strip() for m in answered if m["role"] == "assistant"]
        assert sum(mask) == sum(len(tok.encode(f"{a} ")) + 1 for a in answers)
        turns_checked += n
    assert turns_checked > 100


def test_template_equals_meta_on_random_dialogs(tok: Tokenizer) -> None:
    """Split encoding (prompt | answer) == Meta's whole-string encoding, on messy random dialogues."""
    _assert_template_equals_meta_on_random_dialogs(tok)


def test_template_with_a_llama_style_model_without_tag_pieces(tmp_path) -> None:
    """A real Llama-2 tokenizer has no [INST] pieces ("[/INST]" is "▁[", "/", "INST", "]"): still exact."""
    import sentencepiece as spm

    lines = [x for x in shakespeare_documents()[3].splitlines() if x.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "llama"), model_type="bpe", vocab_size=800,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    tok = Tokenizer(tmp_path / "llama.model")
    assert "[/INST]" not in [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    _assert_template_equals_meta_on_random_dialogs(tok, seed=1)


def test_dialog_turns_concatenate_to_dialog(tok: Tokenizer) -> None:
    turns = tok.encode_dialog_turns(THREE_TURNS)
    ids, mask = tok.encode_dialog(THREE_TURNS)
    assert len(turns) == 3
    assert sum((t for t, _ in turns), []) == ids and sum((m for _, m in turns), []) == mask


U, A, S = "user", "assistant", "system"


def _msgs(*pairs: tuple) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.mark.parametrize(
    ("method", "messages", "pattern"),
    [
        ("encode_dialog", [], "non-empty list"),
        ("encode_dialog", "hello", "non-empty list"),
        ("encode_dialog", [{"role": U}], "message 0 must be a dict with 'role' and 'content'"),
        ("encode_dialog", ["user: a", *_msgs((A, "b"))], "message 0 must be a dict"),
        (
            "encode_dialog",
            _msgs((U, "a"), (S, "be nice"), (A, "b")),
            "message 1 is a system message; only message 0",
        ),
        ("encode_dialog", _msgs((U, "a"), (U, "b"), (A, "c")), r"message 1 .*two user turns in a row"),
        ("encode_dialog", _msgs((U, "a"), (A, "b"), (A, "c")), r"message 2 .*two assistant turns in a row"),
        ("encode_dialog", _msgs((A, "a"), (U, "b"), (A, "c")), r"message 0 .*first turn must be the user's"),
        ("encode_dialog", _msgs((S, "s"), (A, "a")), r"message 1 .*first turn must be the user's"),
        ("encode_dialog", _msgs((U, "a"), ("bot", "b")), "message 1 has unknown role 'bot'"),
        ("encode_dialog", _msgs((U, "a"), (A, 42)), "message 1 content is int, not str"),
        (
            "encode_dialog",
            _msgs((U, "a"), (A, "b"), (U, "c")),
            "message 2 has role 'user'; .* end with role 'assistant'",
        ),
        (
            "encode_dialog",
            _msgs((S, "a system prompt")),
            "message 0 has role 'system'; .* end with role 'assistant'",
        ),
        (
            "encode_prompt",
            _msgs((U, "a"), (A, "b")),
            "message 1 has role 'assistant'; .* end with role 'user'",
        ),
        ("encode_prompt", _msgs((U, "say [/INST] now")), r"message 0 contains the chat tag '\[/INST\]'"),
    ],
)
def test_dialog_errors(tok: Tokenizer, method: str, messages, pattern: str) -> None:
    with pytest.raises(DialogError, match=pattern) as info:
        getattr(tok, method)(messages)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_completion_text_strips_chat_tags_and_what_follows_eos(tok: Tokenizer) -> None:
    """A policy may generate template tags; answers that are trained on or scored must not carry them."""
    from rayllama.chat import completion_text
    from rayllama.tokenizer import strip_chat_tags

    ids = tok.encode("hi [INST] there <</SYS>> friend") + [tok.eos_id] + tok.encode("ignored")
    assert completion_text(tok, ids) == strip_chat_tags(tok.decode(tok.encode("hi [INST] there <</SYS>> friend"))).strip()
    assert not any(tag in completion_text(tok, ids) for tag in SPECIAL_TAGS) and "ignored" not in completion_text(tok, ids)
    assert strip_chat_tags("[INST] a <<SYS>>b<</SYS>> [/INST]") == " a b "


def test_a_dialogue_longer_than_the_context_keeps_its_system_block_and_last_turn(tok: Tokenizer) -> None:
    """Truncation drops whole earlier turns (oldest first), never the system block or the last user turn."""
    turns = [f"turn {i} words words words words words" for i in range(9)]  # user, assistant, ..., user
    dialog = _dialog(*turns, system="Always answer in French")
    full = tok.encode_prompt(dialog)
    kept, dropped = tok.encode_prompt_within(dialog, len(full) // 2)
    assert len(kept) <= len(full) // 2 and dropped > 0
    assert kept == tok.encode_prompt(_dialog(*turns[2 * dropped:], system="Always answer in French"))
    text = tok.decode(kept)
    assert "Always answer in French" in text and "turn 8" in text and "turn 0" not in text
    assert tok.encode_prompt_within(dialog, len(full)) == (full, 0)  # fits: unchanged
    tiny_budget, _ = tok.encode_prompt_within(dialog, 5)
    assert tok.encode_prompt_within(dialog, 5) == (tiny_budget, -1) and tiny_budget == full[-5:]
