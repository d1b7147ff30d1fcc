"""From generated token ids to the answer text a client sees: decode, strip, cut at stop strings, stream deltas.

Rules (the same for plain and streamed responses, so the joined stream deltas equal the plain answer):
    text = decode(ids).strip()                  (chat: decode drops eos; the template puts "answer </s>" after
                                                 [/INST]; /v1/completions keeps the text as decoded: strip=False)
    cut at the earliest occurrence of any stop string (excluded), finish_reason "stop"
    completion tokens = the fewest leading ids whose decoded text reaches the end of that stop string
                        (the engine checks stop strings every step, so that is every id it returns)
Decoding is prefix-consistent for SentencePiece, except that a prefix may end inside a multi-byte character
(decoded as U+FFFD); such prefixes are held back when streaming.
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


def _prefix_text(tok: Decoder, ids: Sequence[int], k: int, strip: bool) -> str:
    text = tok.decode(list(ids[:k]))
    return text.lstrip() if strip else text


def finish_answer(tok: Decoder, ids: Sequence[int], engine_finish: str, stop: Sequence[str],
                  strip: bool = True) -> Answer:
    """The answer for one completion (see the module docstring for the rules)."""
    text = tok.decode(list(ids))
    text = text.strip() if strip else text
    cuts = [(text.find(s), s) for s in stop if s and s in text]
    if not cuts:
        return Answer(text, engine_finish, len(ids), list(ids))
    at, s = min(cuts)
    end = at + len(s)
    n = next(k for k in range(1, len(ids) + 1) if len(_prefix_text(tok, ids, k, strip)) >= end)
    return Answer(text[:at], "stop", n, list(ids[:n]))


class TextStream:
    """The text deltas of one choice as its tokens arrive: "".join(every push(), finish()) == the answer's text.

    Held back until safe: a prefix ending inside a multi-byte character, the last len(longest stop) - 1
    characters (they may begin a stop string), and trailing whitespace when stripping (the answer is stripped).
    """

    def __init__(self, tok: Decoder, stop: Sequence[str], strip: bool = True) -> None:
        self.tok, self.stop, self.strip = tok, list(stop), strip
        self.ids: list[int] = []
        self.sent = ""
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def push(self, token: int) -> str:
        """Add one generated token; return the text that can be sent now ("" if none)."""
        self.ids.append(token)
        text = _prefix_text(self.tok, self.ids, len(self.ids), self.strip)
        if text.endswith("\ufffd"):
            return ""
        if any(s in text for s in self.stop):  # the engine finishes this row now; finish() sends the rest
            return ""
        safe = text[:len(text) - self._hold] if self._hold else text
        if self.strip:
            safe = safe.rstrip()
        return self._advance(safe)

    def finish(self, engine_finish: str) -> tuple[str, Answer]:
        """The last delta and the whole answer, once the engine finished this choice."""
        answer = finish_answer(self.tok, self.ids, engine_finish, self.stop, self.strip)
        return self._advance(answer.text), answer

    def _advance(self, safe: str) -> str:
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta
