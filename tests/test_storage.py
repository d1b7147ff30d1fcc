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


def test_the_endpoint_serves_a_checkpoint_on_s3(bucket, tmp_path):
    """serve's model_dir=s3://...: checked by its marker before Ray starts (an unfinished upload is one line),
    each replica copies it to its node once (copies asked for at once end as one), and the endpoint's engine
    answers as the local checkpoint does."""
    import asyncio
    import threading

    from test_byo import hf_llama_dir

    from rayllama.engines import make_torch_engine
    from rayllama.generation import SamplingParams
    from serve.app import make_engine
    from serve.config import ServeConfig
    from serve.preflight import ServeError, check_checkpoint

    local = hf_llama_dir(tmp_path)
    model = uri(bucket, "serve", "model")
    storage.upload_dir(local, model)
    unfinished = uri(bucket, "serve", "unfinished")
    storage.upload_files(local, unfinished)  # no marker
    with pytest.raises(ServeError, match="has no COMPLETE marker") as info:
        check_checkpoint(ServeConfig(model_dir=unfinished))
    assert "\n" not in str(info.value)
    with pytest.raises(ServeError, match="does not exist"):
        check_checkpoint(ServeConfig(model_dir=uri(bucket, "serve", "nothing")))
    cfg = ServeConfig(model_dir=model, torch_threads=1)
    check_checkpoint(cfg)

    copies: list[Path] = []
    threads = [threading.Thread(target=lambda: copies.append(storage.local_dir(model))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(copies)) == 1 and len(copies) == 4
    assert (copies[0] / "tokenizer.model").read_bytes() == (local / "tokenizer.model").read_bytes()
    assert not [p for p in copies[0].parent.iterdir() if ".tmp-" in p.name]  # the losers' copies are gone

    engine, tok, max_seq_len, _ = make_engine(cfg)
    assert tok.vocab_size == 420 and max_seq_len == 256
    prompt = tok.encode("word7 and more", bos=True)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=())

    async def answer() -> list[int]:
        tokens = []
        async for events in engine.open(prompt, params):
            tokens += [e.token for e in events]
        return tokens

    expected = make_torch_engine(local).generate([prompt], params)[0][0].token_ids
    assert asyncio.run(answer()) == expected


def test_rl_checkpoints_on_s3_are_complete_by_marker(bucket):
    """The RL loop's checkpoints in a bucket: the newest one with its COMPLETE marker and a readable state file is
    the one resumed (a newer one without the marker, a killed save, is skipped); pruning keeps the newest
    KEEP_CHECKPOINTS complete ones and drops unmarked ones older than them."""
    from rayllama.rl.loop import KEEP_CHECKPOINTS, checkpoint_dir, latest_checkpoint, prune_checkpoints

    out = uri(bucket, "rl-ckpt", "ppo")
    for it in (1, 2, 3, 4):
        d = checkpoint_dir(out, it)
        storage.write_bytes(storage.join(d, "ppo_state.json"), json.dumps({"iteration": it}).encode())
        if it != 2 and it != 4:
            storage.mark_complete(d)
    assert storage.name_of(latest_checkpoint(out, "ppo_state.json", lambda p: True)) == "iter-0003"
    storage.mark_complete(checkpoint_dir(out, 4))
    storage.write_bytes(storage.join(checkpoint_dir(out, 4), "ppo_state.json"), b"{torn")
    assert storage.name_of(latest_checkpoint(out, "ppo_state.json", lambda p: True)) == "iter-0003"
    storage.write_bytes(storage.join(checkpoint_dir(out, 4), "ppo_state.json"), b'{"iteration": 4}')
    prune_checkpoints(out, "ppo_state.json")
    left = [storage.name_of(d) for d in storage.list_dirs(storage.join(out, "checkpoints"))]
    assert KEEP_CHECKPOINTS == 2 and left == ["iter-0003", "iter-0004"]  # iter-0001 pruned, iter-0002 unmarked


