"""What the engine hands back, and how a sequence's text grows and stops.

`TextState` follows one sequence's output: it detokenizes incrementally, looks for stop strings in the
new text (a stop string may straddle tokens), cuts the text before the stop string, and, while the
sequence runs, holds back the last few characters that could still turn out to start a stop string, so
a streaming client never sees any part of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miniengine.tokenizer import IncrementalDetokenizer


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while running
    logprobs: list[dict[int, float]] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(slots=True)
class StreamDelta:
    """New text of one sample since the last delta (what `Engine.stream` yields)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass(slots=True)
class TextState:
    detokenizer: IncrementalDetokenizer | None
    stop: list[str]
    text: str = ""
    stop_reason: str | int | None = None
    _held: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._held = max((len(s) for s in self.stop), default=1) - 1

    def add_token(self, token_id: int, check_stop: bool = True) -> bool:
        """Append the token's text; True if a stop string now appears (the text is cut before it)."""
        if self.detokenizer is None:
            return False
        old_len = len(self.text)
        self.text += self.detokenizer.step(token_id)
        if not self.stop or not check_stop:
            return False
        window = max(0, old_len - self._held)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, window)) >= 0]
        if not hits:
            return False
        at, self.stop_reason = min(hits)
        self.text = self.text[:at]
        return True

    def visible_text(self, finished: bool) -> str:
        return self.text if finished else self.text[: max(0, len(self.text) - self._held)]
