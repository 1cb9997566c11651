"""Output deltas: a RequestOutput sent across a process boundary as only what is new since the last one.

A `RequestOutput` holds its request's whole state so far (all the text, every token id, every logprob), so
sending one per request per step costs O(length) each time and O(length^2) over a request. The engine
process sends what changed instead, and the front end rebuilds the very same outputs:

    engine process                                               front end
    RequestOutput(text "The cat sat", ids [1,2,3])
      -> DeltaEncoder -> OutputDelta(samples=[(0, 7, " sat", [3])])  ->  DeltaDecoder: text[:7] + " sat",
                                                                          ids + [3] -> RequestOutput(...)

A request's first delta also carries its prompt. A sample's text only grows while it runs (stop strings
are held back until they are ruled out), so `text_start` is normally the length sent so far; were the
text ever to change before that point, the delta sends it whole (`text_start` 0). Each rebuilt output has
lists of its own, as the engine's do: a consumer may keep an old one while newer ones arrive.
"""

from __future__ import annotations

from typing import NamedTuple

from miniengine.outputs import CompletionOutput, RequestOutput


class SampleDelta(NamedTuple):
    index: int
    text_start: int  # the text from this character on is `text`
    text: str
    token_ids: list[int]  # new token ids
    logprobs: list[dict[int, float]] | None  # their logprobs, if the request asked for them
    finish_reason: str | None
    stop_reason: str | int | None


class OutputDelta(NamedTuple):
    request_id: str
    samples: list[SampleDelta]
    finished: bool
    num_cached_tokens: int
    prompt: tuple[str | None, list[int]] | None  # (text, token ids): in a request's first delta only


class DeltaEncoder:
    """The engine process's side: remembers how much of each request's samples was sent."""

    def __init__(self) -> None:
        self._sent: dict[str, list[tuple[str, int]]] = {}  # request id -> per sample (text, tokens sent)

    def encode(self, outputs: list[RequestOutput]) -> list[OutputDelta]:
        return [self._encode(out) for out in outputs]

    def _encode(self, out: RequestOutput) -> OutputDelta:
        first = out.request_id not in self._sent
        sent = self._sent.pop(out.request_id) if not first else [("", 0)] * len(out.outputs)
        samples, now = [], []
        for c, (text, num_tokens) in zip(out.outputs, sent):
            start = len(text) if c.text.startswith(text) else 0
            new_logprobs = None if c.logprobs is None else c.logprobs[num_tokens:]
            samples.append(
                SampleDelta(
                    c.index,
                    start,
                    c.text[start:],
                    c.token_ids[num_tokens:],
                    new_logprobs,
                    c.finish_reason,
                    c.stop_reason,
                )  # fmt: skip
            )
            now.append((c.text, len(c.token_ids)))
        if not out.finished:
            self._sent[out.request_id] = now
        prompt = (out.prompt, out.prompt_token_ids) if first else None
        return OutputDelta(out.request_id, samples, out.finished, out.num_cached_tokens, prompt)


class _Sample:
    __slots__ = ("finish_reason", "logprobs", "stop_reason", "text", "token_ids")

    def __init__(self, has_logprobs: bool) -> None:
        self.text, self.token_ids, self.finish_reason, self.stop_reason = "", [], None, None
        self.logprobs: list[dict[int, float]] | None = [] if has_logprobs else None


class DeltaDecoder:
    """The front end's side: each request's state so far, to which every delta is added."""

    def __init__(self) -> None:
        self._requests: dict[str, tuple[str | None, list[int], list[_Sample]]] = {}

    def decode(self, deltas: list[OutputDelta]) -> list[RequestOutput]:
        return [self._decode(delta) for delta in deltas]

    def _decode(self, delta: OutputDelta) -> RequestOutput:
        if delta.prompt is not None:
            samples = [_Sample(s.logprobs is not None) for s in delta.samples]
            self._requests[delta.request_id] = (*delta.prompt, samples)
        prompt, prompt_token_ids, samples = self._requests[delta.request_id]
        outputs = []
        for d, sample in zip(delta.samples, samples):
            sample.text = sample.text[: d.text_start] + d.text
            sample.token_ids += d.token_ids
            if d.logprobs is not None and sample.logprobs is not None:
                sample.logprobs += d.logprobs
            sample.finish_reason, sample.stop_reason = d.finish_reason, d.stop_reason
            logprobs = None if sample.logprobs is None else list(sample.logprobs)
            outputs.append(
                CompletionOutput(d.index, sample.text, list(sample.token_ids), d.finish_reason, logprobs, d.stop_reason)
            )
        if delta.finished:
            del self._requests[delta.request_id]
        return RequestOutput(
            delta.request_id, prompt, prompt_token_ids, outputs, delta.finished, delta.num_cached_tokens
        )
