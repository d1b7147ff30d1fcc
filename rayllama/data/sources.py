"""The user's data: files in common formats turned into the records the stages consume (rayllama.data.formats).

A source (config `data.<kind>[i]`: path, format, split, weight, columns, kind) is a file or a folder of files:
JSONL / JSON (a list of objects, or JSON lines), optionally gzip-compressed; parquet; Arrow (IPC file or
stream, as `datasets.save_to_disk` writes); plain text (one document per non-empty line, as `datasets`' text
loader). In a folder, the files whose name starts with `split` are read (train.jsonl.gz,
train-00000-of-00002.parquet), or every data file below a sub-folder named `split`. Paths may be URIs
(s3://, gs://): every read goes through rayllama.storage.

Formats (the row fields; `columns` maps a field to the file's column name):

    text           {"text": str}                                      -> pretraining text
    messages       {"messages": [{"role", "content"}, ...]}           HF / OpenAI chat; ShareGPT's {"from",
                                                                      "value"} and human/gpt roles too
    hh-rlhf        {"chosen": str, "rejected": str}                   Anthropic HH-RLHF transcripts of
                                                                      "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns
    preference     {"prompt", "chosen", "rejected"} (+ optional "rating" | "margin", "kind")
                                                                      TRL's format: strings or message lists;
                                                                      without "prompt", the messages both sides
                                                                      share are the prompt (TRL's implicit prompt)
    ultrafeedback  {"instruction": str, "completions": [{"response": str, "overall_score": num}, ...]}
                                                                      the best-scored completion against a seeded
                                                                      random other one; the score gap gives a
                                                                      rating level (ULTRAFEEDBACK_LEVELS)
    prompts        {"prompt": str | messages} (+ optional "is_safety", "system")

What each data kind accepts (FORMATS_FOR): a pair also gives an SFT dialogue (the prompt and the chosen answer)
and a prompt; a dialogue gives a prompt (its turns up to the last user message).

Honest data handling: a row that cannot be used is dropped and counted per source and reason (`malformed`,
`empty`, `tie` (chosen == rejected, or equal scores), and later `too_long` when tokenized); `check_drops`
stops a stage whose source dropped more than `data.max_drop_fraction` of its rows, with one line naming it. A
column the file does not have at all is a config mistake: one line naming the source and the column.
Pairs without a rating or margin train with margin 0 (LLaMA 2's rule for unrated pairs).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rayllama import storage
from rayllama.data.formats import RATINGS, PreferenceRecord, PretrainRecord, PromptRecord, SFTRecord
from rayllama.tokenizer import SPECIAL_TAGS

FORMATS = ("text", "messages", "hh-rlhf", "preference", "ultrafeedback", "prompts")
FORMATS_FOR = {
    "pretrain": ("text",),
    "sft": ("messages", "hh-rlhf", "preference", "ultrafeedback"),
    "preference": ("hh-rlhf", "preference", "ultrafeedback"),
    "prompts": ("prompts", "messages", "hh-rlhf", "preference", "ultrafeedback"),
    "eval_prompts": ("prompts", "messages", "hh-rlhf", "preference", "ultrafeedback"),
}
# our field -> its default column; the fields a row must have come first, then the optional ones
COLUMNS = {
    "text": {"text": "text"},
    "messages": {"messages": "messages"},
    "hh-rlhf": {"chosen": "chosen", "rejected": "rejected"},
    "preference": {"chosen": "chosen", "rejected": "rejected", "prompt": "prompt", "rating": "rating",
                   "margin": "margin", "kind": "kind"},
    "ultrafeedback": {"prompt": "instruction", "completions": "completions", "response": "response",
                      "score": "overall_score"},
    "prompts": {"prompt": "prompt", "is_safety": "is_safety", "system": "system"},
}
REQUIRED = {"text": ("text",), "messages": ("messages",), "hh-rlhf": ("chosen", "rejected"),
            "preference": ("chosen", "rejected"), "ultrafeedback": ("prompt", "completions"), "prompts": ("prompt",)}
# UltraFeedback's overall_score (1-10) gap between the chosen and the rejected completion -> LLaMA 2's levels
ULTRAFEEDBACK_LEVELS = ((3.0, "significantly_better"), (2.0, "better"), (1.0, "slightly_better"),
                        (0.0, "negligibly_better"))
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".txt")
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class SourceError(ValueError):
    """A data source that cannot be read as configured; one line naming the source and the fix."""


class _Drop(Exception):
    """A row that cannot be used: reason (malformed | empty | tie) and what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class SourceStats:
    """What one source gave: its rows, the records kept, and the rows dropped by reason (with a first example)."""

    name: str  # "data.sft[0] (path)"
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, detail: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.kept -= n if reason == "too_long" else 0
        self.examples.setdefault(reason, detail)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped)}


