"""Prometheus metrics, one registry per app (so several apps in one test process do not clash).

Exposed at `GET /metrics`: requests, queue depth, time to first token, decode speed,
prompt tokens (all and served from the KV cache), how often replies kept the persona's register,
and the engine's paged KV cache in vLLM's names (`memento:prefix_cache_queries_total`,
`memento:prefix_cache_hits_total` in tokens, `memento:kv_cache_usage_perc`, blocks used/free,
cache bytes, requests running/waiting), so dashboards built for vLLM read them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 60)
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "memento_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.queue_depth = Gauge("memento_queue_depth", "requests waiting for the model", registry=r)
        self.worker_busy = Gauge("memento_worker_busy", "1 while the model is generating", registry=r)
        self.rejected = Counter("memento_queue_rejected", "requests refused with 429 (queue full)", registry=r)
        self.ttft = Histogram(
            "memento_time_to_first_token_seconds", "submit to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "memento_queue_wait_seconds", "submit to picked by the model worker", buckets=QUEUE_BUCKETS, registry=r
        )
        self.tokens_per_second = Histogram(
            "memento_decode_tokens_per_second", "completion tokens / decode time", buckets=TPS_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("memento_prompt_tokens", "prompt tokens processed", registry=r)
        self.cached_tokens = Counter(
            "memento_cached_prompt_tokens", "prompt tokens whose KV came from the cache", registry=r
        )
        self.completion_tokens = Counter("memento_completion_tokens", "tokens generated", registry=r)
        self.generations = Counter(
            "memento_generations", "finished generations by finish reason", ["finish_reason"], registry=r
        )
        self.register_replies = Counter(
            "memento_register_replies",
            "replies checked against the persona's register (consistent=true when it matched)",
            ["register", "consistent"],
            registry=r,
        )

    def bind_queue(self, depth: Callable[[], int], busy: Callable[[], bool]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))
        self.worker_busy.set_function(lambda: 1.0 if busy() else 0.0)

    def bind_engine(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export `model.Engine.stats()` on every scrape."""
        self.registry.register(_EngineCollector(stats))

    def record_generation(
        self, *, ttft: float | None, decode_seconds: float, prompt: int, cached: int, completion: int, reason: str,
        queue_wait: float | None = None,
    ) -> None:
        if queue_wait is not None:
            self.queue_wait.observe(queue_wait)
        if ttft is not None:
            self.ttft.observe(ttft)
        if completion > 1 and decode_seconds > 0:
            self.tokens_per_second.observe((completion - 1) / decode_seconds)
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self.completion_tokens.inc(completion)
        self.generations.labels(finish_reason=reason).inc()

    def record_register(self, target: str, consistent: bool) -> None:
        self.register_replies.labels(register=target, consistent=str(consistent).lower()).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the engine's pool and scheduler at scrape time (nothing to keep in sync)."""

    GAUGES = {
        "kv_cache_bytes": "bytes of KV blocks in use or cached for reuse",
        "kv_pool_bytes": "bytes of the preallocated KV block pool",
        "kv_bytes_per_token": "KV cache bytes one token takes (all layers, keys and values)",
        "kv_blocks_total": "KV blocks in the pool",
        "kv_blocks_used": "KV blocks held by requests or cached",
        "kv_blocks_free": "KV blocks never used or freed",
        "kv_blocks_cached": "unreferenced KV blocks kept for prefix reuse (evicted LRU first)",
        "num_requests_running": "sequences in the running batch",
        "num_requests_waiting": "sequences waiting for a batch slot",
    }
    COUNTERS = {
        "prefix_cache_queries": "prompt tokens looked up in the prefix cache",
        "prefix_cache_hits": "prompt tokens found in the prefix cache",
    }

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def describe(self):
        return []  # collected lazily: the registry must not call stats() at registration

    def collect(self):
        s = self.stats()
        for key, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"memento:{key}", doc, value=float(s[key]))
        used = s["kv_blocks_used"] - s["kv_blocks_cached"]
        yield GaugeMetricFamily("memento:kv_cache_usage_perc", "fraction of KV blocks held by running requests",
                                value=used / max(1, s["kv_blocks_total"]))
        for key, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"memento:{key}", doc, value=float(s[key]))
