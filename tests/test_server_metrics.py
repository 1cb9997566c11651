"""The server's latency histograms (bucket counts of their own, fed a step's values at once) write the very
samples prometheus-client's own Histogram would for the same values: random latencies, values right on a
bucket bound (a bucket is "less or equal"), above the last bound, and none at all."""

from __future__ import annotations

import random
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from miniengine.server.metrics import (
    _LATENCY_BUCKETS,
    _REQUEST_BUCKETS,
    _STEP_BUCKETS,
    _TOKEN_BUCKETS,
    PrometheusStatLogger,
)
from miniengine.stats import RequestStats, StepStats

HISTOGRAMS = {  # name -> buckets, and what of a step feeds it
    "time_to_first_token_seconds": (_LATENCY_BUCKETS, lambda s: s.time_to_first_token),
    "inter_token_latency_seconds": (_LATENCY_BUCKETS, lambda s: s.inter_token_latency),
    "e2e_request_latency_seconds": (_REQUEST_BUCKETS, lambda s: [r.e2e_latency for r in s.finished]),
    "iteration_tokens_total": (_TOKEN_BUCKETS, lambda s: [s.num_prompt_tokens + s.num_generation_tokens]),
    "engine_step_seconds": (_STEP_BUCKETS, lambda s: [s.step_time]),
}


def samples(text: str, names: set[str]) -> dict:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.removeprefix("miniengine:") in names
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_the_histograms_match_prometheus_clients_own():
    rng = random.Random(0)
    logger = PrometheusStatLogger("m")
    registry = CollectorRegistry()
    reference = {
        name: Histogram(f"miniengine:{name}", "doc", ["model_name"], buckets=buckets, registry=registry).labels("m")
        for name, (buckets, _) in HISTOGRAMS.items()
    }
    for step in range(50):
        on_bounds = [rng.choice(_LATENCY_BUCKETS) for _ in range(rng.randrange(3))]
        latencies = [rng.expovariate(20) for _ in range(rng.randrange(300))] + on_bounds + [rng.uniform(40, 99)]
        finished = tuple(
            RequestStats(f"r{step}-{i}", "stop", 5, 7, 0, 0.0, None, rng.choice([rng.expovariate(0.05), 10.0]))
            for i in range(rng.randrange(4))
        )
        first = tuple(rng.expovariate(2) for _ in range(rng.randrange(5)))
        step_time = rng.choice([rng.expovariate(50), *_STEP_BUCKETS])  # on a bound at times
        prompt = rng.choice([0, 16, rng.randrange(3000)])
        latencies = tuple(latencies)
        stats = StepStats(time.monotonic(), step_time, 8, 0, 64, 32, prompt, 8, 0, 0, 0, first, latencies, finished)
        logger.record(stats)
        for name, (_, values) in HISTOGRAMS.items():
            for value in values(stats):
                reference[name].observe(value)
    mine, theirs = (
        samples(logger.render().decode(), set(HISTOGRAMS)),
        samples(generate_latest(registry).decode(), set(HISTOGRAMS)),
    )
    assert mine.keys() == theirs.keys() and len(mine) == sum(len(b) + 3 for b, _ in HISTOGRAMS.values())
    for key, value in theirs.items():
        assert abs(mine[key] - value) <= 1e-9 * max(1.0, abs(value)), key
    empty = samples(PrometheusStatLogger("m").render().decode(), set(HISTOGRAMS))
    assert empty.keys() == mine.keys() and not any(empty.values())
