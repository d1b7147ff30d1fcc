"""rayllama.storage against a real S3-API server (moto's, started here): a directory on an object store is complete
only once its marker, written last, exists; data sources read from s3://; and a Ray Train job whose data, starting
checkpoint, Ray Train checkpoints, metrics and output model all live in the bucket trains and writes its model
there (every worker reads the run's storage, not a driver-local path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayllama import storage

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def bucket():
    """s3://test-bucket on a moto server at 127.0.0.1:<free port>, its options in the URI (so Ray workers get
    them with the path). The server runs in its own process: moto's in-process server imports Flask, whose
    request-context proxies make vLLM's kernel registration (it scans every module's globals) fail later in the
    same test session."""
    import importlib.util
    import socket
    import subprocess
    import sys
    import time

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("moto[server] (moto and flask) is not installed; it provides the S3-API server these tests use")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's S3 server did not start on port {port}") from None
                time.sleep(0.2)
        opts = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        root = f"s3://testing:testing@test-bucket?{opts}"
        import pyarrow.fs as pafs

        pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=f"127.0.0.1:{port}",
                          scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir("test-bucket")
        yield root
    finally:
        server.terminate()
        server.wait(timeout=30)


def uri(root: str, *parts: str) -> str:
    return storage.join(root, *parts)


def objects(root: str, prefix: str) -> list[str]:
    return [storage.relative(f, uri(root, prefix)) for f in storage.list_files(uri(root, prefix))]


def test_paths_and_uris():
    assert not storage.is_uri("runs/x") and not storage.is_uri("file:///tmp/x") and storage.is_uri("s3://b/k")
    assert storage.join("s3://b/run?region=x", "sft", "model") == "s3://b/run/sft/model?region=x"
    assert storage.filesystem("file:///tmp/x")[1] == "/tmp/x"
    with pytest.raises(storage.StorageError, match="cannot open storage s3://b/k: .*check the URI"):
        storage.filesystem("s3://b/k?no_such_option=1")


def test_a_directory_is_complete_only_with_its_marker(bucket, tmp_path):
    local = tmp_path / "ckpt"
    (local / "sub").mkdir(parents=True)
    (local / "config.json").write_text("{}")
    (local / "sub" / "w.bin").write_bytes(b"x" * 1000)
    dest = uri(bucket, "ckpt")
    storage.write_bytes(uri(bucket, "ckpt", "config.json"), b"{}")  # a half-finished upload
    assert not storage.is_complete_dir(dest)
    with pytest.raises(storage.StorageError, match="no COMPLETE marker"):
        storage.download_dir(dest, tmp_path / "down")
    assert not (tmp_path / "down").exists()  # nothing half-written stays
    storage.upload_dir(local, dest)
    assert storage.is_complete_dir(dest)
    got = storage.download_dir(dest, tmp_path / "down")
    assert (got / "sub" / "w.bin").read_bytes() == b"x" * 1000 and not (got / storage.COMPLETE_MARKER).exists()


def test_a_data_source_on_s3_reads_as_the_local_file(bucket):
    from rayllama.config import DataSource
    from rayllama.data import sources

    storage.write_bytes(uri(bucket, "data", "train.jsonl"), (FIXTURES / "preference.jsonl").read_bytes())
    got = list(sources.iter_source(DataSource(path=uri(bucket, "data"), format="preference"), "preference",
                                   "data.preference[0]", sources.SourceStats("s3")))
    want = list(sources.iter_source(DataSource(path=str(FIXTURES / "preference.jsonl"), format="preference"),
                                    "preference", "data.preference[0]", sources.SourceStats("local")))
    assert [(r.prompt, r.chosen, r.rejected) for r in got] == [(r.prompt, r.chosen, r.rejected) for r in want]


def test_a_ray_train_job_reads_and_writes_only_the_bucket(ray_session, bucket, tmp_path):
    from rayllama.checkpoint import load_model, save_model
    from rayllama.config import OptimConfig, ScalingSection
    from rayllama.model import ModelConfig, Transformer
    from rayllama.train.loop import TrainJob, run_train_job, train_run_name

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64, max_seq_len=32)
    torch.manual_seed(0)
    save_model(tmp_path / "init", Transformer(cfg), cfg)
    storage.upload_dir(tmp_path / "init", uri(bucket, "init"))
    tokens = torch.randint(3, 64, (16, 17))
    data = {"tokens": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.bool),
            "lengths": torch.full((16,), 17)}
    buf = __import__("io").BytesIO()
    torch.save(data, buf)
    storage.write_bytes(uri(bucket, "run", "data", "sft.pt"), buf.getvalue())
    before = set(Path(tmp_path).rglob("*"))

    job = TrainJob(stage="sft", objective="lm", data_path=uri(bucket, "run", "data", "sft.pt"),
                   output=uri(bucket, "run", "sft", "model"), log_dir=uri(bucket, "run", "sft"),
                   optim=OptimConfig(lr=1e-3), total_steps=4, batch_size=4, micro_batch_size=4,
                   init=uri(bucket, "init"), checkpoint_every=2, log_every=1, strategy="ddp")
    run_train_job(job, ScalingSection(num_workers=1, cpus_per_worker=0.5))

    assert set(Path(tmp_path).rglob("*")) == before  # nothing new in the local run area
    assert storage.is_complete_dir(job.output)
    model_files = objects(bucket, "run/sft/model")
    assert {"config.json", "model.safetensors", "rayllama.json", storage.COMPLETE_MARKER} <= set(model_files)
    train_files = objects(bucket, "run/sft")
    assert "metrics.jsonl" in train_files
    run_name = train_run_name(job)  # Ray Train's run (its checkpoints' dir): the stage, outside a run dir
    assert any(f.startswith(f"{run_name}/checkpoint_") for f in train_files), train_files  # in the bucket
    rows = [json.loads(line) for line in storage.read_bytes(uri(bucket, "run", "sft", "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    model, _, meta = load_model(storage.download_dir(job.output, tmp_path / "out"))
    assert meta["step"] == 4
    start, _, _ = load_model(tmp_path / "init")
    assert not torch.equal(model.state_dict()["model.embed_tokens.weight"],
                           start.state_dict()["model.embed_tokens.weight"])  # it trained from the bucket's init


def test_init_from_a_uri_is_checked_and_gives_the_tokenizer(bucket, tmp_path):
    """sft.init_from=s3://...: the driver verifies the checkpoint in the bucket (a local copy, made once, from a
    complete upload) and takes its tokenizer.model; the Ray Train job gets the URI itself (each worker copies it)."""
    from test_byo import hf_llama_dir

    from rayllama.config import load_config
    from rayllama.driver import RunDir
    from rayllama.pipeline import Pipeline

    storage.upload_dir(hf_llama_dir(tmp_path), uri(bucket, "models", "llama"))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "byo.yaml",
                      [f"run_dir={tmp_path / 'run'}", f"sft.init_from={uri(bucket, 'models', 'llama')}"])
    cfg.data.sft[0].path = str(FIXTURES / "messages.jsonl")
    for kind in ("sft", "preference", "prompts", "eval_prompts"):
        for src in getattr(cfg.data, kind):
            src.path = str(FIXTURES / Path(src.path).name)
    pipeline = Pipeline(cfg, RunDir(cfg))
    pipeline.check_inputs()
    assert pipeline.init_source("sft") == cfg.sft.init_from  # workers read the bucket, not the driver's copy
    assert pipeline.tok.vocab_size == 420
    assert pipeline.run.tokenizer.read_bytes() == (tmp_path / "hf-llama" / "tokenizer.model").read_bytes()
