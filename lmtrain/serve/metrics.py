"""Prometheus metrics of `lmtrain serve`: requests by status, latencies, queue depth, tokens, compilations."""

from __future__ import annotations

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# What JAX records when it compiles a program for the backend, and when it loads one from the persistent
# compilation cache instead: either means a program was not yet in memory.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


disable_created_metrics()  # the *_created series only repeat the start time


class Metrics:
    """One registry per server, so that tests running several servers in one process do not mix counts."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmtrain_requests", "Requests answered, by route and HTTP status",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("lmtrain_time_to_first_token_seconds", "From request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("lmtrain_time_per_output_token_seconds", "Between consecutive tokens of a request",
                                   buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("lmtrain_request_latency_seconds", "From request to its last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("lmtrain_queue_depth", "Rows waiting for a wave", registry=r)
        self.running = Gauge("lmtrain_running_rows", "Rows being decoded", registry=r)
        self.tokens = Counter("lmtrain_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("lmtrain_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.compilations = Counter("lmtrain_compilations", "XLA programs compiled (or loaded from the persistent cache)",
                                    registry=r)
        jax.monitoring.register_event_duration_secs_listener(self._on_jax_duration)
        jax.monitoring.register_event_listener(self._on_jax_event)

    def _on_jax_duration(self, event: str, _seconds: float, **_kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.compilations.inc()

    def _on_jax_event(self, event: str, **_kwargs) -> None:
        if event == _CACHE_HIT_EVENT:
            self.compilations.inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
