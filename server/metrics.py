"""The server's Prometheus metrics: a stat logger like any other, fed each step's `StepStats`.

    Engine.step() -> StepStats -> PrometheusStatLogger.record() -> its own CollectorRegistry -> GET /metrics

The registry is the logger's own, not prometheus-client's global one, so one process (a test) can run
several servers. Gauges hold the state after the last step; counters and histograms add each step's
figures. Token counts of the prefix cache are honest after preemptions: the engine counts a sequence's
lookup once, at its first schedule.

The latency histograms take a value per token (inter-token latency: one per running sequence per step, in
the process that serves HTTP): prometheus-client's `Histogram.observe` costs ~3 us a value under its lock
(0.8 ms a step at 256 sequences), so they are plain bucket counts here (`_Histogram`, ~0.1 us a value),
written out in the same exposition by a collector of their own at each scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from miniengine.stats import StepStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class PrometheusStatLogger:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"labelnames": ["model_name"], "registry": self.registry}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"miniengine:{name}", doc, **labels).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"miniengine:{name}", doc, **labels).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> _Histogram:
            histogram = _Histogram(f"miniengine:{name}", doc, buckets, model_name)
            self.registry.register(histogram)
            return histogram

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
        # How the engine's time is spent: steps with few tokens each cost the host as much as full ones.
        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens one engine step computed (prompt chunks and sampled tokens).",
            _TOKEN_BUCKETS,
        )  # fmt: skip
        self.step_time = histogram("engine_step_seconds", "One engine step: schedule, forward, sample.", _STEP_BUCKETS)
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
        self.ttft.observe_all(stats.time_to_first_token)
        self.itl.observe_all(stats.inter_token_latency)
        self.iteration_tokens.observe_all((stats.num_prompt_tokens + stats.num_generation_tokens,))
        self.step_time.observe_all((stats.step_time,))
        for request in stats.finished:
            self.e2e.observe_all((request.e2e_latency,))
            self._finished.labels(self._model_name, request.finish_reason).inc()

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _Histogram:
    """A Prometheus histogram with one label value, fed many values at once: a count per bucket (the last one
    +Inf) and the sum, read out by the registry at each scrape (a collector)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], model_name: str) -> None:
        self.name, self.documentation, self.model_name = name, documentation, model_name
        self.bounds = list(buckets)
        self.labels = [floatToGoString(b) for b in (*buckets, float("inf"))]
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe_all(self, values: Iterable[float]) -> None:
        bounds, counts, total = self.bounds, self.counts, 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value ("le")
            total += value
        self.sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self.counts), self.sum  # a copy: the engine's reporting thread adds meanwhile
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        family.add_metric([self.model_name], list(zip(self.labels, accumulate(counts))), total)
        yield family