def test_an_rl_checkpoint_is_complete_only_after_the_rows_before_it_are_in_the_store(bucket, monkeypatch):
    """A driver killed the moment an RL checkpoint on S3 is complete must find every metrics row before that
    iteration in the store when it resumes (the checkpoint's own row is in its state file): save_checkpoint puts
    the writer's rows in the store before the COMPLETE marker. (metrics.jsonl is uploaded at most every
    UPLOAD_EVERY_S otherwise, so a row written just before the checkpoint was not there yet.)"""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from rayllama.rl.loop import RLLoop, save_checkpoint
    from rayllama.train.loop import MetricsWriter

    @dataclass
    class NoLearnerLoop(RLLoop):
        """Only what save_checkpoint reads: no learners, no iterations (a call to step or finish fails the test)."""

        kind = "ppo"

        def step(self):
            raise AssertionError("save_checkpoint ran an iteration")

        def finish(self):
            raise AssertionError("save_checkpoint finished the stage")

        @staticmethod
        def learners_complete(path):
            return True

        def save_learners(self, tmp):
            pass

    out = uri(bucket, "rows-first", "ppo")
    loop = NoLearnerLoop(SimpleNamespace(seed=0), None, [], [], None, out, 64)
    writer = MetricsWriter(out, "ppo")
    stored_when_marked = []
    mark_complete = storage.mark_complete

    def marking(path):
        stored_when_marked.append(storage.read_bytes(uri(out, "metrics.jsonl")).decode())
        mark_complete(path)

    monkeypatch.setattr(storage, "mark_complete", marking)
    try:
        for iteration in (1, 2):
            writer.write(iteration - 1, {"iteration": iteration - 1})  # the row before (uploaded at most every 30 s)
            loop.iteration = iteration
            save_checkpoint(loop, writer, {"iteration": iteration})
    finally:
        writer.close()
    steps = [[json.loads(line)["step"] for line in text.splitlines()] for text in stored_when_marked]
    assert steps == [[0], [0, 1]]


# ---------------------------------------------------------------------------------------------- a whole run


CLUSTER_HOST = """
import sys
import ray
from ray.cluster_utils import Cluster

node = dict(num_cpus=2, object_store_memory=150 * 1024 * 1024)
cluster = Cluster(initialize_head=True, head_node_args={**node, "resources": {"node_a": 1}, "include_dashboard": False})
try:
    cluster.add_node(**node, resources={"node_b": 1})
    cluster.wait_for_nodes()
    print("ADDRESS " + cluster.address, flush=True)
    sys.stdin.read()  # until the test closes our stdin
finally:
    cluster.shutdown()
"""

S3_RUN = [
    "stages=[tokenizer,pretrain,sft,reward,ppo]", "name=s3run", "ray.include_dashboard=false",
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "tokenizer.vocab_size=400", "tokenizer.max_train_chars=200000",
    "pretrain.steps=20", "pretrain.checkpoint_every=10", "pretrain.log_every=5",
    "pretrain.batch_size=4", "pretrain.micro_batch_size=2", "pretrain.seq_len=32",
    "sft.epochs=1", "sft.batch_size=8", "sft.micro_batch_size=4",
    "reward.epochs=1", "reward.batch_size=8", "reward.micro_batch_size=4", "reward.policy_pairs=0",
    "ppo.iterations=6", "ppo.checkpoint_every=1", "ppo.prompts_per_iteration=4", "ppo.mini_batch_size=4",
    "ppo.max_new_tokens=8",
    # the learner on one node, the generator on the other: the weights and the checkpoints cross nodes
    "ppo.resources.learner.resources={node_a: 0.1}", "ppo.resources.rollout.resources={node_b: 0.1}",
    "world.pretrain_world=200", "world.sft=40", "world.pref_helpfulness=40", "world.pref_safety=40",
    "world.pref_helpfulness_heldout=20", "world.pref_safety_heldout=20", "world.prompts=20", "world.gatt=4",
    "world.gatt_turns=2", "world.eval_safe=6", "world.eval_unsafe=2", "world.eval_borderline=2", "world.eval_gatt=1",
]


