"""JSONL formats: typed round trips, byte-deterministic atomic writes, and errors that name file, line, field."""

import json

import pytest

from rayllama.data.formats import (
    DataError,
    PreferenceRecord,
    PretrainRecord,
    PromptRecord,
    SFTRecord,
    read_jsonl,
    read_prompts,
    validate_messages,
    write_jsonl,
)

USER = {"role": "user", "content": "What is 3 plus 4?"}
ASSISTANT = {"role": "assistant", "content": "3 plus 4 is 7."}
SYSTEM = {"role": "system", "content": "Always answer in capital letters."}

GOOD = {
    "pretrain": {"text": "Grass is green. Caf\u00e9 na\u00efve."},
    "sft": {"messages": [SYSTEM, USER, ASSISTANT]},
    "preference": {
        "prompt": [USER],
        "chosen": "3 plus 4 is 7.",
        "rejected": "3 plus 4 is 8.",
        "rating": "better",
        "kind": "helpfulness",
    },
    "prompts": {"prompt": [USER], "is_safety": False},
}


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", list(GOOD))
def test_round_trip_each_format(tmp_path, fmt):
    path = _write_lines(tmp_path / f"{fmt}.jsonl", [json.dumps(GOOD[fmt])] * 2)
    records = read_jsonl(path, fmt)
    assert len(records) == 2 and records.n_skipped == 0
    expected_type = {
        "pretrain": PretrainRecord,
        "sft": SFTRecord,
        "preference": PreferenceRecord,
        "prompts": PromptRecord,
    }[fmt]
    assert all(isinstance(r, expected_type) for r in records)
    out = write_jsonl(tmp_path / "out.jsonl", records)
    # written back: the same objects (sorted keys), one per line
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [GOOD[fmt]] * 2


def test_prompt_extras_are_kept(tmp_path):
    task = {"type": "add", "a": 3, "b": 4, "prompt": "What is 3 plus 4?"}
    instruction = {"capitals": True, "start_with": None, "end_with": "ahoy"}
    obj = {
        "prompt": [SYSTEM, USER],
        "is_safety": False,
        "task": task,
        "instruction": instruction,
        "turns": [task, task],
        "note": "kept",
    }
    path = _write_lines(tmp_path / "p.jsonl", [json.dumps(obj)])
    (rec,) = read_prompts(path)
    assert rec.task == task and rec.instruction == instruction and rec.turns == [task, task]
    assert rec.extra == {"note": "kept"}
    write_jsonl(tmp_path / "q.jsonl", [rec])
    assert json.loads((tmp_path / "q.jsonl").read_text(encoding="utf-8")) == obj


def test_write_is_byte_deterministic_utf8_and_newline_terminated(tmp_path):
    recs = [
        PretrainRecord(text="na\u00efve \u2014 caf\u00e9"),
        PreferenceRecord(
            prompt=[USER], chosen="a", rejected="b", rating="better", kind="safety", extra={"z": 1, "a": 2}
        ),
    ]
    a = write_jsonl(tmp_path / "a.jsonl", recs).read_bytes()
    b = write_jsonl(tmp_path / "b.jsonl", list(recs)).read_bytes()
    assert a == b
    assert "na\u00efve \u2014 caf\u00e9".encode() in a  # ensure_ascii=False: the characters, not \\u escapes
    assert a.endswith(b"\n") and b"\r" not in a
    second = json.loads(a.decode().splitlines()[1])
    assert list(second) == sorted(second)  # keys sorted -> order-independent bytes


def test_write_is_atomic_on_failure(tmp_path):
    path = write_jsonl(tmp_path / "keep.jsonl", [PretrainRecord(text="old")])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl(
            path, [PretrainRecord(text="new"), PretrainRecord(text=object())]
        )  # not JSON-serialisable
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["keep.jsonl"]  # no temp file left behind


BAD_LINES = [
    # (format, line, field named in the error)
    ("pretrain", '{"text": "unterminated', "<json>"),
    ("pretrain", '{"txt": "typo"}', "text"),
    ("pretrain", '{"text": 5}', "text"),
    ("pretrain", '["a list"]', "<line>"),
    ("sft", '{"messages": []}', "messages"),
    ("sft", '{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    (
        "sft",
        '{"messages": [{"role": "user", "content": "hi"}]}',
        "messages[0].role",
    ),  # must end with assistant
    ("sft", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "messages[0].content"),
    (
        "sft",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
        "messages[1].role",
    ),
    (
        "preference",
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", '
        '"rating": "much_better", "kind": "helpfulness"}',
        "rating",
    ),
    (
        "preference",
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", '
        '"rating": "better", "kind": "honesty"}',
        "kind",
    ),
    (
        "preference",
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": 1, "rejected": "b", '
        '"rating": "better", "kind": "safety"}',
        "chosen",
    ),
    (
        "preference",
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rating": "better", "kind": "safety"}',
        "rejected",
    ),
    ("prompts", '{"prompt": [{"role": "user", "content": "q"}], "is_safety": 1}', "is_safety"),
    ("prompts", '{"prompt": [{"role": "user", "content": "q"}]}', "is_safety"),
    ("prompts", '{"prompt": "q", "is_safety": true}', "prompt"),
    (
        "prompts",
        '{"prompt": [{"role": "user", "content": "q"}], "is_safety": true, "turns": ["x"]}',
        "turns[0]",
    ),
]


@pytest.mark.parametrize("fmt,line,field", BAD_LINES)
def test_malformed_line_names_file_line_and_field(tmp_path, fmt, line, field):
    path = _write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD[fmt]), "", line])
    with pytest.raises(DataError) as err:
        read_jsonl(path, fmt)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{path}:3:" in msg  # line 3 (the blank line 2 is skipped but counted)
    assert f"field '{field}'" in msg
    assert isinstance(err.value, ValueError)


def test_skip_bad_skips_and_counts(tmp_path):
    lines = [
        json.dumps(GOOD["preference"]),
        "{not json",
        json.dumps(GOOD["preference"]),
        json.dumps({**GOOD["preference"], "rating": "best"}),
        json.dumps({"prompt": [USER]}),
        "",
        json.dumps(GOOD["preference"]),
    ]
    path = _write_lines(tmp_path / "pref.jsonl", lines)
    records = read_jsonl(path, "preference", skip_bad=True)
    assert len(records) == 3 and records.n_skipped == 3
    assert [e.split(":")[1] for e in records.errors] == ["2", "4", "5"]  # the bad line numbers, in order
    with pytest.raises(DataError, match=":2:"):
        read_jsonl(path, "preference")


def test_usage_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'chat'"):
        read_jsonl(tmp_path / "x.jsonl", "chat")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl", "sft")
    with pytest.raises(DataError, match=r"field 'prompt\[1\]\.role': a system message may only come first"):
        validate_messages([USER, SYSTEM], "prompt", "user")
    assert validate_messages([SYSTEM, USER], "prompt", "user") == [SYSTEM, USER]


def test_a_comparison_is_the_prompt_and_the_unordered_responses():
    a = PreferenceRecord(prompt=[USER], chosen="3 plus 4 is 7.", rejected="7.", rating="better", kind="helpfulness")
    swapped = PreferenceRecord(prompt=[USER], chosen="7.", rejected="3 plus 4 is 7.", rating="slightly_better",
                               kind="safety")
    other_prompt = PreferenceRecord(prompt=[SYSTEM, USER], chosen=a.chosen, rejected=a.rejected, rating=a.rating,
                                    kind=a.kind)
    assert a.comparison() == swapped.comparison() != other_prompt.comparison()
