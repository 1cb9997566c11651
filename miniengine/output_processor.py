"""The output processor: each step's new token ids turned into text, stop strings and `RequestOutput`s.

The engine's step reports what is new as one `StepDelta` for the whole batch: a row (sequence id, token id)
per token sampled, in two flat arrays, and the rare news (a request's start, a finish, logprobs) beside them
only when there is some. No text, no per-request object: that is the engine's whole output path, and the
message an engine process sends per step (engine_process.py). Turning it into what a caller reads happens
here, in whichever process the caller lives in: beside the engine (`Engine.step`), or in the front end of an
engine process, which then does all the string work while the engine process runs the next step.

    engine step (StepDelta)                         output processor
    started   [("r1", prompt, ids, params, 7, 0)]   ->  r1 has samples seq 7 (and 8, with n=2)
    seq_ids   [7,   9,   8]                         ->  seq 7: detokenize 873 -> " cat", look for stop strings
    token_ids [873, 13, 402]                            ...
    finished  {9: ("length", None)}                 ->  seq 9's request is done: its final output
                                                    ->  a RequestOutput per request that moved (whole state so far)
                                                    ->  stops: [("r1", 0)] if a stop string appeared in seq 7

A stop string is found here, so the engine learns of it afterwards: the caller ends that sample in the
engine (`Engine.finish_sample`), which frees its KV blocks. Until then the engine may have sampled a token
or two more: they come after the stop and are dropped here, as is everything about a request once its
final output is out. A stop token id or EOS ends a sample in the engine itself (finish_reason "stop"):
that last token counts, but its text is not shown.
"""

from __future__ import annotations

from array import array
from collections.abc import Set
from dataclasses import dataclass, field
from operator import attrgetter

from miniengine.outputs import CompletionOutput, RequestOutput, TextState
from miniengine.sampling_params import SamplingParams
from miniengine.tokenizer import IncrementalDetokenizer, Tokenizer

# A request's first report: (request id, prompt text or None, prompt token ids, SamplingParams, the seq id of
# sample 0 (sample i is that + i), prompt tokens the prefix cache supplied)
RequestStart = tuple[str, str | None, list[int], SamplingParams, int, int]


@dataclass(slots=True, eq=False)
class StepDelta:
    """What one engine step produced, for every request at once (plain types only: it crosses a pipe)."""

    seq_ids: array = field(default_factory=lambda: array("q"))  # row i: the sequence that sampled token i
    token_ids: array = field(default_factory=lambda: array("i"))
    # The rare parts, empty in most steps:
    started: list[RequestStart] = field(default_factory=list)  # requests reported for the first time
    finished: dict[int, tuple[str, int | None]] = field(default_factory=dict)  # seq id -> (reason, stop token id)
    logprobs: dict[int, dict[int, float]] = field(default_factory=dict)  # row -> {token id: logprob}
    retired: list[str] = field(default_factory=list)  # requests the engine is done with (their ids are free)


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    first_seq_id: int
    num_cached_tokens: int
    samples: list[_Sample] = field(default_factory=list)
    num_running: int = 0  # samples without a finish_reason yet


@dataclass(slots=True, eq=False)
class _Sample:
    request: _Request
    index: int
    text: TextState
    min_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.request.num_running -= 1

    def output(self) -> CompletionOutput:
        finished = self.finish_reason is not None
        return CompletionOutput(
            self.index,
            self.text.visible_text(finished),
            self.token_ids.copy(),  # a consumer may keep an old output while newer ones arrive
            self.finish_reason,
            None if self.logprobs is None else self.logprobs.copy(),
            self.text.stop_reason,
        )


_arrival = attrgetter("first_seq_id")


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _Request] = {}  # requests whose final output is not out yet
        self._samples: dict[int, _Sample] = {}  # seq id -> its sample, for those requests

    def process(
        self, delta: StepDelta, quiet: Set[str] = frozenset()
    ) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """A step's delta -> an output for each request it moved, in arrival order (for those in `quiet`, only
        the final one), and the samples (request id, index) that a stop string ended here while the engine
        still runs them."""
        for start in delta.started:
            self._start(*start)
        samples, finished, logprobs = self._samples, delta.finished, delta.logprobs
        moved: dict[_Request, None] = {}
        stops: list[tuple[str, int]] = []
        # Per row: plain loop, no helper calls but the detokenizer (this is the front end's hot path).
        for row, (seq_id, token_id) in enumerate(zip(delta.seq_ids, delta.token_ids)):
            sample = samples.get(seq_id)
            if sample is None:  # its request's final output is out: a token past its stop string
                continue
            moved[sample.request] = None
            if sample.finish_reason is not None:
                continue
            sample.token_ids.append(token_id)
            if logprobs and sample.logprobs is not None:
                sample.logprobs.append(logprobs[row])
            end = finished.get(seq_id) if finished else None
            if end is not None and end[0] == "stop":
                continue  # a stop token id or EOS ended it: it counts, but its text is not shown
            if sample.text.add_token(token_id, check_stop=len(sample.token_ids) >= sample.min_tokens):
                sample.finish("stop")
                if end is None:  # the engine still runs it: the caller ends it there
                    stops.append((sample.request.request_id, sample.index))
        for seq_id, (reason, stop_token_id) in finished.items():
            sample = samples.get(seq_id)
            if sample is None:
                continue
            moved[sample.request] = None
            if sample.finish_reason is None:
                sample.finish(reason)
                if stop_token_id is not None:
                    sample.text.stop_reason = stop_token_id
        outputs: list[RequestOutput] = []
        for request in sorted(moved, key=_arrival) if len(moved) > 1 else moved:
            done = request.num_running == 0
            if done:
                self._forget(request)
            if done or request.request_id not in quiet:
                outputs.append(
                    RequestOutput(
                        request.request_id,
                        request.prompt,
                        request.prompt_token_ids,
                        [sample.output() for sample in request.samples],
                        done,
                        request.num_cached_tokens,
                    )  # fmt: skip
                )
        return outputs, stops

    def forget(self, request_id: str) -> None:
        """Drop a request nobody will read to the end (its caller aborted it and left)."""
        request = self._requests.get(request_id)
        if request is not None:
            self._forget(request)

    def _forget(self, request: _Request) -> None:
        if self._requests.get(request.request_id) is request:
            del self._requests[request.request_id]
        for i in range(len(request.samples)):
            self._samples.pop(request.first_seq_id + i, None)

    def _start(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first_seq_id: int,
        num_cached_tokens: int,
    ) -> None:
        tokenizer = self.tokenizer
        request = _Request(request_id, prompt, prompt_token_ids, first_seq_id, num_cached_tokens)
        for index in range(params.n):
            detokenizer = (
                IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens) if tokenizer else None
            )
            sample = _Sample(
                request,
                index,
                TextState(detokenizer, params.stop),
                params.min_tokens,
                logprobs=[] if params.logprobs is not None else None,
            )
            request.samples.append(sample)
            self._samples[first_seq_id + index] = sample
        request.num_running = params.n
        self._requests[request_id] = request
