"""A stat logger: running totals of what an engine did, from the `StepStats` it hands over after each step.

The engine makes one per Engine (the entry point names the class; it is called with no arguments) and calls
`record(stats)` after every step, in the process running the engine loop. Keep `record` cheap: it runs on
the engine's critical path. `close()`, if a logger has one, is for a final report.
"""

from __future__ import annotations

import logging

from miniengine.stats import StepStats

logger = logging.getLogger("miniengine_example_plugin")


class TokenCounter:
    def __init__(self) -> None:
        self.steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished_requests = 0
        self.prefix_cache_hits = 0
        self.preemptions = 0
        self.busy_seconds = 0.0

    def record(self, stats: StepStats) -> None:
        self.steps += 1
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.finished_requests += len(stats.finished)
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.preemptions += stats.num_preemptions
        self.busy_seconds += stats.step_time

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "finished_requests": self.finished_requests,
            "prefix_cache_hit_tokens": self.prefix_cache_hits,
            "preemptions": self.preemptions,
            "generation_tokens_per_busy_second": self.generation_tokens / self.busy_seconds if self.busy_seconds else 0,
        }

    def close(self) -> None:
        logger.info("engine totals: %s", self.summary())
