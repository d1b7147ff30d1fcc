"""The user-data converters (rayllama.data.sources), row for row against the hand-made files in tests/fixtures/data:
every format, every file type (JSONL, JSON, gzip, parquet, Arrow, text, a split folder), drops counted per reason,
and the bad-input cases (wrong format, missing column, unreadable file, too many drops) as one line naming the
source."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from rayllama.config import ConfigError, DataSection, DataSource, load_config
from rayllama.data import sources
from rayllama.data.sources import SourceError, SourceStats

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def read(data_kind: str, path, fmt: str, **kw) -> tuple[list, SourceStats]:
    st = SourceStats("test")
    records = list(sources.iter_source(DataSource(path=str(path), format=fmt, **kw), data_kind, "data.test[0]", st))
    return records, st


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_text_rows_and_empty_ones():
    records, st = read("pretrain", FIXTURES / "text.jsonl", "text")
    assert [r.text for r in records] == ["The river runs past the mill. The miller counts sacks.",
                                         "Bread is made from flour, water and salt.",
                                         "A third document, with\na line break."]
    assert (st.rows, st.kept, dict(st.dropped)) == (4, 3, {"empty": 1})


def test_messages_openai_and_sharegpt_rows():
    records, st = read("sft", FIXTURES / "messages.jsonl", "messages")
    assert [r.messages for r in records] == [
        [{"role": "system", "content": "You are terse."}, user("What is 2 + 2?"), assistant("4.")],
        [user("Name a colour."), assistant("Blue."), user("Another one?"), assistant("Green.")],
        [user("Hi"), assistant("Hello!")],
    ]
    assert dict(st.dropped) == {"malformed": 1}  # two user turns in a row
    prompts, _ = read("prompts", FIXTURES / "messages.jsonl", "messages")
    assert prompts[1].prompt == [user("Name a colour."), assistant("Blue."), user("Another one?")]


def test_hh_rlhf_transcripts_become_pairs_without_rating():
    records, st = read("preference", FIXTURES / "hh_rlhf.jsonl", "hh-rlhf", kind="safety")
    assert [(r.prompt, r.chosen, r.rejected, r.rating, r.kind) for r in records] == [
        ([user("How do I boil an egg?")], "Put it in boiling water for nine minutes.", "I don't know.", None, "safety"),
        ([user("Hi"), assistant("Hello, how can I help?"), user("Tell me a fact.")], "Honey never spoils.", "No.",
         None, "safety"),
    ]
    assert dict(st.dropped) == {"tie": 1, "malformed": 1}
    sft, _ = read("sft", FIXTURES / "hh_rlhf.jsonl", "hh-rlhf")
    assert sft[0].messages == [user("How do I boil an egg?"), assistant("Put it in boiling water for nine minutes.")]


def test_trl_preference_rows_strings_messages_and_implicit_prompt():
    records, st = read("preference", FIXTURES / "preference.jsonl", "preference")
    got = [(r.prompt, r.chosen, r.rejected, r.rating, r.kind, r.extra.get("margin")) for r in records]
    assert got == [
        ([user("Capital of France?")], "Paris.", "Rome.", "significantly_better", "helpfulness", None),
        ([{"role": "system", "content": "Be kind."}, user("Rate my poem.")], "It has a lovely rhythm.", "Bad.", None,
         "helpfulness", 0.5),
        ([user("How do I pick a lock?")], "I can't help with breaking into property.",
         "Insert a tension wrench and rake the pins.", None, "safety", None),
        ([user("Write an insult for my coworker.")], "I'd rather help you give honest, kind feedback.",
         "You are a useless lump.", "better", "safety", None),
    ]
    assert dict(st.dropped) == {"malformed": 1}  # rating "very_better"


def test_unrated_pairs_train_with_margin_zero():
    from rayllama.losses import MARGINS
    from rayllama.train.data import pair_margin

    records, _ = read("preference", FIXTURES / "preference.jsonl", "preference")
    assert [pair_margin(r, MARGINS["small"]) for r in records] == [1.0, 0.5, 0.0, 2 / 3]


def test_ultrafeedback_best_against_a_worse_one_with_a_rating_level():
    records, st = read("preference", FIXTURES / "ultrafeedback.jsonl", "ultrafeedback")
    assert len(records) == 2 and dict(st.dropped) == {"tie": 1}
    first, second = records
    assert first.prompt == [user("Explain gravity in one sentence.")]
    assert first.chosen == "Gravity pulls masses toward each other."
    assert first.rejected in ("It is a force.", "Gravity is when things fall down because they are heavy and stuff.")
    assert first.rating == "significantly_better"  # 9 vs 5
    assert (second.chosen, second.rejected, second.rating) == ("Hi!", "Hello.", "negligibly_better")  # 7 vs 6.5
    again, _ = read("preference", FIXTURES / "ultrafeedback.jsonl", "ultrafeedback")
    assert again[0].rejected == first.rejected  # the random other completion is seeded


def test_prompts_with_system_and_safety_flag():
    records, st = read("prompts", FIXTURES / "prompts.jsonl", "prompts")
    assert [(r.prompt, r.is_safety) for r in records] == [
        ([{"role": "system", "content": "Answer in English."}, user("Write a haiku about rain.")], False),
        ([user("Hi"), assistant("Hello"), user("How do I make a weapon?")], True),
    ]
    assert dict(st.dropped) == {"empty": 1}


def test_column_map_renames_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Why?", "good": "Because.", "bad": "No."}) + "\n")
    records, _ = read("preference", path, "preference", columns={"prompt": "question", "chosen": "good",
                                                                 "rejected": "bad"})
    assert (records[0].prompt, records[0].chosen, records[0].rejected) == ([user("Why?")], "Because.", "No.")


def test_every_file_type_gives_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "preference.jsonl").read_text().splitlines()][:2]
    expected, _ = read("preference", FIXTURES / "preference.jsonl", "preference")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    # parquet and Arrow need one type per column: the string-prompt row alone
    table = pa.Table.from_pylist(rows[:1])
    pq.write_table(table, tmp_path / "p.parquet")
    with pa.ipc.new_stream(tmp_path / "p.arrow", table.schema) as w:  # datasets.save_to_disk's layout
        w.write_table(table)
    for name, n in (("p.json", 2), ("p.jsonl.gz", 2), ("p.parquet", 1), ("p.arrow", 1)):
        got, _ = read("preference", tmp_path / name, "preference")
        assert [(r.prompt, r.chosen, r.rejected) for r in got] == [
            (r.prompt, r.chosen, r.rejected) for r in expected[:n]], name
    (tmp_path / "t.txt").write_text("line one\n\nline two\n")
    got, _ = read("pretrain", tmp_path / "t.txt", "text")
    assert [r.text for r in got] == ["line one", "line two"]


def test_a_json_array_is_read_item_by_item(tmp_path, monkeypatch):
    """A .json array streams: items parsed one at a time across chunk boundaries (json.load, which holds the whole
    file, is never called), and a malformed or unclosed array names the source and the file."""
    from rayllama.data import sources

    rows = [{"text": f"document {i} [" + "x]y,{z\\"[i % 5:] * (i % 7) + "]"} for i in range(500)]
    (tmp_path / "big.json").write_text(json.dumps(rows, indent=1))
    monkeypatch.setattr(json, "load", lambda *a, **k: pytest.fail("json.load read the whole file"))
    monkeypatch.setattr(sources, "_json_array_items",
                        lambda text, chunk=97, f=sources._json_array_items: f(text, chunk))  # many chunk edges
    got, _ = read("pretrain", tmp_path / "big.json", "text")
    assert [r.text for r in got] == [r["text"] for r in rows]
    for name, text in (("open.json", '[{"text": "a"}, {"text": "b"}'), ("double.json", '[{"text": "a"},, {}]')):
        (tmp_path / name).write_text(text)
        with pytest.raises(SourceError, match=rf"data.test\[0\] .*cannot read .*{name}: (the JSON array is not "
                                              rf"closed|malformed JSON array)"):
            read("pretrain", tmp_path / name, "text")


def test_a_folder_reads_the_files_of_its_split(tmp_path):
    shutil.copy(FIXTURES / "hh_rlhf.jsonl", tmp_path / "train.jsonl")
    (tmp_path / "test.jsonl").write_text((FIXTURES / "hh_rlhf.jsonl").read_text().splitlines()[0] + "\n")
    train, _ = read("preference", tmp_path, "hh-rlhf")
    test, _ = read("preference", tmp_path, "hh-rlhf", split="test")
    assert (len(train), len(test)) == (2, 1)


def test_heldout_split_is_by_prompt_and_stable():
    records, _ = read("preference", FIXTURES / "preference.jsonl", "preference")
    train, held = sources.heldout_split(records, 0.34)
    assert len(held) >= 1 and len(train) + len(held) == len(records)
    assert sources.heldout_split(list(reversed(records)), 0.34)[1] == held or set(map(id, held)) == set(
        map(id, sources.heldout_split(list(reversed(records)), 0.34)[1]))


def test_weight_repeats_and_subsamples():
    items = list(range(10))
    assert sources.weighted(items, 2.0, 0) == items + items
    half = sources.weighted(items, 0.5, 0)
    assert len(half) == 5 and set(half) <= set(items) and half == sources.weighted(items, 0.5, 0)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_wrong_format_name_is_one_config_line():
    with pytest.raises(ConfigError, match=r"data.sft\[0\].format 'chatml' is unknown"):
        load_config(None, ["stages=[sft]", "data.sft=[{path: x.jsonl, format: chatml}]"])


def test_missing_column_names_the_source_and_the_fix():
    with pytest.raises(SourceError) as e:
        read("pretrain", FIXTURES / "messages.jsonl", "text")
    msg = str(e.value)
    assert "\n" not in msg and "data.test[0]" in msg and "no column 'text'" in msg and "columns: {text:" in msg


def test_unreadable_file_names_the_source(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(SourceError, match=r"data.test\[0\] .*cannot read .*broken.parquet"):
        read("preference", bad, "preference")
    with pytest.raises(SourceError, match="no such file or folder"):
        read("preference", tmp_path / "missing.jsonl", "preference")


def test_over_threshold_drops_stop_with_the_source_named():
    data = DataSection(sft=[DataSource(path=str(FIXTURES / "messages.jsonl"), format="messages")],
                       max_drop_fraction=0.1)
    with pytest.raises(SourceError) as e:
        sources.load_kind(data, "sft")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.sft[0] (") and "1 of 4 rows dropped (malformed 1" in msg
    data.max_drop_fraction = 0.3
    per_source, stats = sources.load_kind(data, "sft")
    assert len(per_source[0]) == 3 and stats[0].as_dict() == {"rows": 4, "kept": 3, "dropped": {"malformed": 1}}


@pytest.mark.parametrize("override, message", [
    ("data.sft=[{path: tests/fixtures/data/nothere.jsonl, format: messages}]",
     "data.sft[0] (tests/fixtures/data/nothere.jsonl): no such file or folder"),
    ("data.sft=[{path: tests/fixtures/data/text.jsonl, format: messages}]",
     "data.sft[0] (tests/fixtures/data/text.jsonl): no column 'messages'"),
    ("data.max_drop_fraction=0.3", "data.sft[1] (tests/fixtures/data/hh_rlhf.jsonl): 2 of 4 rows dropped"),
    ("data.sft=[{path: tests/fixtures/data/messages.jsonl, format: ultrafeedbak}]",
     "data.sft[0].format 'ultrafeedbak' is unknown"),
])
def test_the_driver_stops_on_bad_data_with_one_line(override, message, tmp_path):
    """Through the driver, before Ray starts: exit code 2 and one line on stderr naming the source."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "rayllama.driver", "configs/byo.yaml", f"run_dir={tmp_path / 'run'}",
                           f"sft.init_from={tmp_path}", override], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayllama: error: ") and message in lines[0], proc.stderr


