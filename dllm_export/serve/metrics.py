"""Prometheus metrics of one server (its own registry: two apps in a process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Requests, tokens, step latency, batch sizes and queue depth, in Prometheus text format."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dllm_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("dllm_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.completion_tokens = Counter("dllm_completion_tokens", "completion tokens returned", registry=r)
        self.request_seconds = Histogram("dllm_request_seconds", "time from arrival to the last byte, generation "
                                         "routes", registry=r,
                                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.step_seconds = Histogram("dllm_step_seconds", "latency of one denoising step of a batch", registry=r,
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.batch_rows = Histogram("dllm_batch_rows", "rows decoding together, at a batch's start and as "
                                    "requests join it", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue_depth = Gauge("dllm_queue_depth", "requests waiting for a batch", registry=r)
        self.early_answers = Counter("dllm_early_answers", "requests answered before their batch ended (their "
                                     "committed text had ended)", registry=r)
        self.joined = Counter("dllm_joined_requests", "requests that joined a running batch at a block boundary "
                              "(continuous batching)", registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
