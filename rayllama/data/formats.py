"""The four JSONL data formats: typed records, a strict reader, an atomic writer.

One JSON object per line:

    pretrain:    {"text": "..."}
    sft:         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    preference:  {"prompt": [messages], "chosen": "...", "rejected": "...",
                  "rating": "significantly_better"|"better"|"slightly_better"|"negligibly_better",
                  "kind": "helpfulness"|"safety"}
    prompts:     {"prompt": [messages], "is_safety": true|false}

Message order (the Llama-2 chat template needs it): an optional system message first, then user and assistant
turns alternating, starting with user. An SFT dialogue ends with an assistant turn; a prompt ends with a user turn.

Optional fields (readers keep them, writers write them back):

    prompts:     "task": {...}         the toy world's task payload of the last user turn, for the gold judge
                                      (rayllama.data.toyworld: {"type": ..., "prompt": "...", ...})
                 "instruction": {...}  a GAtt instruction held for the whole dialogue
                                      ({"capitals": bool, "start_with": str|null, "end_with": str|null})
                 "turns": [{...}]      a multi-turn dialogue: the task of every user turn, in order; "prompt"
                                      then holds the system message and the first user turn only
    any format:  other unknown keys are kept in `extra` (e.g. a preference's "task" and "gold" scores).

A malformed line raises `DataError` naming file, line and field; `skip_bad=True` skips it and counts it.
Blank lines are ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
KINDS = ("helpfulness", "safety")
FORMATS = ("pretrain", "sft", "preference", "prompts")

Message = dict[str, str]


class DataError(ValueError):
    """A malformed data line (or record): the message names the file, the line and the field."""


@dataclass
class PretrainRecord:
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFTRecord:
    messages: list[Message]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceRecord:
    prompt: list[Message]
    chosen: str
    rejected: str
    rating: str
    kind: str
    extra: dict[str, Any] = field(default_factory=dict)

    def comparison(self) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
        """The prompt and both responses, in either order: what a reward model trained on this pair has seen."""
        return tuple((m["role"], m["content"]) for m in self.prompt), frozenset((self.chosen, self.rejected))


@dataclass
class PromptRecord:
    prompt: list[Message]
    is_safety: bool
    task: dict[str, Any] | None = None
    instruction: dict[str, Any] | None = None
    turns: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Record = PretrainRecord | SFTRecord | PreferenceRecord | PromptRecord

_FORMAT_OF = {
    PretrainRecord: "pretrain",
    SFTRecord: "sft",
    PreferenceRecord: "preference",
    PromptRecord: "prompts",
}
# key order of the known fields per format (writers sort keys anyway; this fixes what parse() looks for)
_FIELDS = {
    "pretrain": ("text",),
    "sft": ("messages",),
    "preference": ("prompt", "chosen", "rejected", "rating", "kind"),
    "prompts": ("prompt", "is_safety", "task", "instruction", "turns"),
}


class RecordList(list):
    """A list of records that also says how many lines `read_jsonl(..., skip_bad=True)` skipped, and why."""

    def __init__(self, records: Iterable[Record] = (), errors: Iterable[str] = ()) -> None:
        super().__init__(records)
        self.errors: list[str] = list(errors)

    @property
    def n_skipped(self) -> int:
        return len(self.errors)


class _FieldError(Exception):
    def __init__(self, fld: str, problem: str) -> None:
        super().__init__(f"field '{fld}': {problem}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _need(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise _FieldError(key, f"missing (expected {what})")
    value = obj[key]
    # bool is an int subclass: never accept it where a str/dict/list is wanted, and accept only bool for bool
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise _FieldError(key, f"expected {what}, got {_type_name(value)}")
    return value


def _optional(obj: Mapping[str, Any], key: str, typ: type, what: str) -> Any:
    if obj.get(key) is None:
        return None
    return _need(obj, key, typ, what)


def validate_messages(messages: Any, fld: str, last_role: str) -> list[Message]:
    """Check a message list: non-empty; roles system (first only), then user/assistant alternating from user;
    ends with `last_role`. Raises DataError naming `fld[i].key`."""
    try:
        return _messages(messages, fld, last_role)
    except _FieldError as e:
        raise DataError(str(e)) from None


def _messages(messages: Any, fld: str, last_role: str) -> list[Message]:
    if not isinstance(messages, list):
        raise _FieldError(fld, f"expected a list of messages, got {_type_name(messages)}")
    if not messages:
        raise _FieldError(fld, "empty message list (needs at least one user turn)")
    out: list[Message] = []
    expected = "user"
    for i, m in enumerate(messages):
        here = f"{fld}[{i}]"
        if not isinstance(m, dict):
            raise _FieldError(here, f"expected an object with role and content, got {_type_name(m)}")
        if "role" not in m:
            raise _FieldError(f"{here}.role", "missing")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise _FieldError(f"{here}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if "content" not in m:
            raise _FieldError(f"{here}.content", "missing")
        if not isinstance(m["content"], str):
            raise _FieldError(f"{here}.content", f"expected a string, got {_type_name(m['content'])}")
        if role == "system":
            if i != 0:
                raise _FieldError(f"{here}.role", "a system message may only come first")
        elif role != expected:
            raise _FieldError(
                f"{here}.role", f"expected {expected!r} here (turns alternate, starting with user)"
            )
        else:
            expected = "assistant" if role == "user" else "user"
        out.append({"role": role, "content": m["content"]})
    if out[-1]["role"] != last_role:
        raise _FieldError(f"{fld}[{len(out) - 1}].role", f"the last message must be {last_role!r}")
    return out


def parse_record(obj: Any, fmt: str) -> Record:
    """Build the typed record of format `fmt` from a decoded JSON object; raises DataError naming the field."""
    try:
        return _parse(obj, fmt)
    except _FieldError as e:
        raise DataError(str(e)) from None


def _parse(obj: Any, fmt: str) -> Record:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(obj, dict):
        raise _FieldError("<line>", f"expected a JSON object, got {_type_name(obj)}")
    extra = {k: v for k, v in obj.items() if k not in _FIELDS[fmt]}
    if fmt == "pretrain":
        return PretrainRecord(text=_need(obj, "text", str, "a string"), extra=extra)
    if fmt == "sft":
        messages = _need(obj, "messages", list, "a list of messages")
        return SFTRecord(messages=_messages(messages, "messages", "assistant"), extra=extra)
    prompt = _messages(_need(obj, "prompt", list, "a list of messages"), "prompt", "user")
    if fmt == "preference":
        rating = _need(obj, "rating", str, "a rating string")
        if rating not in RATINGS:
            raise _FieldError("rating", f"unknown rating {rating!r} (expected one of {', '.join(RATINGS)})")
        kind = _need(obj, "kind", str, "a kind string")
        if kind not in KINDS:
            raise _FieldError("kind", f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        return PreferenceRecord(
            prompt=prompt,
            chosen=_need(obj, "chosen", str, "a string"),
            rejected=_need(obj, "rejected", str, "a string"),
            rating=rating,
            kind=kind,
            extra=extra,
        )
    turns = _optional(obj, "turns", list, "a list of task objects")
    if turns is not None:
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise _FieldError(f"turns[{i}]", f"expected a task object, got {_type_name(t)}")
        if not turns:
            raise _FieldError("turns", "empty list (omit the field for a single-turn prompt)")
    return PromptRecord(
        prompt=prompt,
        is_safety=_need(obj, "is_safety", bool, "true or false"),
        task=_optional(obj, "task", dict, "a task object"),
        instruction=_optional(obj, "instruction", dict, "an instruction object"),
        turns=turns,
        extra=extra,
    )


def record_to_dict(record: Record | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of a record: its fields (None-valued optional fields left out) plus its extras."""
    if isinstance(record, Mapping):
        return dict(record)
    fmt = _FORMAT_OF.get(type(record))
    if fmt is None:
        raise TypeError(f"cannot write {type(record).__name__}; pass a record from rayllama.data.formats")
    out = dict(record.extra)
    for key in _FIELDS[fmt]:
        value = getattr(record, key)
        if value is not None:
            out[key] = value
    return out


