"""report_to trackers (TensorBoard, wandb offline, MLflow's file store) and Ray metrics: every stage's metrics, the
evaluations and the config reach each tracker, read back from its own files; the gauges reach Ray's metrics
endpoint; Ray Train runs are named <run>-<stage>."""

from __future__ import annotations

import json
import struct
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from rayllama.config import OptimConfig, ScalingSection, load_config, to_yaml
from rayllama.model import ModelConfig
from rayllama.train.data import save_tensors
from rayllama.train.loop import MetricsWriter, TrainJob, run_train_job

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install 'rayllama[trackers]')")
mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'rayllama[trackers]')")

SMALL = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=64, max_seq_len=16)


def make_run(root: Path, *report_to: str) -> Path:
    """A run dir as the driver leaves it before the first stage: config.yaml with an absolute run_dir."""
    run = root / "run"
    run.mkdir(parents=True)
    cfg = load_config(None, [f"run_dir={run}", "name=trk", f"report_to=[{','.join(report_to)}]"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


# ---------------------------------------------------------------------------------------------- reading back


def wandb_records(path: Path):
    """The records of a wandb transaction log (run-*.wandb: a ':W&B' header, then LevelDB-log framed protobufs in
    32 KiB blocks), as wandb's own protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(run: Path) -> dict[str, dict]:
    """wandb run name -> {'history': {key: [(step, value)]}, 'config': {key: value}, 'group': ...}."""
    out = {}
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        info: dict = {"history": {}, "config": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info["name"], info["group"] = record.run.display_name, record.run.run_group
                info["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for k, v in row.items():
                    if not k.startswith("_"):
                        info["history"].setdefault(k, []).append((row["_step"], v))
        out[info["name"]] = info
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_runs(run: Path) -> dict[str, tuple]:
    """MLflow run name -> (run, {metric: [(step, value)]}) from the file store at run/mlruns."""
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("trk")
    out = {}
    for r in client.search_runs([experiment.experiment_id]):
        history = {k: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}
        out[r.info.run_name] = (r, history)
    return out


def last_rows(path: Path) -> dict[str, tuple[int, float]]:
    """key -> (step, value) of the last metrics.jsonl row holding each numeric key."""
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = (row["step"], float(v))
    return out


# ---------------------------------------------------------------------------------------------- the tests


def test_every_stage_reaches_every_tracker(ray_session, tmp_path):
    """A Ray Train stage (rank 0 writes in its worker), an RL-loop-like writer on the driver and the pipeline's
    evaluations, each read back from TensorBoard's event files, wandb's offline run files and MLflow's store."""
    from rayllama.driver import RunDir
    from rayllama.pipeline import Pipeline

    run = make_run(tmp_path, "tensorboard", "wandb", "mlflow")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 64, (8, 12), generator=g)
    save_tensors(run / "data.pt", {"tokens": tokens, "loss_mask": torch.ones(8, 12, dtype=torch.bool),
                                   "lengths": torch.full((8,), 12)})
    job = TrainJob(stage="pretrain", objective="lm", data_path=str(run / "data.pt"), output=str(run / "pretrain/model"),
                   log_dir=str(run / "pretrain"), optim=OptimConfig(lr=1e-2, schedule="constant"), total_steps=3,
                   batch_size=4, micro_batch_size=2, model=SMALL, log_every=1)
    run_train_job(job, ScalingSection(num_workers=1, cpus_per_worker=0.5))
    assert (run / "pretrain" / "trk-pretrain").is_dir()  # Ray Train's run is named <run>-<stage>

    ppo = MetricsWriter(str(run / "ppo"), "ppo")  # what run_ppo opens for its iterations
    for it in (1, 2):
        ppo.write(it, {"reward/combined": 0.1 * it, "kl": 0.01 * it, "timing/rollout": 1.5, "note": "text"})
    ppo.close()

    pipeline = Pipeline.__new__(Pipeline)  # only the evaluation bookkeeping: no data, no stages
    pipeline.cfg, pipeline.run, pipeline.results = load_config(run / "config.yaml"), RunDir(
        load_config(run / "config.yaml")), {}
    pipeline._record("sft", {"gold_helpfulness": 0.25, "refusal_rate_unsafe": 0.5})
    pipeline._record("reward-safety", {"rm_accuracy": 0.75})
    pipeline.close_trackers()

    expected = {
        "pretrain": {k: v for k, v in last_rows(run / "pretrain" / "metrics.jsonl").items() if k != "resumed_from"},
        "ppo": last_rows(run / "ppo" / "metrics.jsonl"),
        "eval": {"sft/gold_helpfulness": (2, 0.25), "sft/refusal_rate_unsafe": (2, 0.5),
                 "reward-safety/rm_accuracy": (3, 0.75)},
    }
    assert {"loss", "lr", "grad_norm", "items_per_s"} <= set(expected["pretrain"]) and expected["pretrain"]["loss"][0] == 3
    assert expected["ppo"]["reward/combined"] == (2, pytest.approx(0.2))

    w, m = wandb_runs(run), mlflow_runs(run)
    assert set(w) == set(m) == {"trk-pretrain", "trk-ppo", "trk-eval"}
    for stage, metrics in expected.items():
        tb = tensorboard_scalars(run / stage)
        wb, (ml_run, ml) = w[f"trk-{stage}"], m[f"trk-{stage}"]
        for key, (step, value) in metrics.items():
            assert tb[f"{stage}/{key}"][-1] == (step, pytest.approx(value)), (stage, key)
            assert wb["history"][key][-1] == (step, pytest.approx(value)), (stage, key)
            assert ml[key][-1] == (step, pytest.approx(value)), (stage, key)
        # the run's config travels with every tracker run
        assert wb["group"] == "trk" and wb["config"]["ppo"]["kl_beta"] == 0.01
        assert ml_run.data.params["ppo.kl_beta"] == "0.01" and ml_run.data.params["report_to"] == \
            "['tensorboard', 'wandb', 'mlflow']"


def test_outside_a_run_only_tensorboard(tmp_path):
    writer = MetricsWriter(str(tmp_path / "logs"), "x")
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert tensorboard_scalars(tmp_path / "logs") == {"x/loss": [(1, 1.0)]}
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "mlruns").exists()