# ----------------------------------------------------------------------------------------------- files


def source_files(path: str, split: str, name: str | None = None) -> list[str]:
    """The data files of a source: the file itself, or in a folder the split's files (see module docstring).
    Errors start with `name` (e.g. "data.sft[0] (path)"), else the path."""
    name = name or path
    if storage.is_file(path):
        return [path]
    if not storage.is_dir(path):
        raise SourceError(f"{name}: no such file or folder; check the path")
    files = [f for f in storage.list_files(path) if _suffix(f.partition("?")[0]) in DATA_SUFFIXES]
    rel = {f: storage.relative(f, path) for f in files}
    named = [f for f in files if rel[f].rsplit("/", 1)[-1].startswith(split)]
    under = [f for f in files if split in rel[f].split("/")[:-1]]
    chosen = named or under
    if not chosen:
        raise SourceError(f"{name}: no data file of split '{split}' ({', '.join(DATA_SUFFIXES)}, optionally .gz, "
                          f"named {split}* or under a {split}/ folder); set split or point path at a file")
    return chosen


def _suffix(path: str) -> str:
    name = path.partition("?")[0].rsplit("/", 1)[-1].lower()
    name = name[:-3] if name.endswith(".gz") else name
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def splittable(path: str) -> bool:
    """Whether a file can be read in byte ranges (iter_file_rows' byte_range): uncompressed JSON lines or text."""
    return _suffix(path) in (".jsonl", ".txt") and not path.partition("?")[0].lower().endswith(".gz")


def file_size(path: str) -> int:
    fs, p = storage.filesystem(path)
    return fs.get_file_info(p).size