def read_jsonl(path: str | os.PathLike[str], fmt: str, skip_bad: bool = False) -> RecordList:
    """Read a JSONL file of format `fmt` (pretrain | sft | preference | prompts) into typed records.

    A malformed line raises DataError("FILE:LINE: field 'F': problem; ...") unless `skip_bad`, which skips it
    and records the message in the result's `errors` (`n_skipped` counts them)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; check the path in the config")
    out = RecordList()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is fine
                except UnicodeDecodeError as e:
                    raise _FieldError("<encoding>", f"not UTF-8 text (byte {raw[e.start]:#04x} at byte "
                                                    f"{e.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _FieldError("<json>", f"bad JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise _FieldError("<json>", "bad JSON (nested too deeply)") from None
                out.append(_parse(obj, fmt))
            except _FieldError as e:
                msg = f"{path}:{lineno}: {e} in a {fmt} line; fix the line or read with skip_bad=True"
                if not skip_bad:
                    raise DataError(msg) from None
                out.errors.append(msg)
    return out


def read_pretrain(path: str | os.PathLike[str], skip_bad: bool = False) -> RecordList:
    return read_jsonl(path, "pretrain", skip_bad)


def read_sft(path: str | os.PathLike[str], skip_bad: bool = False) -> RecordList:
    return read_jsonl(path, "sft", skip_bad)


def read_preferences(path: str | os.PathLike[str], skip_bad: bool = False) -> RecordList:
    return read_jsonl(path, "preference", skip_bad)


def read_prompts(path: str | os.PathLike[str], skip_bad: bool = False) -> RecordList:
    return read_jsonl(path, "prompts", skip_bad)


def dumps_record(record: Record | Mapping[str, Any]) -> str:
    """One JSONL line (without the newline): sorted keys, UTF-8 text (ensure_ascii=False), so equal records give
    equal bytes."""
    return json.dumps(record_to_dict(record), ensure_ascii=False, sort_keys=True)


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Record | Mapping[str, Any]]) -> Path:
    """Write records as JSONL atomically (a temp file in the same folder, then os.replace) and byte-deterministic
    (`dumps_record`, "\\n" line endings). Creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; data files are for everyone to read
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(dumps_record(record))
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
