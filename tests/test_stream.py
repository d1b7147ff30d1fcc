"""Pretraining text streamed through Ray Data into Ray Train (rayllama.data.stream): packing keeps every token and
marks every document, and a corpus larger than the configured Ray Data memory budget trains for more than one
epoch, every worker reading its shard step by step."""

from __future__ import annotations

import json
import random

import pytest

from rayllama.config import DataSection, DataSource, OptimConfig, PipelineConfig
from rayllama.data import stream
from rayllama.tokenizer import Tokenizer, train_tokenizer

WORDS = "the river mill miller counts sacks of flour bread water salt and a to in is was".split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tokenizer(corpus(300), tmp_path_factory.mktemp("tok") / "t", vocab_size=400))


def test_pack_keeps_every_token_and_marks_documents(tok):
    docs = corpus(7, seed=1)
    packed = stream.TokenizePack(tok, seq_len=31)({"text": docs})
    want = [t for d in docs for t in tok.encode(d, bos=True, eos=True)]
    tokens, lengths, mask = packed["tokens"], packed["lengths"], packed["loss_mask"]
    got = [int(t) for row, n in zip(tokens, lengths) for t in row[:n]]
    assert got == want  # in order, nothing dropped; the last row is padded
    assert got.count(tok.bos_id) == got.count(tok.eos_id) == len(docs)
    assert tokens.shape[1] == 32 and (lengths[:-1] == 32).all() and 0 < lengths[-1] <= 32
    assert not mask[:, 0].any() and int(mask.sum()) == int(lengths.sum()) - len(lengths)


def test_a_corpus_larger_than_the_memory_budget_streams_through_ray_train(ray_session, tmp_path, tok):
    import ray.data

    from rayllama.train.stages import run_pretrain_stream

    docs = corpus(3000, seed=2)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    budget_mb = 0.25
    corpus_bytes = path.stat().st_size
    assert corpus_bytes > 3 * budget_mb * 1024 * 1024, corpus_bytes
    data = DataSection(pretrain=[DataSource(path=str(path), format="text")], heldout_fraction=0.02,
                       stream_memory_mb=budget_mb)
    kept = [d for d in docs if not stream.is_heldout(d, data.heldout_fraction)]
    corpus_tokens = sum(len(tok.encode(d)) + 2 for d in kept)

    cfg = PipelineConfig(stages=["pretrain"], run_dir=str(tmp_path / "run"), data=data)
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.ffn_dim = 32, 1, 4, 2, 64
    p = cfg.pretrain
    p.seq_len, p.batch_size, p.micro_batch_size, p.log_every, p.checkpoint_every = 255, 64, 32, 10, 1000
    p.optim = OptimConfig(lr=1e-3)
    rows_per_epoch = corpus_tokens / (p.seq_len + 1)
    p.steps = int(1.3 * rows_per_epoch / p.batch_size) + 1  # more than one epoch: the stream is read again
    cfg.scaling.num_workers = 2
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    try:
        dataset = stream.pretrain_dataset(data, tok, p.seq_len, cfg.seed, memory_mb=budget_mb)
        heldout = stream.collect_heldout(data, cfg.seed, max_chars=20_000)
        result = run_pretrain_stream(cfg, tmp_path / "run", tok, dataset, heldout)
    finally:
        ctx.execution_options.resource_limits = limits
    seen = result["tokens_seen"]
    # every step took batch_size rows; rows are full but for each block's last one
    assert seen > corpus_tokens, (seen, corpus_tokens)
    assert seen <= p.steps * p.batch_size * (p.seq_len + 1)
    assert heldout and all(stream.is_heldout(d, data.heldout_fraction) for d in heldout)
    print(f"corpus {corpus_bytes / 1e6:.2f} MB, {corpus_tokens} tokens, budget {budget_mb} MB, "
          f"{p.steps} steps, {seen} tokens seen")


def store_bytes() -> int:
    """Bytes in use in the local Ray object store (what `ray memory --stats-only` prints)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "parquet"])
def test_the_object_store_holds_about_the_memory_budget_not_the_corpus(ray_session, tmp_path, tok, suffix):
    """A consumer slower than the packer: Ray Data runs ahead only until data.stream_memory_mb is in use (with Ray
    Data's default 128 MiB blocks the read task and the packer each built one block of the whole file). A .gz or
    Parquet file is one read task (no byte ranges): with the packer as a separate operator its text blocks piled up before it
    (11.2 MB here, growing with the corpus)."""
    import gzip
    import time

    import ray.data

    docs = corpus(30000, seed=3)
    path = tmp_path / f"big.{suffix}"
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    if suffix == "parquet":  # read a record batch at a time
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path, row_group_size=1000)
    else:
        with (gzip.open(path, "wt") if suffix.endswith(".gz") else open(path, "w")) as f:
            f.write(text)
    budget_mb = 1.0
    corpus_bytes = len(text.encode())
    assert corpus_bytes > 8 * budget_mb * 1024 * 1024, corpus_bytes
    data = DataSection(pretrain=[DataSource(path=str(path), format="text")], stream_memory_mb=budget_mb)
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    base = store_bytes()
    peak, rows = 0, 0
    try:
        dataset = stream.pretrain_dataset(data, tok, 127, 0, memory_mb=budget_mb)
        for batch in dataset.iter_batches(batch_size=64):
            rows += len(batch["tokens"])
            peak = max(peak, store_bytes() - base)
            if rows >= 3000:  # about a third of the corpus's rows of 128 tokens
                break
            time.sleep(0.02)
    finally:
        ctx.execution_options.resource_limits = limits
    print(f"corpus {corpus_bytes / 1e6:.1f} MB, budget {budget_mb} MB: object store peak {peak / 1e6:.2f} MB over "
          f"{rows} rows")
    assert rows >= 3000
    assert peak < 6 * budget_mb * 1024 * 1024, peak  # the whole corpus before byte ranges and small blocks


@pytest.mark.parametrize("range_bytes", [1, 7, 64, 1000, 10**6])
def test_byte_ranges_read_every_line_once(tmp_path, range_bytes):
    from rayllama.data import sources

    docs = corpus(40, seed=4) + ["", "ünïcode line", "last line without newline"]
    path = tmp_path / "t.jsonl"
    path.write_bytes(("\n".join(json.dumps({"text": d}) for d in docs[:-1]) + "\r\n\n" +
                      json.dumps({"text": docs[-1]})).encode())
    size = path.stat().st_size
    rows = [r for a in range(0, size, range_bytes)
            for r in sources.iter_file_rows(str(path), (a, min(a + range_bytes, size)))]
    assert rows == list(sources.iter_file_rows(str(path)))
    assert [r["text"] for r in rows] == docs
