"""How one request wants its tokens chosen and when it wants to stop.

`SamplingParams` is plain data, checked once when it is made: every bad value (a wrong type as much as a
value out of range) raises `ValueError` naming the field, so a request is rejected before it touches the
scheduler or the KV cache, and one bad request can never break a step that other requests share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_N = 128  # samples per request (OpenAI's own cap): each sample is a sequence with its own KV blocks
MAX_LOGPROBS = 20
# Below this a temperature is greedy: dividing logits by 1e-39 overflows them to inf, and the softmax of
# a row of infs is NaN, which would sample token 0 forever.
GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 (or anything below 1e-5) means greedy
    top_k: int = -1  # -1 (or 0) keeps every token
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # per request: the same seed gives the same tokens whatever else is batched
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)  # None or one string are accepted too
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log-probabilities per generated token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.stop = _string_list(self.stop)
        self.stop_token_ids = _int_list("stop_token_ids", self.stop_token_ids)
        _int("n", self.n, 1, MAX_N)
        _real("temperature", self.temperature, lambda v: v >= 0, ">= 0 (0 is greedy)")
        _int("top_k", self.top_k, -1, None, "must be an int: -1 (off) or >= 0")
        _real("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _real("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        _real("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "> 0")
        _real("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
        _real("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
        if self.seed is not None:
            _int("seed", self.seed, None, None)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, None, "must be an int >= 1, or None (until the context is full)")
        _int("min_tokens", self.min_tokens, 0, self.max_tokens, "must be an int >= 0 and <= max_tokens")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        _bool("ignore_eos", self.ignore_eos)
        _bool("skip_special_tokens", self.skip_special_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Whether a penalty changes the logits (sampling then reads every earlier token of the sequence)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _fail(name: str, value: object, rule: str) -> None:
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it {rule}.")


def _int(name: str, value: object, low: int | None, high: int | None, rule: str | None = None) -> None:
    if rule is None:
        rule = "must be an int" + (
            f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        )
    # bool is an int subclass, but `n=True` is a mistake, not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(name, value, rule)
    if (low is not None and value < low) or (high is not None and value > high):  # type: ignore[operator]
        _fail(name, value, rule)


def _real(name: str, value: object, in_range: Callable[[float], bool], rule: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or not in_range(value):
        _fail(name, value, f"must be a finite number {rule}")


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "must be True or False")


def _string_list(value: object) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(s, str) and s for s in items):
        _fail("stop", value, "must be a non-empty string or a list of them (or None)")
    return list(items)  # type: ignore[arg-type]


def _int_list(name: str, value: object) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        _fail(name, value, "must be a list of token ids (ints >= 0)")
    return list(value)  # type: ignore[arg-type]
