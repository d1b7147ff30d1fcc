"""The endpoint's figures, kept twice: a prometheus-client registry (GET /metrics, Prometheus text format, per
replica) and `ray.util.metrics` (exported by Ray's metrics agent, so they show in the Ray dashboard / Grafana).

    rayllama_requests_total{status}              finished requests by HTTP status (200, 400, 429, 499 = gone)
    rayllama_prompt_tokens_total                 prompt tokens of admitted requests
    rayllama_generation_tokens_total             generated tokens
    rayllama_time_to_first_token_seconds         histogram: request arrival -> first token out of the engine
    rayllama_inter_token_latency_seconds         histogram: between consecutive engine steps of one request
    rayllama_queue_length                        requests waiting for a slot
    rayllama_running_batch_size                  sequences in the running batch
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
PREFIX = "rayllama_"


class ServeMetrics:
    """One replica's metrics; every update goes to both the Prometheus registry and Ray's metrics."""

    def __init__(self, model: str, ray_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model"]
        self._model = model
        self.requests = Counter(PREFIX + "requests", "Finished requests by HTTP status", [*labels, "status"],
                                registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests", labels,
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens", labels, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first generated token",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between consecutive tokens of a request",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge(PREFIX + "queue_length", "Requests waiting for a slot", labels, registry=r)
        self.running = Gauge(PREFIX + "running_batch_size", "Sequences in the running batch", labels, registry=r)
        self._ray: dict[str, Any] = {}
        if ray_metrics:
            from ray.util import metrics as rm

            tags = ("model",)
            self._ray = {
                "requests": rm.Counter(PREFIX + "requests", "Finished requests by HTTP status",
                                       tag_keys=(*tags, "status")),
                "prompt_tokens": rm.Counter(PREFIX + "prompt_tokens", "Prompt tokens", tag_keys=tags),
                "generation_tokens": rm.Counter(PREFIX + "generation_tokens", "Generated tokens", tag_keys=tags),
                "ttft": rm.Histogram(PREFIX + "time_to_first_token_seconds", "Arrival to first token",
                                     boundaries=list(LATENCY_BUCKETS), tag_keys=tags),
                "itl": rm.Histogram(PREFIX + "inter_token_latency_seconds", "Between consecutive tokens",
                                    boundaries=list(LATENCY_BUCKETS), tag_keys=tags),
                "queue": rm.Gauge(PREFIX + "queue_length", "Requests waiting for a slot", tag_keys=tags),
                "running": rm.Gauge(PREFIX + "running_batch_size", "Sequences in the running batch", tag_keys=tags),
            }

    def _tags(self, **extra: str) -> dict[str, str]:
        return {"model": self._model, **extra}

    def request_done(self, status: int) -> None:
        self.requests.labels(self._model, str(status)).inc()
        if self._ray:
            self._ray["requests"].inc(1, tags=self._tags(status=str(status)))

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        for name, value in (("prompt_tokens", prompt), ("generation_tokens", generated)):
            if value:
                getattr(self, name).labels(self._model).inc(value)
                if self._ray:
                    self._ray[name].inc(value, tags=self._tags())

    def latency(self, name: str, seconds: float) -> None:
        """name: "ttft" | "itl"."""
        getattr(self, name).labels(self._model).observe(seconds)
        if self._ray:
            self._ray[name].observe(seconds, tags=self._tags())

    def batch(self, running: int, waiting: int) -> None:
        self.running.labels(self._model).set(running)
        self.queue.labels(self._model).set(waiting)
        if self._ray:
            self._ray["running"].set(running, tags=self._tags())
            self._ray["queue"].set(waiting, tags=self._tags())

    def exposition(self) -> bytes:
        """The Prometheus text format of this replica's metrics."""
        return generate_latest(self.registry)
