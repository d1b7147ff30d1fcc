"""`python -m rayllama.driver CONFIG [key=value ...]`: run the configured stages of the LLaMA 2-Chat pipeline.
(`--help` lists the bundled configs; `--print-config` and `--dry-run`: rayllama.cli.)

    tokenizer -> pretrain -> sft -> reward -> (rejection | ppo) -> gatt

Config and data mistakes stop it before Ray starts, with one line. Each stage writes under `runs/<name>/<stage>/`;
a stage whose output is complete is skipped, so rerunning the same command resumes (a stage interrupted midway
continues from its last Ray Train checkpoint). After each stage the gold judge evaluates the policy and
`runs/<name>/eval.json` collects the results; a summary table ends the run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from rayllama.config import ConfigError, PipelineConfig, check_files, load_config, to_yaml
from rayllama.run_dir import RunDir

log = logging.getLogger("rayllama")
SUMMARY = ("Runs the configured stages of the LLaMA 2-Chat pipeline, each resumable, under runs/<name>/:\n"
           "    tokenizer -> pretrain -> sft -> reward -> (rejection | ppo) -> gatt")
trace = logging.getLogger("rayllama.driver.trace")  # tracebacks of user errors: driver.log only


def user_errors() -> tuple[type[BaseException], ...]:
    """What a stage raises for a mistake or an environment problem the user can fix (a bad checkpoint, data, too
    few resources, an actor that keeps crashing): one line on stderr, the traceback in driver.log. Anything else
    is a bug and keeps its traceback."""
    from actors.group import PlacementError
    from rayllama.pipeline import PipelineError
    from rayllama.rl.actors_api import ActorCallError

    return PipelineError, ValueError, FileNotFoundError, ActorCallError, PlacementError


def one_line(e: BaseException) -> str:
    """The message of `e` in one line (a Ray task error: of the exception the remote code raised)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _setup_logging(run: RunDir, cfg: PipelineConfig) -> None:
    run.root.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    file_handler = logging.FileHandler(run.root / "driver.log")
    file_handler.setFormatter(fmt)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("[rayllama] %(message)s"))
    log.handlers[:] = [file_handler, console]
    log.setLevel(logging.DEBUG if cfg.log_level == "debug" else logging.INFO)
    log.propagate = False
    trace.handlers[:] = [file_handler]
    trace.propagate = False


# With RAY_ENABLE_ZERO_COPY_TORCH_TENSORS Ray warns at every tensor it sends that zero-copy is on, and where a
# received tensor wraps the object store's read-only buffer, that it is not writable: warnings about the setting
# itself, not about the tensor, repeated in the console at every PPO checkpoint. Silenced in the driver and, through
# the job's worker_process_setup_hook, in every worker.
RAY_ZERO_COPY_NOTICES = ("Zero-copy tensor serialization is enabled", "The given NumPy array is not writable")
# Ray Train's PlacementGroupCleaner asks Ray's state API, which the dashboard serves, once a second whether the
# stage's controller still lives; with ray.include_dashboard=false every ask fails with this warning (~200 console
# lines per Ray Train stage). Silenced the same way.
RAY_STATE_API_NOTICE = "Failed to query Ray Train Controller actor state"
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# Ray Train 2.58's controller starts a PreemptionWatcher actor per stage, and its core worker logs (at ERROR, from
# C++) that the actor's constructor arguments live in the object store while max_restarts > 0: a note to Ray's own
# developers (ray-project/ray#53727), one console line per Ray Train stage. Dropped from what workers print to the
# driver's console unless log_level=debug; it stays in the Ray logs (/tmp/ray/session_latest/logs).
RAY_WORKER_NOTICES = ("Actor with class name: 'PreemptionWatcher'",)


def quiet_worker_notices() -> None:
    """Replace the driver's printer of worker log lines (Ray's `ray_print_logs` handler, what log_to_driver adds)
    with one that drops the lines holding a RAY_WORKER_NOTICES text and prints the rest as Ray does."""
    import functools

    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return  # log_to_driver off, or a ray:// client (it prints worker lines its own way)
    printer = functools.partial(worker.print_to_stdstream,
                                ignore_prefix=worker.global_worker.job_logging_config is not None)

    def print_worker_lines(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not any(n in line for n in RAY_WORKER_NOTICES)]
        if lines:
            printer({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_worker_lines)


def quiet_ray_notices() -> None:
    import re
    import warnings

    for text in RAY_ZERO_COPY_NOTICES:
        warnings.filterwarnings("ignore", message=re.escape(text))
    cleaner = logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER)
    if not any(getattr(f, "rayllama", False) for f in cleaner.filters):
        def no_state_api_notice(record: logging.LogRecord) -> bool:
            return RAY_STATE_API_NOTICE not in record.getMessage()

        no_state_api_notice.rayllama = True  # type: ignore[attr-defined]  # added once per process
        cleaner.addFilter(no_state_api_notice)


