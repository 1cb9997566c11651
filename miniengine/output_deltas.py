"""Output deltas: a RequestOutput sent across a process boundary as only what is new since the last one.

A `RequestOutput` holds its request's whole state so far (all the text, every token id, every logprob), so
sending one per request per step costs O(length) each time and O(length^2) over a request. The engine
process sends what changed instead, and the front end rebuilds the very same outputs:

    engine process                                                front end
    RequestOutput(text "The cat sat", ids [1,2,3])
      -> DeltaEncoder -> (request id, [(0, 7, " sat", [3], ...)], ...)  ->  DeltaDecoder: text[:7] + " sat",
                                                                           ids + [3] -> RequestOutput(...)

A request's first delta also carries its prompt. A sample's text only grows while it runs (stop strings
are held back until they are ruled out), so `text_start` is normally the length sent so far; were the
text ever to change before that point, the delta sends it whole (`text_start` 0). Each rebuilt output has
lists of its own, as the engine's do: a consumer may keep an old one while newer ones arrive.
"""

from __future__ import annotations

from miniengine.outputs import CompletionOutput, RequestOutput

# The wire format is plain tuples: pickle rebuilds those in C, where a NamedTuple would cost a call to its
# Python-level __new__ for every request and every sample of every step.
#   OutputDelta = (request_id, samples, finished, num_cached_tokens, prompt)
#     prompt: (text, token ids), in a request's first delta only; else None
#   SampleDelta = (index, text_start, text, token_ids, logprobs, finish_reason, stop_reason)
#     the text from character `text_start` on is `text`; token_ids (and their logprobs, if the request asked
#     for them) are the new ones only
SampleDelta = tuple[int, int, str, list[int], list[dict[int, float]] | None, str | None, str | int | None]
OutputDelta = tuple[str, list[SampleDelta], bool, int, tuple[str | None, list[int]] | None]


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
                (c.index, start, c.text[start:], c.token_ids[num_tokens:], new_logprobs, c.finish_reason, c.stop_reason)
            )
            now.append((c.text, len(c.token_ids)))
        if not out.finished:
            self._sent[out.request_id] = now
        prompt = (out.prompt, out.prompt_token_ids) if first else None
        return (out.request_id, samples, out.finished, out.num_cached_tokens, prompt)


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
        request_id, deltas, finished, num_cached_tokens, first = delta
        if first is not None:
            self._requests[request_id] = (*first, [_Sample(d[4] is not None) for d in deltas])
        prompt, prompt_token_ids, samples = self._requests[request_id]
        outputs = []
        for (index, text_start, text, token_ids, logprobs, finish_reason, stop_reason), sample in zip(deltas, samples):
            sample.text = sample.text[:text_start] + text
            sample.token_ids += token_ids
            if logprobs is not None and sample.logprobs is not None:
                sample.logprobs += logprobs
            sample.finish_reason, sample.stop_reason = finish_reason, stop_reason
            outputs.append(
                CompletionOutput(
                    index,
                    sample.text,
                    sample.token_ids.copy(),
                    finish_reason,
                    None if sample.logprobs is None else sample.logprobs.copy(),
                    stop_reason,
                )  # fmt: skip
            )
        if finished:
            del self._requests[request_id]
        return RequestOutput(request_id, prompt, prompt_token_ids, outputs, finished, num_cached_tokens)
