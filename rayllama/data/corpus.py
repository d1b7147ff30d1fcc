"""The bundled real-text corpora: Shakespeare (pretraining) and chatterbot conversations (chat text).

The files live in ``rayllama/data/corpus/`` (xz-compressed, built by ``python -m rayllama.data.make_corpus``);
``ATTRIBUTION`` holds their sources and licences and must travel with anything derived from them.
"""

from __future__ import annotations

import functools
import json
import lzma
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
SHAKESPEARE_FILE = CORPUS_DIR / "shakespeare.txt.xz"
CHATTERBOT_FILE = CORPUS_DIR / "chatterbot_english.jsonl.xz"
DOC_SEPARATOR = "\f\n"  # same as make_corpus.DOC_SEPARATOR: a line holding only a form feed
ATTRIBUTION: str = (CORPUS_DIR / "ATTRIBUTION.txt").read_text(encoding="utf-8")


def _read_xz(path: Path) -> str:
    if not path.is_file():
        raise ValueError(
            f"bundled corpus {path} is missing; reinstall rayllama or run python -m rayllama.data.make_corpus"
        )
    return lzma.decompress(path.read_bytes()).decode("utf-8")


@functools.cache
def _documents() -> tuple[str, ...]:
    return tuple(_read_xz(SHAKESPEARE_FILE).split(DOC_SEPARATOR))


def shakespeare_documents() -> list[str]:
    """The 42 plays and poems, one string per work, each starting with its title line (e.g. "THE TEMPEST")."""
    return list(_documents())


def passages(document: str, max_chars: int = 2000) -> list[str]:
    """Cut a document into passages of whole paragraphs (blank-line separated), each <= max_chars if it can be.

    Rule: paragraphs are appended to the current passage while it stays within max_chars; a paragraph longer
    than max_chars becomes a passage of its own. Joining the passages with "\\n\\n" gives the document back
    (modulo its trailing newline).
    """
    if max_chars < 1:
        raise ValueError(f"max_chars {max_chars} must be positive; use e.g. 2000")
    out: list[str] = []
    current = ""
    for para in re.split(r"\n\n+", document.strip("\n")):
        if current and len(current) + 2 + len(para) > max_chars:
            out.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def corpus_split(
    heldout_fraction: float = 0.05, seed: int = 0, *, max_chars: int = 2000
) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of the Shakespeare corpus at passage level.

    Every document is cut into passages (``passages``); a ``random.Random(seed)`` permutation picks
    ``round(heldout_fraction * n)`` of the n passages (clamped to [1, n-1]) as held-out. Both lists keep corpus
    order, are disjoint as positions, and together hold every passage once.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction {heldout_fraction} must be in (0, 1); use e.g. 0.05")
    items = [p for doc in _documents() for p in passages(doc, max_chars)]
    n_held = min(max(1, round(heldout_fraction * len(items))), len(items) - 1)
    held = set(random.Random(seed).sample(range(len(items)), n_held))
    train = [p for i, p in enumerate(items) if i not in held]
    heldout = [p for i, p in enumerate(items) if i in held]
    return train, heldout


@functools.cache
def _dialogs() -> tuple[str, ...]:
    return tuple(line for line in _read_xz(CHATTERBOT_FILE).splitlines() if line)


def chat_dialogs() -> list[list[dict[str, str]]]:
    """The chatterbot English conversations: lists of {"role": "user"|"assistant", "content"}, user first,
    assistant last (about 2,000 dialogues, most of one exchange)."""
    return [json.loads(line)["messages"] for line in _dialogs()]


def tokenizer_training_texts() -> list[str]:
    """Text to train the pipeline's tokenizer on: every Shakespeare document plus every chat message."""
    chat = [m["content"] for dialog in chat_dialogs() for m in dialog]
    return shakespeare_documents() + chat


def write_pretrain_jsonl(path: str | os.PathLike, texts: Iterable[str]) -> Path:
    """Write ``{"text": ...}`` lines (the pretrain format) atomically: a temp file, then rename. Returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for text in texts:
                if not isinstance(text, str):
                    raise ValueError(
                        f"pretrain text for {path} is {type(text).__name__}, not str; pass strings"
                    )
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