def test_a_pipeline_on_s3_across_two_nodes_resumes_after_the_driver_is_killed(bucket, tmp_path):
    """run_dir=s3://...: the tiny pipeline (tokenizer -> pretrain -> SFT -> reward -> PPO) on a two-node Ray cluster,
    the PPO learner on one node and the generator on the other. The driver is killed (SIGKILL, its process group)
    once PPO has a checkpoint in the bucket and its local working copy is deleted; the same command finishes the
    run from the bucket alone: the finished stages are skipped, PPO resumes from its last checkpoint there. Every
    process (cluster, drivers) gets one TMPDIR: afterwards it holds nothing outside Ray's temp root ($TMPDIR/ray,
    where the node-local caches live), the drivers' working directory is empty, and the repo has no runs/s3run."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    root = Path(__file__).resolve().parents[1]
    run_uri = uri(bucket, "runs", "s3run")
    tmp = Path(tempfile.mkdtemp(prefix="s3r", dir="/tmp"))  # short: Ray's socket paths live under it
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    host = subprocess.Popen([sys.executable, "-c", CLUSTER_HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd, start_new_session=True)

    def driver() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "rayllama.driver", str(root / "configs" / "ppo.yaml"), f"run_dir={run_uri}",
             f"ray.address={address}", *S3_RUN],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, start_new_session=True)

    try:
        line = host.stdout.readline()
        assert line.startswith("ADDRESS "), line
        address = line.split()[1]
        first = driver()
        deadline = time.time() + 900
        checkpoints = uri(run_uri, "ppo", "checkpoints")
        while time.time() < deadline and first.poll() is None:
            if any(storage.is_complete_dir(d) for d in storage.list_dirs(checkpoints)):
                break
            time.sleep(1)
        assert first.poll() is None, f"the driver ended before PPO's first checkpoint:\n{first.stdout.read()}"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        done_before = [storage.name_of(d) for d in storage.list_dirs(checkpoints) if storage.is_complete_dir(d)]
        assert not storage.exists(uri(run_uri, "ppo", "model")), "PPO finished before the kill"
        for p in (tmp / "ray" / "rayllama" / "runs").glob("*"):
            shutil.rmtree(p)  # the killed driver's working copy: the bucket alone must be enough

        second = driver()
        out, _ = second.communicate(timeout=900)
        assert second.returncode == 0, out
    finally:
        host.stdin.close()
        try:
            host.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(host.pid, signal.SIGKILL)

    for stage in ("pretrain", "sft"):
        assert f"{stage}: complete, skipped" in out
    assert "reward-helpfulness: complete, skipped" in out and "reward-safety: complete, skipped" in out
    rows = [json.loads(line) for line in storage.read_bytes(uri(run_uri, "ppo", "metrics.jsonl")).splitlines()]
    resumed = [r["resumed_from"] for r in rows if "resumed_from" in r]
    assert resumed[-1] == int(done_before[-1].split("-")[1]) >= 1, (resumed, done_before)  # from the bucket
    assert sorted(r["step"] for r in rows if "reward/combined" in r) == list(range(1, 7))  # each iteration once
    for model in ("pretrain", "sft", "reward/helpfulness", "reward/safety", "ppo"):
        assert storage.is_complete_dir(uri(run_uri, *model.split("/"), "model")), model
    results = json.loads(storage.read_bytes(uri(run_uri, "eval.json")))
    assert {"sft", "ppo", "reward-helpfulness"} <= set(results) and "gold_helpfulness" in results["ppo"]
    files = set(objects(bucket, "runs/s3run"))
    assert {"config.yaml", "driver.log", "report.md", "tokenizer/tokenizer.model"} <= files
    assert any(f.startswith("pretrain/s3run-pretrain/checkpoint_") for f in files)  # Ray Train's, in the bucket
    assert "== stage ppo" in storage.read_text(uri(run_uri, "driver.log"))

    assert list(cwd.iterdir()) == []  # nothing in the drivers' working directory
    outside = [p for p in tmp.rglob("*") if p.is_file() and not p.is_relative_to(tmp / "ray")]
    assert outside == [], outside[:10]  # nothing on this machine outside Ray's temp root
    assert not (root / "runs" / "s3run").exists()
    shutil.rmtree(tmp, ignore_errors=True)