def _lines_in_range(f, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary file that start at a byte offset in [start, end): consecutive ranges read every line
    once (a line that starts before `start` belongs to the range before)."""
    pos = max(start - 1, 0)  # from the byte before start: a line starting at start follows a newline there
    f.seek(pos)
    skip, rest = start > 0, b""
    while True:
        data = f.read(chunk)
        buf, at = rest + data, 0
        while (nl := buf.find(b"\n", at)) >= 0:
            if not skip:
                if pos >= end:
                    return
                yield buf[at:nl + 1]
            skip = False
            pos += nl + 1 - at
            at = nl + 1
        rest = buf[at:]
        if not data:
            if rest and not skip and pos < end:
                yield rest
            return


def iter_file_rows(path: str, byte_range: tuple[int, int] | None = None) -> Iterator[dict | None]:
    """The rows of one data file as dicts; a JSON line that is not an object yields None (a malformed row).
    byte_range (start, end): only the lines starting in it, for a `splittable` file."""
    suffix = _suffix(path)
    if byte_range is not None:
        if not splittable(path):
            raise SourceError(f"{path}: only uncompressed .jsonl and .txt files are read in byte ranges")
        with storage.open_input(path) as raw:
            lines = (raw_line.decode("utf-8", errors="replace").replace("\r\n", "\n")  # as universal newlines
                     for raw_line in _lines_in_range(raw, *byte_range))
            yield from _rows_of_lines(lines, suffix)
        return
    if suffix not in DATA_SUFFIXES:
        raise SourceError(f"{path}: unknown file type '{suffix}'; use one of {', '.join(DATA_SUFFIXES)} (or .gz)")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        with storage.open_input(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        return
    if suffix == ".arrow":
        import pyarrow as pa

        with storage.open_input(path) as f:
            try:
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                f.seek(0)
                batches = pa.ipc.open_stream(f)
            for batch in batches:
                yield from batch.to_pylist()
        return
    with storage.open_input(path) as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.partition("?")[0].lower().endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
        if suffix == ".json" and _peek_char(text) == "[":
            for obj in _json_array_items(text):
                yield obj if isinstance(obj, dict) else None
            return
        yield from _rows_of_lines(text, suffix)


def _rows_of_lines(lines: Iterable[str], suffix: str) -> Iterator[dict | None]:
    """Rows of a line format: .txt -> {"text": line}; JSON lines -> the object (None for a malformed line or a
    non-object); blank lines skipped."""
    for line in lines:
        if not line.strip():
            continue
        if suffix == ".txt":
            yield {"text": line.rstrip("\n")}
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            yield None
            continue
        yield obj if isinstance(obj, dict) else None


def _json_array_items(text: io.TextIOBase, chunk: int = 1 << 20) -> Iterator[Any]:
    """The items of a top-level JSON array, parsed one at a time as the text streams in (never the whole file in
    memory: the buffer holds at most the item being read and one chunk). Malformed JSON is a ValueError (the
    caller names the file)."""
    decoder = json.JSONDecoder()
    buf, pos, state = "", 0, "open"  # open -> first (an item or ']') -> item -> sep (',' or ']') -> item ...
    more = "start"
    while more:
        more = text.read(chunk)
        buf, pos = buf[pos:] + more, 0
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos >= len(buf):
                break
            c = buf[pos]
            if state == "open":
                if c != "[":
                    raise ValueError(f"expected a JSON array, found {c!r}")
                state, pos = "first", pos + 1
            elif state == "sep" or (state == "first" and c == "]"):
                if c == "]":
                    return
                if c != ",":
                    raise ValueError(f"malformed JSON array: expected ',' or ']', found {c!r}")
                state, pos = "item", pos + 1
            else:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if more:  # the item may continue in the next chunk
                        break
                    raise ValueError(f"malformed JSON array: {e.msg}") from None
                if end == len(buf) and more:  # a number or literal may continue in the next chunk
                    break
                yield item
                state, pos = "sep", end
    raise ValueError("the JSON array is not closed (']' missing)")


def _peek_char(text: io.TextIOWrapper) -> str:
    """The first non-space character of the stream, leaving the stream at its start."""
    pos = text.tell()
    head = text.read(4096).lstrip("\ufeff \t\r\n")
    text.seek(pos)
    return head[:1]


def _columns(src, fmt: str) -> dict[str, str]:
    known = COLUMNS[fmt]
    unknown = sorted(set(src.columns) - set(known))
    if unknown:
        raise SourceError(f"{_name_of(src)}: columns maps unknown field(s) {unknown} for format {fmt}; "
                          f"its fields are {', '.join(known)}")
    return {**known, **dict(src.columns)}


def _name_of(src, label: str = "") -> str:
    return f"{label} ({src.path})" if label else str(src.path)


# ----------------------------------------------------------------------------------------------- rows -> records


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Drop("malformed", f"{what} is {type(value).__name__}, not a string")
    for tag in SPECIAL_TAGS:
        if tag in value:
            raise _Drop("malformed", f"{what} contains the chat tag {tag!r}")
    if not value.strip():
        raise _Drop("empty", f"{what} is empty")
    return value.strip()


def messages_of(value: Any, what: str, last: str | None) -> list[dict[str, str]]:
    """A message list in the Llama-2 template's order: optional system first, then user/assistant alternating
    from user, ending with `last` (None: either). ShareGPT's from/value and human/gpt names are accepted."""
    if not isinstance(value, list) or not value:
        raise _Drop("malformed" if value else "empty", f"{what} is not a non-empty list of messages")
    out, expected = [], "user"
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Drop("malformed", f"{what}[{i}] is not an object")
        role = ROLE_ALIASES.get(str(m.get("role", m.get("from", ""))).lower())
        content = m.get("content", m.get("value"))
        if role is None:
            raise _Drop("malformed", f"{what}[{i}] has an unknown role")
        if role == "system":
            if i != 0:
                raise _Drop("malformed", f"{what}[{i}]: a system message may only come first")
        elif role != expected:
            raise _Drop("malformed", f"{what}[{i}]: expected {'an' if expected == 'assistant' else 'a'} {expected} "
                                     f"turn (turns alternate from user)")
        else:
            expected = "assistant" if role == "user" else "user"
        out.append({"role": role, "content": _text(content, f"{what}[{i}].content")})
    if last is not None and out[-1]["role"] != last:
        raise _Drop("malformed", f"{what} ends with a {out[-1]['role']} turn, not {last}")
    if not any(m["role"] == "user" for m in out):
        raise _Drop("malformed", f"{what} has no user turn")
    return out


def hh_transcript(text: Any, what: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript "\\n\\nHuman: q\\n\\nAssistant: a ..." as messages (ending with the assistant)."""
    if not isinstance(text, str):
        raise _Drop("malformed", f"{what} is {type(text).__name__}, not a transcript string")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 5:
        raise _Drop("malformed", f"{what} is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    raw = [{"role": "user" if who == "Human" else "assistant", "content": said}
           for who, said in zip(parts[1::2], parts[2::2])]
    return messages_of(raw, what, last="assistant")


def _pair_sides(row: dict, cols: dict[str, str]) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen answer, rejected answer) of a TRL preference row."""
    chosen, rejected, prompt = row.get(cols["chosen"]), row.get(cols["rejected"]), row.get(cols["prompt"])
    if isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is None:  # implicit prompt: the messages both sides share
            c, r = messages_of(chosen, "chosen", "assistant"), messages_of(rejected, "rejected", "assistant")
            n = 0
            while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
                n += 1
            prompt, c, r = c[:n], c[n:], r[n:]
        else:  # explicit prompt: each side is the answer alone, [{"role": "assistant", "content": ...}]
            c, r = chosen, rejected
        for side, msgs in (("chosen", c), ("rejected", r)):
            if len(msgs) != 1 or not isinstance(msgs[0], dict) or \
                    ROLE_ALIASES.get(str(msgs[0].get("role", msgs[0].get("from", ""))).lower()) != "assistant":
                raise _Drop("malformed", f"{side} must be one assistant answer after the prompt")
        chosen, rejected = (m[0].get("content", m[0].get("value")) for m in (c, r))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(prompt, "prompt")}]
    elif prompt is None:
        raise _Drop("malformed", f"no '{cols['prompt']}' (needed when chosen / rejected are strings)")
    prompt = messages_of(prompt, "prompt", last="user")
    return prompt, _text(chosen, "chosen"), _text(rejected, "rejected")


