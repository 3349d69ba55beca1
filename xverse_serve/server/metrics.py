"""What each request did (RequestRecord), and the Prometheus metrics built from it and from the engine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.messages import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


@dataclass
class RequestRecord:
    """One HTTP request: created when it arrives, filled by its route handler, read when its response ends."""

    request_id: str
    method: str
    route: str
    client: str | None = None
    started: float = field(default_factory=time.perf_counter)
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt: object = None  # text or messages; kept only with --log-prompts
    response: str | None = None

    def log_line(self, status: int, with_text: bool) -> str:
        """One JSON object: who, what, how it ended, how long it took; the text only when asked for."""
        now = time.perf_counter()
        entry = {"id": self.request_id, "method": self.method, "route": self.route, "status": status,
                 "client": self.client, "latency_ms": round((now - self.started) * 1000, 1)}
        if self.prompt_tokens is not None:
            entry |= {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "finish_reason": self.finish_reason}
        if self.first_token_at is not None:
            entry["ttft_ms"] = round((self.first_token_at - self.started) * 1000, 1)
            if self.completion_tokens > 1:
                decode_s = self.last_token_at - self.first_token_at
                entry["tokens_per_s"] = round((self.completion_tokens - 1) / decode_s, 1) if decode_s > 0 else None
        if self.error is not None:
            entry["error"] = self.error
        if with_text:
            entry |= {"prompt": self.prompt, "response": self.response}
        return json.dumps(entry, ensure_ascii=False)


class EngineCollector(Collector):
    """Reads the engine's load at scrape time: running and waiting requests, KV blocks, prefix cache."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        yield GaugeMetricFamily("xverse_requests_running", "Requests in the running batch", value=stats.running)
        yield GaugeMetricFamily("xverse_requests_waiting", "Requests waiting for a place in the batch",
                                value=stats.waiting)
        yield GaugeMetricFamily("xverse_kv_cache_blocks_used", "KV-cache blocks held by requests",
                                value=stats.kv_blocks_used)
        yield GaugeMetricFamily("xverse_kv_cache_blocks_free", "KV-cache blocks free (cached prefixes included)",
                                value=stats.kv_blocks_total - stats.kv_blocks_used)
        yield CounterMetricFamily("xverse_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                                  value=stats.prefix_queried_tokens)
        yield CounterMetricFamily("xverse_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                  value=stats.prefix_hit_tokens)
        yield CounterMetricFamily("xverse_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks",
                                  value=stats.preemptions)


class Metrics:
    """The server's Prometheus registry (its own, so several apps in one process never collide)."""

    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("xverse_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.in_flight = Gauge("xverse_http_requests_in_flight", "HTTP requests being answered",
                               registry=self.registry)
        self.latency = Histogram("xverse_request_latency_seconds", "End-to-end latency of a request, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("xverse_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.token_gap = Histogram("xverse_inter_token_latency_seconds", "Time between a request's successive tokens",
                                   buckets=TOKEN_GAP_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("xverse_prompt_tokens", "Prompt tokens of generation requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("xverse_generation_tokens", "Tokens generated", registry=self.registry)
        self.registry.register(EngineCollector(engine_stats))

    def token_observer(self, record: RequestRecord) -> Callable[[int], None]:
        """Called as each batch of new tokens of `record` arrives: feeds TTFT and inter-token latency."""

        def tokens_arrived(count: int) -> None:
            now = time.perf_counter()
            gaps = count
            if record.first_token_at is None:
                record.first_token_at = now
                self.ttft.observe(now - record.started)
                gaps, gap = count - 1, 0.0  # the tokens that came with the first one waited no longer
            else:
                gap = (now - record.last_token_at) / count  # tokens that arrive together share the wait
            for _ in range(gaps):
                self.token_gap.observe(gap)
            record.last_token_at = now
            record.completion_tokens += count
            self.generation_tokens.inc(count)

        return tokens_arrived

    def request_done(self, record: RequestRecord, status: int) -> None:
        self.requests.labels(record.route, str(status)).inc()
        self.latency.labels(record.route).observe(time.perf_counter() - record.started)
        if record.prompt_tokens is not None:
            self.prompt_tokens.inc(record.prompt_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
