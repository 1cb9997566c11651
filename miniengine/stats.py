"""Step statistics, and the stat loggers that receive them.

After every step the engine builds one `StepStats` (what the scheduler holds, how full the KV cache is,
tokens computed, prefix-cache lookups, preemptions, the latencies of the tokens just sampled, the requests
that just finished) and hands it to each stat logger, in the process that runs the engine loop:

    Engine.step() -> StepStats -> [LoggingStatLogger, the server's Prometheus metrics, plugin loggers...]

A logger is any object with `record(stats)` (and optionally `close()`); out-of-tree ones arrive through
the entry-point group `miniengine.stat_logger_plugins` (see plugins.py). Counts are for this step alone,
so a logger sums them itself; gauges (running, waiting, KV usage) are the state after the step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

logger = logging.getLogger("miniengine")


@dataclass(frozen=True, slots=True)
class RequestStats:
    """One finished request, for latency histograms and request counters."""

    request_id: str
    finish_reason: str  # of its first sample: "stop", "length" or "abort"
    num_prompt_tokens: int
    num_output_tokens: int  # summed over its samples
    num_cached_tokens: int  # prompt tokens the prefix cache supplied
    arrival_time: float  # time.monotonic() when add_request took it
    first_token_time: float | None  # None if it ended before its first token
    finish_time: float

    @property
    def e2e_latency(self) -> float:
        return self.finish_time - self.arrival_time


@dataclass(frozen=True, slots=True)
class StepStats:
    timestamp: float  # time.monotonic() at the end of the step
    step_time: float  # seconds the step took: schedule, forward, sample, detokenize
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_prompt_tokens: int  # prompt tokens computed this step (prefill chunks)
    num_generation_tokens: int  # tokens sampled this step
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int  # sequences preempted this step
    time_to_first_token: tuple[float, ...] = ()  # seconds, for each sequence whose first token came this step
    inter_token_latency: tuple[float, ...] = ()  # seconds since the sequence's previous token, for the others
    finished: tuple[RequestStats, ...] = ()

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by running sequences (cached-but-free blocks count as free)."""
        return 1 - self.num_free_kv_blocks / self.num_kv_blocks if self.num_kv_blocks else 0.0


@runtime_checkable
class StatLogger(Protocol):
    def record(self, stats: StepStats) -> None: ...


class LoggingStatLogger:
    """The built-in logger: one INFO line every `interval` seconds while the engine is busy."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last = time.monotonic()
        self._prompt = self._generated = self._queries = self._hits = 0

    def record(self, stats: StepStats) -> None:
        self._prompt += stats.num_prompt_tokens
        self._generated += stats.num_generation_tokens
        self._queries += stats.prefix_cache_queries
        self._hits += stats.prefix_cache_hits
        elapsed = stats.timestamp - self._last
        if elapsed < self.interval:
            return
        hit_rate = self._hits / self._queries if self._queries else 0.0
        logger.info(
            "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV cache %.1f%%, prefix hits %.1f%%",
            self._prompt / elapsed, self._generated / elapsed, stats.num_running, stats.num_waiting,
            100 * stats.kv_cache_usage, 100 * hit_rate,
        )  # fmt: skip
        self._last = stats.timestamp
        self._prompt = self._generated = self._queries = self._hits = 0