def _pair(row: dict, fmt: str, cols: dict[str, str], kind: str, row_index: int, seed: int) -> PreferenceRecord:
    rating, extra = None, {}
    if fmt == "hh-rlhf":
        c = hh_transcript(row.get(cols["chosen"]), "chosen")
        r = hh_transcript(row.get(cols["rejected"]), "rejected")
        if c[:-1] != r[:-1]:
            raise _Drop("malformed", "chosen and rejected transcripts differ before their last answer")
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    elif fmt == "preference":
        prompt, chosen, rejected = _pair_sides(row, cols)
        rating = row.get(cols["rating"])
        if rating is not None and rating not in RATINGS:
            raise _Drop("malformed", f"rating {rating!r} is not one of {', '.join(RATINGS)}")
        margin = row.get(cols["margin"])
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, int | float):
                raise _Drop("malformed", f"margin {margin!r} is not a number")
            extra["margin"] = float(margin)
        kind = row.get(cols["kind"]) or kind
        if kind not in ("helpfulness", "safety"):
            raise _Drop("malformed", f"kind {kind!r} is not helpfulness or safety")
    else:  # ultrafeedback
        prompt = [{"role": "user", "content": _text(row.get(cols["prompt"]), cols["prompt"])}]
        completions = row.get(cols["completions"])
        if not isinstance(completions, list):
            raise _Drop("malformed", f"'{cols['completions']}' is not a list of completions")
        scored = []
        for i, comp in enumerate(completions):
            score = comp.get(cols["score"]) if isinstance(comp, dict) else None
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise _Drop("malformed", f"completion {i} has no numeric '{cols['score']}'")
            scored.append((float(score), _text(comp.get(cols["response"]), f"completion {i} response")))
        if len(scored) < 2:
            raise _Drop("malformed", "fewer than two completions")
        scored.sort(key=lambda s: -s[0])
        best, rest = scored[0], scored[1:]
        worse = [s for s in rest if s[0] < best[0]]
        if not worse:
            raise _Drop("tie", "every completion has the same score")
        other = random.Random(seed * 1_000_003 + row_index).choice(worse)
        gap = best[0] - other[0]
        rating = next(level for threshold, level in ULTRAFEEDBACK_LEVELS if gap >= threshold)
        chosen, rejected = best[1], other[1]
        extra["scores"] = [best[0], other[0]]
    if chosen == rejected:
        raise _Drop("tie", "chosen and rejected are the same answer")
    return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, rating=rating, kind=kind, extra=extra)


