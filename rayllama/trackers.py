"""Where the metrics of `rayllama.train.loop.MetricsWriter` go besides metrics.jsonl: the experiment trackers of
`report_to` (TRL's key: tensorboard, wandb, mlflow, each through its own library) and, while Ray runs, Ray
metrics (gauges the dashboard's metrics view and Prometheus show live).

Every writer finds its run's settings in the run directory: the nearest `config.yaml` above its log dir whose
`run_dir` is that directory (the driver writes it before any stage starts), so a Ray Train worker, an RL loop on
the driver and the pipeline's evaluations all read one file and need no plumbing. A log dir outside a run (a test's
tmp dir) gets TensorBoard only. Each log dir is one tracker run named `<run>-<log dir under the run>`
(tiny-pretrain, tiny-reward-helpfulness, tiny-gatt-round-1, tiny-ppo, tiny-eval), grouped by the run's name, with
the run's whole config attached.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the module it needs (pip extra rayllama[trackers])


@dataclass
class RunSettings:
    """What a writer needs of its run: read from runs/<name>/config.yaml."""

    name: str
    root: Path
    config: dict  # the run's whole resolved config
    log_name: str  # the writer's log dir under the run root, '-' joined ('reward-helpfulness', 'gatt-round-1')
    config_yaml: str = ""  # the file's text (attached to TensorBoard and MLflow)

    @property
    def report_to(self) -> list[str]:
        return list(self.config.get("report_to", ["tensorboard"]))

    @property
    def tracking(self) -> dict:
        return dict(self.config.get("tracking") or {})

    @property
    def run_name(self) -> str:
        return f"{self.name}-{self.log_name}"


def run_settings(log_dir: str | Path, levels: int = 3) -> RunSettings | None:
    """The settings of the run `log_dir` belongs to, or None outside a run (see the module docstring). A log dir
    on an object store (a run whose run_dir is a URI) reads the config.yaml the driver wrote there; its settings'
    root is then this node's scratch copy of the run (rayllama.storage.cache_dir), where wandb / MLflow keep files."""
    import yaml

    from rayllama import storage

    if storage.is_uri(log_dir):
        roots = [str(log_dir)]
        for _ in range(levels):
            roots.append(storage.parent(roots[-1]))
    else:
        log_dir = Path(log_dir).absolute()
        roots = [str(r) for r in [log_dir, *log_dir.parents][: levels + 1]]
    for root in roots:
        path = storage.join(root, "config.yaml")
        if not storage.is_file(path):
            continue
        try:
            config = yaml.safe_load(storage.read_text(path))
        except (OSError, ValueError, yaml.YAMLError):
            return None
        if not isinstance(config, dict):
            continue
        run_dir = str(config.get("run_dir", ""))
        same = run_dir == root if storage.is_uri(root) else Path(run_dir).absolute() == Path(root)
        if same:
            rel = [part for part in storage.relative(str(log_dir), root).split("/") if part]
            local = storage.cache_dir("runs") / storage.key_of(root) if storage.is_uri(root) else Path(root)
            return RunSettings(name=str(config.get("name", storage.name_of(root))), root=local, config=config,
                               log_name="-".join(rel) or "run", config_yaml=storage.read_text(path))
    return None


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars under `<tag prefix>/<key>` in <log_dir>/tensorboard (`tensorboard --logdir runs/<name>`)."""

    def __init__(self, log_dir: Path, prefix: str, config_yaml: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.prefix = prefix
        self.writer = SummaryWriter(str(log_dir / "tensorboard"))
        if config_yaml:
            self.writer.add_text("config", "```\n" + config_yaml + "\n```")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(f"{self.prefix}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run per log dir (wandb.init with the run's config, grouped by the run's name). The default
    mode, offline, writes runs/<name>/wandb/offline-run-*/ (`wandb sync DIR` uploads it later); `online` needs
    `wandb login` (or WANDB_API_KEY)."""

    def __init__(self, settings: RunSettings):
        import wandb

        t = settings.tracking
        self.run = wandb.init(
            project=t.get("wandb_project") or "rayllama", name=settings.run_name, group=settings.name,
            job_type=settings.log_name, dir=str(settings.root), config=settings.config,
            mode=t.get("wandb_mode") or "offline", reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                    save_code=False),
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    """One MLflow run per log dir in the experiment named after the run (tracking.mlflow_experiment), the config
    as params (flattened keys) and config.yaml as an artifact. Without tracking.mlflow_tracking_uri: MLflow's file
    store at runs/<name>/mlruns (`mlflow ui --backend-store-uri runs/<name>/mlruns`); MLflow 3 keeps that store
    in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which this sets for it (a database or server URI needs
    the full `mlflow` package)."""

    def __init__(self, settings: RunSettings, config_yaml: str | None):
        t = settings.tracking
        uri = t.get("mlflow_tracking_uri")
        if not uri:
            uri = (settings.root / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = t.get("mlflow_experiment") or settings.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=settings.run_name,
                                             tags={"rayllama.run": settings.name,
                                                   "rayllama.stage": settings.log_name}).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(settings.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        if config_yaml:
            self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_trackers(log_dir: str | Path, stage: str, local_dir: Path | None = None) -> list[Tracker]:
    """The trackers of `report_to` for a writer at `log_dir` (TensorBoard alone outside a run), plus Ray
    metrics while Ray runs. TensorBoard writes under `local_dir` (default: log_dir; the scratch copy of a log dir
    on an object store)."""
    settings = run_settings(log_dir)
    config_yaml = settings.config_yaml if settings else None
    report_to = settings.report_to if settings else ["tensorboard"]
    trackers: list[Tracker] = []
    for name in report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(local_dir or Path(log_dir), stage, config_yaml))
        elif name == "wandb" and settings:
            trackers.append(WandbTracker(settings))
        elif name == "mlflow" and settings:
            trackers.append(MLflowTracker(settings, config_yaml))
    ray_metrics = RayMetrics.open(settings.name if settings else "", stage)
    if ray_metrics is not None:
        trackers.append(ray_metrics)
    return trackers