def _start_ray(cfg: PipelineConfig, run: RunDir) -> None:
    import ray

    # Ray Train V2 blocks ~2 s per report with the default health-check interval; placement gets a deadline.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(cfg.scaling.start_timeout_s))
    os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray Train 2.58 routes a worker's print to the root logger and, because Ray has already wrapped sys.stdout,
    # also to the original print: every line a Ray Train worker printed reached the console twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    env = {k: os.environ[k] for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "HF_HUB_OFFLINE",
                                      "RAY_TRAIN_ENABLE_PRINT_PATCH") if k in os.environ}
    env["OMP_NUM_THREADS"] = str(cfg.threads_per_worker)
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # Ray's own deprecation notes, once per actor
    # Workers import rayllama from the installed package; the run dir is absolute so every node sees one path.
    # log_to_driver: worker errors and the Ray Train rank-0 progress lines reach the console; Ray's own
    # INFO lines only with log_level debug (they stay in /tmp/ray/session_latest/logs)
    quiet_ray_notices()
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "rayllama.driver.quiet_ray_notices"}
    kwargs: dict = {"runtime_env": runtime_env, "log_to_driver": True,
                    "logging_level": logging.INFO if cfg.log_level == "debug" else logging.WARNING}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        port = cfg.ray.dashboard_port  # Ray binds it even without the dashboard UI (its API server)
        if not _port_free(port):
            free = next((p for p in range(port + 1, port + 100) if _port_free(p)), 0)
            if cfg.ray.include_dashboard:
                log.warning(f"127.0.0.1:{port} is taken (another Ray dashboard?); this run's uses port {free}")
            port = free
        context = ray.init(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            **kwargs,
        )
        if cfg.ray.include_dashboard:
            log.info(f"Ray dashboard: http://{context.dashboard_url}")
    if cfg.log_level != "debug":
        quiet_worker_notices()
    node = getattr(ray._private.worker.global_worker, "node", None)  # None for a ray:// client
    if node is not None:  # where this node's rayllama_* gauges are scraped (rayllama.trackers.RayMetrics)
        log.info(f"Ray metrics (Prometheus): http://{node.node_ip_address}:{node.metrics_export_port}/metrics")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def dry_run(cfg: PipelineConfig, run: RunDir, source: str) -> int:
    """`--dry-run`: after load_config (keys, types, ranges), check_files (tokenizer, ray.address) and the memory
    plan, the checks that need the run dir: it can be written, and every checkpoint a listed stage reads but no
    listed stage writes is complete. Writes nothing; one line either way."""
    from rayllama.cli import writable_dir
    from rayllama.pipeline import PipelineError, check_stage_inputs

    try:
        if run.uri:  # the store answers (a bad URI or credentials: StorageError); its finished stages are checked
            run.restore()
        elif not writable_dir(run.root):
            raise PipelineError(f"run_dir {run.root} cannot be created or written; set run_dir to a writable path")
        check_stage_inputs(cfg, run)
    except (PipelineError, ValueError) as e:
        print(f"rayllama: error: {e}", file=sys.stderr)
        return 2
    plan = "memory plan fits" if cfg.device == "cuda" else "no memory plan on cpu"
    print(f"rayllama: dry run OK: {source} (stages {', '.join(cfg.stages)}; {plan}; run dir {run.name})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from rayllama import cli

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = cli.parse_args(argv)
    except ConfigError as e:
        print(f"rayllama: error: {e}", file=sys.stderr)
        return 2
    if args.help or args.config is None:
        print(cli.help_text("rayllama.driver", SUMMARY, PipelineConfig, "the memory plan"))
        return 0 if args.help else 2
    try:
        cfg = load_config(args.config, args.overrides)
        check_files(cfg)
    except ConfigError as e:
        print(f"rayllama: error: {e}", file=sys.stderr)
        return 2
    from rayllama import storage

    if not storage.is_uri(cfg.run_dir):
        cfg.run_dir = str(Path(cfg.run_dir).absolute())
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.device == "cuda":  # the memory plan: every process of every stage fits its GPU (rayllama.plan)
        from rayllama.plan import PlanError, check_plan

        try:
            check_plan(cfg)
        except PlanError as e:
            words = " ".join(a for a in argv if a not in cli.FLAGS)
            print(f"rayllama: error: {e}; `python -m rayllama.plan {words}` prints the whole plan", file=sys.stderr)
            return 2
    run = RunDir(cfg)
    if args.dry_run:
        return dry_run(cfg, run, args.config)
    try:
        run.restore()  # a run on an object store: what earlier drivers finished (rayllama.run_dir)
    except storage.StorageError as e:
        print(f"rayllama: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(run, cfg)
    (run.root / "config.yaml").write_text(to_yaml(cfg))
    run.push(run.root / "config.yaml")

    from rayllama.pipeline import Pipeline, PipelineError

    try:
        pipeline = Pipeline(cfg, run)  # reads and checks every data file before Ray starts
        pipeline.check_inputs()  # and every checkpoint the listed stages read but do not write
    except (ValueError, FileNotFoundError, PipelineError) as e:
        print(f"rayllama: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    _start_ray(cfg, run)
    try:
        pipeline.run_all()
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        line = one_line(e)
        log.error(line)
        trace.error("", exc_info=e)  # the traceback goes to driver.log only
        print(f"rayllama: error: {line} (details in {run.root / 'driver.log'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        print("rayllama: interrupted; the same command resumes from the last checkpoints", file=sys.stderr)
        return 130
    finally:
        import ray

        pipeline.close_trackers()
        ray.shutdown()
        run.push(run.root / "driver.log")
    from rayllama.report import write_report

    run.pull_metrics()
    report, written = write_report(run.root)
    log.info(f"report: {report} ({len(written.plots)} plots)")
    log.info(f"done in {time.time() - t0:.0f} s; results in {run.name}")
    for path in [report, *written.plots.values()]:
        run.push(Path(path))
    run.push(run.root / "driver.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
