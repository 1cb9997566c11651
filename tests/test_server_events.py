"""The streamed events of a Job, without a server: each event is written without a pydantic model per chunk,
so each must be exactly what its model (CompletionResponse or ChatCompletionChunk) writes of itself, and
the text and tokens they carry must add up to the outputs they came from."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from miniengine import RequestOutput, SamplingParams
from miniengine.outputs import CompletionOutput
from miniengine.server.completions import Job
from miniengine.server.protocol import ChatCompletionChunk, CompletionResponse


class FakeStream:
    """A request's outputs, as an AsyncEngine stream hands them over."""

    def __init__(self, outputs: list[RequestOutput]) -> None:
        self.outputs, self.closed = list(outputs), False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.outputs:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self.outputs.pop(0)

    def close(self) -> None:
        self.closed = True


class FakeTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(0x61 + i % 26) if i % 7 else "é" for i in ids)


def outputs_of(request_id: str, texts: list[list[str]], stops: list, logprobs: bool) -> list[RequestOutput]:
    """Growing outputs of one request: sample j has the pieces texts[j], one token each, then finishes."""
    steps = max(len(t) for t in texts)
    outs = []
    for step in range(1, steps + 1):
        samples = []
        for j, pieces in enumerate(texts):
            n = min(step, len(pieces))
            done = n == len(pieces)
            ids = [10 * j + t for t in range(n)]
            samples.append(
                CompletionOutput(
                    j,
                    "".join(pieces[:n]),
                    ids,
                    ("stop" if stops[j] is not None else "length") if done else None,
                    [{t: -0.5, t + 1: -1.25} for t in ids] if logprobs else None,
                    stops[j] if done else None,
                )
            )
        outs.append(RequestOutput(request_id, None, [1, 2, 3], samples, step == steps, 1))
    return outs


def reference(event: str, chat: bool, include_usage: bool) -> str:
    """The event as the pydantic model writes it: dumped, usage dropped unless asked for, deltas only what
    they carry."""
    kind = ChatCompletionChunk if chat else CompletionResponse
    data = kind.model_validate(json.loads(event[len("data: ") : -2])).model_dump(mode="json")
    if data["usage"] is None and not include_usage:
        del data["usage"]
    for choice in data["choices"]:
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
@pytest.mark.parametrize("logprobs", [None, 1], ids=["plain", "logprobs"])
def test_events_are_what_the_models_write(chat, include_usage, logprobs):
    texts = [["Caf", "é ", "☕", ' "quoted"\n'], ["a", "", "b\\"]]
    stops, num_prompts = [" the end", 7], 1 if chat else 2
    job = Job(
        chat=chat,
        model="m/ü",
        engine=SimpleNamespace(tokenizer=FakeTokenizer()),
        prompts=[[1, 2, 3]] * num_prompts,
        params=SamplingParams(n=2, max_tokens=8),
        echo=None if chat else ["P0 ", "P1 "],
        top_logprobs=logprobs,
        include_usage=include_usage,
    )
    finals = []
    for i in range(num_prompts):
        outs = outputs_of(f"{job.id}-{i}", texts, stops, logprobs is not None)
        finals.append(outs[-1])
        job.streams.append(FakeStream(outs))

    async def collect() -> list[str]:
        return [event async for event in job.events()]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n" and all(s.closed for s in job.streams)
    for event in events[:-1]:
        assert event == reference(event, chat, include_usage)
    chunks = [json.loads(e[len("data: ") : -2]) for e in events[:-1]]
    assert all(c["object"] == ("chat.completion.chunk" if chat else "text_completion") for c in chunks)
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == num_prompts * 7
    streamed: dict[int, str] = {}
    tokens: dict[int, int] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            k = choice["index"]
            piece = choice["delta"].get("content", "") if chat else choice["text"]
            streamed[k] = streamed.get(k, "") + piece
            if choice["logprobs"] is not None:
                tokens[k] = tokens.get(k, 0) + len(
                    choice["logprobs"]["content"] if chat else choice["logprobs"]["tokens"]
                )
    for i, out in enumerate(finals):
        for c in out.outputs:
            k = i * 2 + c.index
            assert streamed[k] == ("" if chat else f"P{i} ") + c.text
            if logprobs is not None:
                assert tokens[k] == len(c.token_ids)
