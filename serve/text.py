"""From generated token ids to the answer text a client sees: decode, strip, cut at stop strings, stream deltas.

Rules (the same for plain and streamed responses, so the joined stream deltas equal the plain answer):
    text = decode(ids).strip()                  (decode drops eos; the template puts "answer </s>" after [/INST])
    cut at the earliest occurrence of any stop string (excluded), finish_reason "stop"
    completion tokens = the fewest leading ids whose decoded text reaches the end of that stop string
                        (what an engine that knew the stop strings would have generated), else all ids
Decoding is prefix-consistent for SentencePiece, except that a prefix may end inside a multi-byte character
(decoded as U+FFFD); such prefixes are skipped when computing deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" | "length"
    n_tokens: int  # completion tokens counted in usage
    token_ids: list[int]  # the ids the text comes from (up to n_tokens)


def _prefix_text(tok: Decoder, ids: Sequence[int], k: int) -> str:
    return tok.decode(list(ids[:k])).lstrip()


def finish_answer(tok: Decoder, ids: Sequence[int], engine_finish: str, stop: Sequence[str]) -> Answer:
    """The answer for one completion (see the module docstring for the rules)."""
    text = tok.decode(list(ids)).strip()
    cuts = [(text.find(s), s) for s in stop if s and s in text]
    if not cuts:
        return Answer(text, engine_finish, len(ids), list(ids))
    at, s = min(cuts)
    end = at + len(s)
    n = next(k for k in range(1, len(ids) + 1) if len(_prefix_text(tok, ids, k)) >= end)
    return Answer(text[:at], "stop", n, list(ids[:n]))


def stream_deltas(tok: Decoder, answer: Answer) -> list[str]:
    """Pieces of `answer.text`, one per token where the decoded prefix grows; "".join(them) == answer.text."""
    final, out, sent = answer.text, [], 0
    for k in range(1, len(answer.token_ids) + 1):
        if sent >= len(final):
            break
        prefix = _prefix_text(tok, answer.token_ids, k)
        if prefix.endswith("\ufffd"):  # inside a multi-byte character: wait for its last byte
            continue
        upto = min(len(prefix), len(final))
        if upto > sent:
            out.append(final[sent:upto])
            sent = upto
    if sent < len(final):
        out.append(final[sent:])
    return out