def test_the_driver_names_a_bad_init_from(tmp_path):
    """sft.init_from that is not a checkpoint, or one without tokenizer.model: one line naming the key."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def run(init) -> str:
        proc = subprocess.run([sys.executable, "-m", "rayllama.driver", "configs/byo.yaml",
                               f"run_dir={tmp_path / 'run'}", f"sft.init_from={init}"], cwd=root,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stdout + proc.stderr
        return proc.stderr

    assert f"sft.init_from {tmp_path}: " in run(tmp_path) and "config.json" in run(tmp_path)
    from rayllama.checkpoint import save_model
    from rayllama.model import ModelConfig, Transformer

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=400, ffn_dim=64, max_seq_len=64)
    save_model(tmp_path / "ckpt", Transformer(cfg), cfg)  # no tokenizer.model
    assert "has no tokenizer.model" in run(tmp_path / "ckpt")


def test_the_driver_names_a_bad_policy_pairs_from(tmp_path):
    """reward.policy_pairs_from naming something that is not a checkpoint: one line naming the entry, before any
    stage runs."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "rayllama.driver", "configs/ppo.yaml", f"run_dir={tmp_path / 'run'}",
                           f"reward.policy_pairs_from=[{tmp_path / 'ppo-model'}]"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stdout + proc.stderr
    assert f"reward.policy_pairs_from[0] {tmp_path / 'ppo-model'}: " in proc.stderr and "does not exist" in proc.stderr
