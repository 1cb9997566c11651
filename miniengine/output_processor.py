"""The output processor: each step's new token ids turned into text, stop strings and `RequestOutput`s.

The engine's step reports only what is new per request, as plain tuples (`TokenDelta`s): no text, no
per-token string work. Turning them into what a caller reads happens here, in whichever process the
caller lives in: beside the engine (`Engine.step`), or in the front end of an engine process
(engine_process.py), which then does all the string work while the engine process runs the next step.

    engine step                                        output processor
    ("r1", [(0, [873], None, None, None)], False, 0, None)  ->  detokenize 873 -> " cat", look for stop strings
                                                              -> RequestOutput("r1", text "The cat", ids [.., 873])
                                                              -> stops: [("r1", 0)] if a stop string appeared

A stop string is found here, so the engine learns of it afterwards: the caller ends that sample in the
engine (`Engine.finish_sample`), which frees its KV blocks. Until then the engine may have sampled a token
or two more: they come after the stop and are dropped here, as is everything about a request once its
final output is out. A stop token id or EOS ends a sample in the engine itself (finish_reason "stop"):
that last token counts, but its text is not shown.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field

from miniengine.outputs import CompletionOutput, RequestOutput, TextState
from miniengine.sampling_params import SamplingParams
from miniengine.tokenizer import IncrementalDetokenizer, Tokenizer

# The wire format is plain tuples: pickle rebuilds those in C, where a NamedTuple or a dataclass would cost a
# call to its Python-level __new__ for every request and every sample of every step.
#   TokenDelta  = (request_id, samples, finished, num_cached_tokens, first)
#     finished: the engine is done with the request (every sample has its finish_reason)
#     first: (prompt text, prompt token ids, SamplingParams) in a request's first delta only; else None
#   SampleDelta = (index, new token ids, their logprobs or None, finish_reason, stop_reason)
#     stop_reason: the stop token id that ended the sample, if one did
SampleDelta = tuple[int, list[int], list[dict[int, float]] | None, str | None, int | None]
TokenDelta = tuple[str, list[SampleDelta], bool, int, tuple[str | None, list[int], SamplingParams] | None]


@dataclass(slots=True, eq=False)
class _Sample:
    text: TextState
    min_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None

    def add(self, token_ids: list[int], logprobs: list[dict[int, float]] | None, finish_reason: str | None) -> bool:
        """Take a step's tokens; True if a stop string appeared (the text is cut before it, later tokens dropped)."""
        last = len(token_ids) - 1
        for k, token_id in enumerate(token_ids):
            self.token_ids.append(token_id)
            if logprobs is not None and self.logprobs is not None:
                self.logprobs.append(logprobs[k])
            if k == last and finish_reason == "stop":
                break  # a stop token id or EOS: the engine ended the sample on it, and its text is not shown
            if self.text.add_token(token_id, check_stop=len(self.token_ids) >= self.min_tokens):
                self.finish_reason = "stop"
                return True
        self.finish_reason = finish_reason
        return False

    def output(self, index: int) -> CompletionOutput:
        finished = self.finish_reason is not None
        return CompletionOutput(
            index,
            self.text.visible_text(finished),
            self.token_ids.copy(),  # a consumer may keep an old output while newer ones arrive
            self.finish_reason,
            None if self.logprobs is None else self.logprobs.copy(),
            self.text.stop_reason,
        )


@dataclass(slots=True, eq=False)
class _Request:
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _Request] = {}  # requests whose final output is not out yet

    def process(
        self, deltas: list[TokenDelta], quiet: Set[str] = frozenset()
    ) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """A step's deltas -> an output for each request they name (for those in `quiet`, only its final one),
        and the samples (request id, index) that a stop string ended here while the engine still runs them."""
        outputs: list[RequestOutput] = []
        stops: list[tuple[str, int]] = []
        for request_id, samples, _, num_cached_tokens, first in deltas:
            if first is not None:
                self._requests[request_id] = self._start(*first)
            request = self._requests.get(request_id)
            if request is None:  # its final output is out: these tokens came after its stop string
                continue
            finished = True
            for index, token_ids, logprobs, finish_reason, stop_reason in samples:
                sample = request.samples[index]
                if sample.finish_reason is None:
                    if sample.add(token_ids, logprobs, finish_reason):
                        if finish_reason is None:
                            stops.append((request_id, index))
                    elif stop_reason is not None:
                        sample.text.stop_reason = stop_reason
                finished = finished and sample.finish_reason is not None
            if finished:
                del self._requests[request_id]
            if finished or request_id not in quiet:
                outputs.append(
                    RequestOutput(
                        request_id,
                        request.prompt,
                        request.prompt_token_ids,
                        [sample.output(i) for i, sample in enumerate(request.samples)],
                        finished,
                        num_cached_tokens,
                    )  # fmt: skip
                )
        return outputs, stops

    def forget(self, request_id: str) -> None:
        """Drop a request nobody will read to the end (its caller aborted it and left)."""
        self._requests.pop(request_id, None)

    def _start(self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> _Request:
        tokenizer = self.tokenizer
        samples = [
            _Sample(
                TextState(
                    IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
                    if tokenizer
                    else None,
                    params.stop,
                ),
                params.min_tokens,
                logprobs=[] if params.logprobs is not None else None,
            )
            for _ in range(params.n)
        ]
        return _Request(prompt, prompt_token_ids, samples)