def test_report_to_mistakes_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    from rayllama.config import ConfigError, check_files

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    with pytest.raises(ConfigError, match=r"report_to lists wandb, but the wandb package is not installed; pip "
                                          r"install 'rayllama\[trackers\]'"):
        check_files(load_config(None, ["report_to=[tensorboard,wandb]"]))

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "vllm" else find_spec(name))
    with pytest.raises(ConfigError, match=r"^ppo.engine is vllm, but vLLM is not installed; run `make setup`"):
        check_files(load_config(None, ["stages=[ppo]", "ppo.engine=vllm"]))
    check_files(load_config(None, ["stages=[ppo]", "ppo.engine=torch"]))  # the torch engine needs no vLLM
    with pytest.raises(ConfigError, match="report_to lists 'comet'; accepted: tensorboard, wandb, mlflow"):
        load_config(None, ["report_to=[comet]"])
    with pytest.raises(ConfigError, match="tracking.wandb_mode 'cloud' is not offline or online"):
        load_config(None, ["tracking.wandb_mode=cloud"])
    with pytest.raises(ConfigError, match="log_level 'verbose' is not info or debug"):
        load_config(None, ["log_level=verbose"])


def test_ray_metrics_endpoint_shows_the_gauges(ray_session, tmp_path):
    """What a PPO iteration writes (rewards, KL, phase seconds, weight version, samples/s) appears on the node's
    Prometheus endpoint as rayllama gauges tagged with the run and the stage, with their current values."""
    import ray

    run = make_run(tmp_path, "tensorboard")
    writer = MetricsWriter(str(run / "ppo"), "ppo", total_steps=4)
    row = {"reward/combined": 0.3125, "kl": 0.0625, "timing/rollout": 2.5, "weight_version": 3.0,
           "samples_per_s": 12.5}
    writer.write(2, row)
    writer.close()
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    wanted = {"ray_rayllama_reward_combined": 0.3125, "ray_rayllama_kl": 0.0625, "ray_rayllama_timing_rollout": 2.5,
              "ray_rayllama_weight_version": 3.0, "ray_rayllama_samples_per_s": 12.5, "ray_rayllama_step": 2.0,
              "ray_rayllama_progress": 0.5}
    found: dict[str, float] = {}
    deadline = time.time() + 45  # Ray reports to its metrics agent every ~10 s
    while time.time() < deadline and set(found) != set(wanted):
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and 'run="trk"' in line and 'stage="ppo"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        time.sleep(1)
    assert found == wanted