def scalars_of(metrics: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (bools and strings are for metrics.jsonl only)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


# ----------------------------------------------------------------------------------------------- Ray metrics


class RayMetrics:
    """Every scalar as a `ray.util.metrics.Gauge` named `rayllama_<key>` (non-alphanumerics as '_'; e.g.
    rayllama_reward_combined, rayllama_kl, rayllama_timing_generate, rayllama_weight_version) tagged with the run
    and the stage, plus `rayllama_step` (the stage's last logged step), `rayllama_progress` (step / total when the
    writer knows the total) and the counter `rayllama_rows_total`. Ray exports them from every process (the Ray
    Train worker, the driver) to its metrics agent: Prometheus scrapes them and the dashboard's metrics view
    plots them while the run goes."""

    _gauges: dict[str, Any] = {}  # one Gauge per name per process (Ray registers a name once)
    _counter: Any = None
    TAGS = ("run", "stage")

    def __init__(self, run: str, stage: str):
        self.tags = {"run": run or "-", "stage": stage}
        self.total_steps: int | None = None

    @classmethod
    def open(cls, run: str, stage: str) -> RayMetrics | None:
        try:
            import ray
        except ImportError:
            return None
        return cls(run, stage) if ray.is_initialized() else None

    @staticmethod
    def metric_name(key: str) -> str:
        return "rayllama_" + re.sub(r"[^A-Za-z0-9_]", "_", key).strip("_")

    def _gauge(self, name: str, description: str):
        from ray.util.metrics import Gauge

        if name not in RayMetrics._gauges:
            RayMetrics._gauges[name] = Gauge(name, description=description, tag_keys=self.TAGS)
        return RayMetrics._gauges[name]

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from ray.util.metrics import Counter

        for k, v in scalars.items():
            self._gauge(self.metric_name(k), f"rayllama metric '{k}'").set(v, tags=self.tags)
        self._gauge("rayllama_step", "the stage's last logged step").set(step, tags=self.tags)
        if self.total_steps:
            self._gauge("rayllama_progress", "step / total steps of the stage").set(
                step / self.total_steps, tags=self.tags)
        if RayMetrics._counter is None:
            RayMetrics._counter = Counter("rayllama_rows_total", description="metrics rows written",
                                          tag_keys=self.TAGS)
        RayMetrics._counter.inc(1, tags=self.tags)

    def close(self) -> None:
        pass
