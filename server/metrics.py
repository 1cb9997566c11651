"""The server's Prometheus metrics: a stat logger like any other, fed each step's `StepStats`.

    Engine.step() -> StepStats -> PrometheusStatLogger.record() -> its own CollectorRegistry -> GET /metrics

The registry is the logger's own, not prometheus-client's global one, so one process (a test) can run
several servers. Gauges hold the state after the last step; counters and histograms add each step's
figures. Token counts of the prefix cache are honest after preemptions: the engine counts a sequence's
lookup once, at its first schedule.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from miniengine.stats import StepStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)


class PrometheusStatLogger:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"miniengine:{name}", doc, **labels).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"miniengine:{name}", doc, **labels).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"miniengine:{name}", doc, buckets=buckets, **labels).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences in the running batch (n samples count n).")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting for a place in the batch.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks held by running sequences (0 to 1).")
        self.kv_used = gauge("num_kv_blocks_used", "KV blocks held by running sequences.")
        self.hit_rate = gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up, so far.")
        self.queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted (their KV recomputed later).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits are not).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Between two tokens of one sequence.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to the last token.", _REQUEST_BUCKETS)
        self._finished = Counter(
            "miniengine:request_success", "Requests finished, by how.", ["model_name", "finished_reason"],
            registry=self.registry,
        )  # fmt: skip
        for reason in ("stop", "length", "abort"):  # present from the start, so a rate of each is defined
            self._finished.labels(model_name, reason)
        self._model_name = model_name
        self._queries = self._hits = 0

    def record(self, stats: StepStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_used.set(stats.num_kv_blocks - stats.num_free_kv_blocks)
        self.queries.inc(stats.prefix_cache_queries)
        self.hits.inc(stats.prefix_cache_hits)
        self._queries += stats.prefix_cache_queries
        self._hits += stats.prefix_cache_hits
        self.hit_rate.set(self._hits / self._queries if self._queries else 0.0)
        self.preemptions.inc(stats.num_preemptions)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        for seconds in stats.time_to_first_token:
            self.ttft.observe(seconds)
        for seconds in stats.inter_token_latency:
            self.itl.observe(seconds)
        for request in stats.finished:
            self.e2e.observe(request.e2e_latency)
            self._finished.labels(self._model_name, request.finish_reason).inc()

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
