"""Pretraining text streamed through Ray Data into Ray Train, so that no process holds a whole corpus.

    data.pretrain sources --read tasks (one per byte range of a file and repeat; rayllama.data.sources' adapters,
    BLOCK_DOCS documents at a time, tokenized and packed in the task)--> {"tokens", "loss_mask", "lengths"} rows
    of seq_len + 1 --streaming_split (Ray Train's DataConfig)--> ray.train.get_dataset_shard("train") on every worker

Packing (as rayllama.train.data.pack_texts): every document is `<s> text </s>`, documents are concatenated and cut
into rows of seq_len + 1 tokens; a batch's last, shorter row is padded (lengths says how far it is real), so every
token of the corpus is trained on once per epoch and a row never mixes two batches. Documents are whole in a
stream: bos and eos mark where each starts and ends.

Weights: a source of weight w is read int(w) times, plus once keeping a seeded hash-chosen w - int(w) share of its
documents. Held-out documents (data.heldout_fraction, chosen by the hash of their text as in
sources.heldout_split) never enter the stream; `collect_heldout` gathers a bounded number of them for perplexity.
Drops (empty / malformed rows) are counted per source by a small actor the read tasks report to.

Memory: data.stream_memory_mb is Ray Data's object store budget. Ray Data throttles in whole blocks, whole task
launches and, for a running task, by not reading its next output (its generator then pauses), so the stream keeps
blocks small (at most an eighth of the budget, 64 KiB .. 1 MiB, block_bytes; Ray Data's default, 128 MiB, made a
task build one block of a whole file), reads an uncompressed .jsonl / .txt file in byte ranges of a quarter of the
budget (128 KiB .. 2 MiB), one read task each, and tokenizes and packs in the read task itself. Other files (.gz, a
JSON array, .parquet, .arrow) are read by one task each, streamed (gzip line by line, a JSON array item by item,
Parquet and Arrow a record batch at a time). With a separate packer operator (map_batches), such a task's text
blocks were read out of it as fast as it made them and queued before the packer, which Ray Data's budget did not
stop: a slow consumer of a .jsonl.gz file saw the object store grow with the corpus (11.2 MB for 10.3 MB of text,
30.5 MB for 30.8 MB; tests/test_stream.py now holds it under 6 MB for either). The tokenizer reaches the tasks
once, through the object store (ray.put), not inside every read task. Measured (bench/stream_pretrain.py, a
0.106 GB JSONL corpus, --fraction 0.1, budget 32 MB, loaded 2-core machine, with the byte ranges and small
blocks, before the packing moved into the read tasks): object store peak 353 -> 33 MB, packer peak RSS 1104 (601
private) -> 435 (253) MB, read task 583 (387) -> 419 (249) MB.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from rayllama.data import sources

BLOCK_DOCS = 256  # documents per table a read task yields (and per packed batch)
BLOCK_BYTES = 1024 * 1024  # the most bytes a block of the stream holds (Ray Data's default: 128 MiB)
STREAM = "ray-data:train"  # TrainJob.data_path of a job whose rows come from its Ray Data shard "train"


def _unit(text: str, salt: str) -> float:
    return int(hashlib.sha1((salt + text).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def is_heldout(text: str, fraction: float) -> bool:
    """The same rule as sources.heldout_split (hash of the document text), for one document in a stream."""
    return fraction > 0 and sources.heldout_key(text) < fraction


def read_plan(data, range_bytes: int | None = None) -> list[tuple[str, object, str, float, bool, tuple | None]]:
    """(label, source, file, keep share, counts, byte range) per read task: int(weight) full passes and one partial
    pass; only the first full pass over a file counts its rows and drops (the others re-read the same rows). A
    splittable file (uncompressed .jsonl / .txt) is read in byte ranges of range_bytes, one read task each; other
    files whole (byte range None)."""
    plan = []
    for i, src in enumerate(data.pretrain):
        label = f"data.pretrain[{i}]"
        files = sources.source_files(src.path, src.split, f"{label} ({src.path})")
        parts = []
        for f in files:
            size = sources.file_size(f) if range_bytes and sources.splittable(f) else 0
            parts += [(f, (a, min(a + range_bytes, size))) for a in range(0, size, range_bytes)] if size else [(f, None)]
        shares = [1.0] * int(src.weight) + ([src.weight - int(src.weight)] if src.weight % 1 else [])
        plan += [(label, src, f, share, k == 0 and share == 1.0, part) for k, share in enumerate(shares)
                 for f, part in parts]
    return plan


@functools.cache
def _counter_class():
    import ray

    @ray.remote(num_cpus=0)
    class DropCounter:
        """Rows and drops per source. A read task reports its running totals for its file after every block; the
        counter keeps the furthest report per file, so a file read again in the next epoch is not counted twice
        and a stream stopped midway counts what it read."""

        def __init__(self) -> None:
            self.files: dict[tuple[str, str], dict] = {}

        def report(self, name: str, file: str, totals: dict) -> None:
            key = (name, file)
            if totals["rows"] >= self.files.get(key, {"rows": -1})["rows"]:
                self.files[key] = totals

        def get(self) -> dict:
            out: dict[str, dict] = {}
            for (name, _), t in sorted(self.files.items()):
                s = out.setdefault(name, {"rows": 0, "kept": 0, "dropped": {}, "examples": {}})
                s["rows"] += t["rows"]
                s["kept"] += t["kept"]
                for k, v in t["dropped"].items():
                    s["dropped"][k] = s["dropped"].get(k, 0) + v
                for k, v in t["examples"].items():
                    s["examples"].setdefault(k, v)
            return out

    return DropCounter


def drop_counter():
    return _counter_class().remote()


_PACKERS: dict[tuple[str, int], TokenizePack] = {}  # per process: (tokenizer object ref, seq_len) -> packer


def _packer(tok_ref, seq_len: int) -> TokenizePack:
    key = (tok_ref.hex(), seq_len)
    if key not in _PACKERS:
        import ray

        _PACKERS[key] = TokenizePack(ray.get(tok_ref), seq_len)
    return _PACKERS[key]


def _read_fn(label: str, src, file: str, share: float, counts: bool, part: tuple | None, heldout_fraction: float,
             seed: int, counter, tok_ref, seq_len: int):
    def read() -> Iterator:
        from ray.data.block import BlockAccessor

        pack = _packer(tok_ref, seq_len)
        one = dataclasses.replace(src, path=file)
        st = sources.SourceStats(f"{label} ({src.path})")
        texts: list[str] = []
        key = file if part is None else f"{file}@{part[0]}"  # the counter's unit: a file or a byte range of one

        def report() -> None:
            if counter is not None and counts:
                counter.report.remote(st.name, key, {"rows": st.rows, "kept": st.kept, "dropped": dict(st.dropped),
                                                     "examples": dict(st.examples)})

        for rec in sources.iter_source(one, "pretrain", label, st, seed, byte_range=part):
            if is_heldout(rec.text, heldout_fraction):
                continue
            if share < 1.0 and _unit(rec.text, f"{seed}:{label}") >= share:
                continue
            texts.append(rec.text)
            if len(texts) >= BLOCK_DOCS:
                report()
                yield BlockAccessor.batch_to_block(pack({"text": texts}))
                texts = []
        report()
        if texts:
            yield BlockAccessor.batch_to_block(pack({"text": texts}))
    return read


def block_bytes(memory_mb: float | None) -> int:
    """The most bytes a block of the stream holds: an eighth of the memory budget, within 64 KiB .. BLOCK_BYTES."""
    return BLOCK_BYTES if not memory_mb else int(min(BLOCK_BYTES, max(64 * 1024, memory_mb * 1024 * 1024 / 8)))


def pretrain_dataset(data, tok, seq_len: int, seed: int, counter=None, memory_mb: float | None = None):
    """The Ray Data dataset of packed pretraining rows over data.pretrain (see the module docstring)."""
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    plan = read_plan(data, range_bytes=2 * block_bytes(memory_mb))
    tok_ref = ray.put(tok)  # once, not inside each of the (possibly thousands of) read tasks

    class PretrainText(Datasource):
        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
            return [ReadTask(_read_fn(label, src, f, share, counts, part, data.heldout_fraction, seed, counter,
                                      tok_ref, seq_len),
                             BlockMetadata(None, None, (f,), None)) for label, src, f, share, counts, part in plan]

        def estimate_inmemory_data_size(self):
            return None

        def get_name(self) -> str:
            return "PretrainText"

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the data order is a function of the seed: a resume skips rows
    if memory_mb:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=int(memory_mb * 1024 * 1024))
    # fractional CPUs: the read tasks share the machine with the Ray Train workers they feed
    ds = ray.data.read_datasource(PretrainText(), override_num_blocks=len(plan), ray_remote_args={"num_cpus": 0.25})
    # small blocks: Ray Data's backpressure works in whole blocks, and its default block (128 MiB) is a whole file
    ds.context.target_max_block_size = block_bytes(memory_mb)
    return ds


class TokenizePack:
    """`<s> text </s>` per document, concatenated and cut into rows of seq_len + 1 (the last one padded)."""

    def __init__(self, tok, seq_len: int) -> None:
        self.tok, self.row = tok, seq_len + 1

    def __call__(self, batch: dict) -> dict:
        stream: list[int] = []
        for text in batch["text"]:
            stream.extend(self.tok.encode(str(text), bos=True, eos=True))
        n = -(-len(stream) // self.row)
        tokens = np.zeros((n, self.row), dtype=np.int64)  # (N, L), right-padded with 0
        flat = np.asarray(stream, dtype=np.int64)
        tokens.reshape(-1)[: len(flat)] = flat
        lengths = np.full(n, self.row, dtype=np.int64)
        lengths[-1] = len(flat) - (n - 1) * self.row
        loss_mask = np.arange(self.row)[None, :] < lengths[:, None]
        loss_mask[:, 0] = False  # the first token of a row is never a target
        return {"tokens": tokens, "loss_mask": loss_mask, "lengths": lengths}


def collect_heldout(data, seed: int, max_chars: int) -> list[str]:
    """Held-out documents of data.pretrain (the hash rule of is_heldout), read until max_chars: a scan that stops
    early, never a whole corpus in memory."""
    out, used = [], 0
    for i, src in enumerate(data.pretrain):
        st = sources.SourceStats(f"data.pretrain[{i}] ({src.path})")
        for rec in sources.iter_source(src, "pretrain", f"data.pretrain[{i}]", st, seed):
            if is_heldout(rec.text, data.heldout_fraction):
                out.append(rec.text)
                used += len(rec.text)
                if used >= max_chars:
                    return out
    return out


def precheck(data, seed: int, rows: int = 1000) -> list[sources.SourceStats]:
    """The first `rows` rows of every pretraining source read on the driver before training: a wrong format,
    a missing column or too many drops stop the stage now, not after a long run (sources.check_drops)."""
    stats = []
    for i, src in enumerate(data.pretrain):
        st = sources.SourceStats(f"data.pretrain[{i}] ({src.path})")
        for _ in sources.iter_source(src, "pretrain", f"data.pretrain[{i}]", st, seed):
            if st.rows >= rows:
                break
        sources.check_drops(st, data.max_drop_fraction)
        stats.append(st)
    return stats


def stream_rows(job, start_step: int, world: int) -> Iterator[tuple[dict, list[torch.Tensor]]]:
    """Worker side: this rank's rows of each step from its Ray Data shard, epoch after epoch: (a dict of
    tokens / loss_mask / lengths tensors of batch_size // world rows, its micro-batch index lists). A resumed
    run skips the rows the steps before start_step used (the stream order is fixed: preserve_order)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    per_rank = job.batch_size // world
    skip = start_step
    micro = list(torch.arange(per_rank).split(job.micro_batch_size))
    while True:
        seen = False
        for batch in shard.iter_torch_batches(batch_size=per_rank, drop_last=True):
            seen = True
            if skip:
                skip -= 1
                continue
            yield {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"].bool(),
                   "lengths": batch["lengths"]}, micro
        if not seen:
            raise ValueError(f"{job.stage}: the pretraining stream has fewer than batch_size / workers = {per_rank} "
                             f"rows per worker; add text or lower pretrain.batch_size")