def _prompt(row: dict, cols: dict[str, str]) -> PromptRecord:
    prompt = row.get(cols["prompt"])
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(prompt, "prompt")}]
        system = row.get(cols["system"])
        if system is not None:
            prompt.insert(0, {"role": "system", "content": _text(system, "system")})
    prompt = messages_of(prompt, "prompt", last="user")
    is_safety = row.get(cols["is_safety"], False)
    if not isinstance(is_safety, bool):
        raise _Drop("malformed", f"is_safety {is_safety!r} is not true or false")
    return PromptRecord(prompt=prompt, is_safety=is_safety)


def row_record(row: dict | None, kind: str, fmt: str, cols: dict[str, str], source_kind: str, row_index: int,
               seed: int = 0):
    """The record of data kind `kind` (pretrain | sft | preference | prompts | eval_prompts) in one row of format
    `fmt`; raises _Drop for a row that cannot be used."""
    if row is None:
        raise _Drop("malformed", "not a JSON object")
    if fmt == "text":
        return PretrainRecord(text=_text(row.get(cols["text"]), cols["text"]))
    if fmt in ("hh-rlhf", "preference", "ultrafeedback"):
        pair = _pair(row, fmt, cols, source_kind, row_index, seed)
        if kind == "preference":
            return pair
        if kind == "sft":
            return SFTRecord(messages=pair.prompt + [{"role": "assistant", "content": pair.chosen}])
        return PromptRecord(prompt=pair.prompt, is_safety=pair.kind == "safety")
    if fmt == "messages":
        messages = messages_of(row.get(cols["messages"]), cols["messages"], last=None)
        if kind == "sft":
            if messages[-1]["role"] != "assistant":
                raise _Drop("malformed", "the dialogue does not end with an assistant answer")
            return SFTRecord(messages=messages)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        return PromptRecord(prompt=messages[: last_user + 1], is_safety=False)
    return _prompt(row, cols)


# ----------------------------------------------------------------------------------------------- sources


def _check_columns(src, label: str, fmt: str, cols: dict[str, str], row: dict | None, file: str) -> None:
    """A required column absent from the first row is a config mistake, not a dropped row."""
    if not isinstance(row, dict):
        return
    missing = [cols[f] for f in REQUIRED[fmt] if cols[f] not in row and not (fmt == "preference" and f == "prompt")]
    if missing:
        raise SourceError(f"{label} ({src.path}): no column '{missing[0]}' in {file} (it has "
                          f"{', '.join(map(str, list(row)[:8]))}); map it with columns: "
                          f"{{{[f for f in REQUIRED[fmt] if cols[f] == missing[0]][0]}: <column>}}")


def iter_source(src, kind: str, label: str, stats: SourceStats, seed: int = 0,
                byte_range: tuple[int, int] | None = None) -> Iterator:
    """The records of one source, streamed file by file; counts rows and drops into `stats`. byte_range: only the
    rows of that byte range of a source that is one splittable file (row numbers in drop examples count from it)."""
    if src.format not in FORMATS_FOR[kind]:
        raise SourceError(f"{label} ({src.path}): format '{src.format}' cannot feed data.{kind}; use one of "
                          f"{', '.join(FORMATS_FOR[kind])}")
    cols = _columns(src, src.format)
    index = 0
    for file in source_files(src.path, src.split, f"{label} ({src.path})"):
        try:
            first = True
            for row in iter_file_rows(file, byte_range):
                if first:
                    _check_columns(src, label, src.format, cols, row, file)
                    first = False
                stats.rows += 1
                try:
                    record = row_record(row, kind, src.format, cols, src.kind, index, seed)
                except _Drop as d:
                    stats.drop(d.reason, f"row {index + 1}: {d}")
                else:
                    stats.kept += 1
                    yield record
                index += 1
        except (OSError, ValueError, EOFError) as e:
            if isinstance(e, SourceError):
                raise
            raise SourceError(f"{label} ({src.path}): cannot read {file}: {str(e).splitlines()[0]}; "
                              f"check the file") from None


def weighted(records: list, weight: float, seed: int) -> list:
    """`weight` x the records: whole repeats, then a seeded sample for the fraction (0.5 keeps a seeded half)."""
    whole = int(weight)
    rest = random.Random(seed).sample(records, round((weight - whole) * len(records)))
    return records * whole + rest


def heldout_split(records: list, fraction: float) -> tuple[list, list]:
    """(train, held-out): a record is held out when the hash of its prompt falls in the first `fraction` (so pairs
    sharing a prompt stay together, and the split does not depend on file order); at least one when fraction > 0."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    keys = [heldout_key(getattr(r, "prompt", None) or getattr(r, "text", "")) for r in records]
    held = [r for r, k in zip(records, keys) if k < fraction]
    if not held:
        first = min(range(len(records)), key=keys.__getitem__)
        held = [records[first]]
        return [r for i, r in enumerate(records) if i != first], held
    return [r for r, k in zip(records, keys) if k >= fraction], held


def heldout_key(value) -> float:
    """A number in [0, 1] from the hash of a prompt (message list) or a document's text: below the held-out
    fraction means held out."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def load_kind(data, kind: str, seed: int = 0) -> tuple[list[list], list[SourceStats]]:
    """Every source of `data.<kind>` read into records (one list per source, before weighting) and their stats.
    Malformed / empty rows past data.max_drop_fraction stop here (check_drops)."""
    per_source, stats = [], []
    for i, src in enumerate(getattr(data, kind)):
        label = f"data.{kind}[{i}]"
        st = SourceStats(f"{label} ({src.path})")
        per_source.append(list(iter_source(src, kind, label, st, seed)))
        stats.append(st)
        check_drops(st, data.max_drop_fraction)
    return per_source, stats


def check_drops(st: SourceStats, max_fraction: float) -> None:
    """SourceError when more than `max_fraction` of the source's rows were dropped (or none was kept)."""
    if st.rows == 0:
        raise SourceError(f"{st.name}: no rows; check the path and split")
    if st.n_dropped / st.rows > max_fraction or st.kept <= 0:
        reasons = ", ".join(f"{k} {v}" for k, v in st.dropped.most_common())
        example = next(iter(st.examples.values()), "")
        raise SourceError(f"{st.name}: {st.n_dropped} of {st.rows} rows dropped ({reasons}; e.g. {example}), more "
                          f"than data.max_drop_fraction {max_fraction:g}; fix the data, its format / columns, or "
                          f"raise data.max_drop_fraction")


def drop_too_long(records: list, st: SourceStats, lengths: list[int], max_len: int, key: str) -> list:
    """The records whose token length fits `max_len`; the rest are counted as too_long in `st`."""
    kept = [r for r, n in zip(records, lengths) if n <= max_len]
    if len(kept) < len(records):
        st.drop("too_long", f"longer than {key} {max_len} tokens", len(records) - len(kept))
    return kept


def drop_table(stats: dict[str, list[SourceStats]]) -> str:
    """Per source: rows read, kept, and dropped by reason (printed in the summary)."""
    reasons = ("malformed", "empty", "tie", "too_long")
    head = f"{'data source':<60}{'rows':>9}{'kept':>9}" + "".join(f"{r:>11}" for r in reasons)
    lines = [head, "-" * len(head)]
    for group in stats.values():
        for st in group:
            name = st.name if len(st.name) <= 58 else "..." + st.name[-55:]
            lines.append(f"{name:<60}{st.rows:>9}{st.kept:>9}" + "".join(f"{st.dropped.get(r, 0):>11}" for r in reasons))
    return "\n".join(lines)
