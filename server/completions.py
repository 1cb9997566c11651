"""From an OpenAI request to engine requests and back, for /v1/completions and /v1/chat/completions.

    CompletionRequest / ChatCompletionRequest
      -> Job: the prompts as token ids (chat through the model's template) and one SamplingParams,
         checked against the context and the server's limits                  400 before anything runs
      -> start(): one AsyncEngine request per prompt (its n samples ride in that one request)
      -> outputs(): the requests' outputs, merged as they come
      -> response(): one JSON body      or   events(): server-sent events, each new piece of text a
                                             chunk, then `data: [DONE]`
Choices are numbered prompt * n + sample, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import accumulate

from miniengine import AsyncEngine, Engine, EngineProcess, EngineStoppedError, RequestOutput, SamplingParams
from miniengine.async_engine import RequestStream
from miniengine.outputs import CompletionOutput
from miniengine.server.config import ServerConfig
from miniengine.server.errors import APIError
from miniengine.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the context's end
# json.dumps(x, ensure_ascii=False), less the new JSONEncoder that dumps builds on every call with an argument
_to_json = json.JSONEncoder(ensure_ascii=False).encode
# Response ids need to be unique, not secret: uuid4 reads the OS's random source per call (~0.1 ms on a VM,
# a tenth of the HTTP side's whole intake of a request), a generator seeded from it once does not.
_ids = random.Random()


@dataclass(eq=False)
class Job:
    chat: bool
    model: str
    engine: Engine | EngineProcess
    prompts: list[list[int]]
    params: SamplingParams
    echo: list[str] | None = None  # per prompt, the text put before its completions (`echo`)
    top_logprobs: int | None = None  # how many alternatives a token's logprobs list (logprobs on)
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    latest: list[RequestOutput | None] = field(default_factory=list)  # the newest output of each prompt
    streams: list[RequestStream] = field(default_factory=list)
    _head: str | None = None  # the start of every event of the stream, up to its choices

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{_ids.getrandbits(96):024x}"
        self.latest = [None] * len(self.prompts)

    # ---- running --------------------------------------------------------------------------------------------

    async def start(self, async_engine: AsyncEngine, config: ServerConfig) -> None:
        """Hand every prompt to the engine, or none: overload, shutdown and bad input raise APIError."""
        waiting = async_engine.num_waiting
        if waiting + len(self.prompts) > config.max_waiting_requests:
            raise APIError(
                503,
                f"the server is overloaded: {waiting} requests are waiting "
                f"(--max-waiting-requests {config.max_waiting_requests}); retry shortly",
                headers={"Retry-After": "1"},
            )
        try:
            for i, ids in enumerate(self.prompts):
                stream = await async_engine.add_request({"prompt_token_ids": ids}, self.params, f"{self.id}-{i}")
                self.streams.append(stream)
        except BaseException as error:
            self.close()
            if isinstance(error, EngineStoppedError):
                raise APIError(503, str(error), headers={"Retry-After": "1"}) from None
            if isinstance(error, ValueError | TypeError):
                raise APIError(400, str(error), "prompt") from None
            raise

    def close(self) -> None:
        """Abort whatever still runs (a client that left, a failure): its KV blocks return to the pool."""
        for stream in self.streams:
            stream.close()

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as the engine produces them, until every prompt's request finished."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                self.latest[0] = out
                yield 0, out
            return
        merged: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    merged.put_nowait((i, out))
            except BaseException as error:
                merged.put_nowait((i, error))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                self.latest[i] = item
                remaining -= item.finished
                yield i, item
        finally:
            for task in tasks:
                task.cancel()

    async def response(self) -> CompletionResponse | ChatCompletionResponse:
        async for _ in self.outputs():
            pass
        finals = [out for out in self.latest if out is not None]
        if self.chat:
            choices = [
                ChatChoice(
                    index=self._index(i, c),
                    message=AssistantMessage(content=c.text),
                    logprobs=self._chat_logprobs(c.token_ids, c.logprobs),
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                    stop_reason=c.stop_reason,
                )
                for i, out in enumerate(finals)
                for c in out.outputs
            ]
            return ChatCompletionResponse(
                id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
            )
        choices = [
            CompletionChoice(
                index=self._index(i, c),
                text=(self.echo[i] if self.echo else "") + c.text,
                logprobs=self._completion_logprobs(c.token_ids, c.logprobs, 0),
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
                stop_reason=c.stop_reason,
            )
            for i, out in enumerate(finals)
            for c in out.outputs
        ]
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )

    async def events(self) -> AsyncIterator[str]:
        """The response as server-sent events; ends the requests if the client leaves mid-stream."""
        num_choices = self.params.n * len(self.prompts)
        sent_chars, sent_tokens, done = [0] * num_choices, [0] * num_choices, [False] * num_choices
        try:
            if self.chat:
                first = [_choice(k, "delta", {"role": "assistant", "content": ""}) for k in range(num_choices)]
                yield self._chunk(first)
            async for i, out in self.outputs():
                choices = []
                for c in out.outputs:
                    k = self._index(i, c)
                    text = c.text[sent_chars[k] :]
                    num_tokens = len(c.token_ids)
                    new_tokens = num_tokens > sent_tokens[k]
                    if done[k] or not (text or c.finished or (new_tokens and self.top_logprobs is not None)):
                        continue
                    logprobs = None
                    if self.top_logprobs is not None and c.logprobs is not None:
                        ids, values = c.token_ids[sent_tokens[k] :], c.logprobs[sent_tokens[k] :]
                        found = (
                            self._chat_logprobs(ids, values)
                            if self.chat
                            else self._completion_logprobs(ids, values, sent_chars[k])
                        )
                        logprobs = found.model_dump(mode="json") if found is not None else None
                    if self.chat:
                        choice = _choice(k, "delta", {"content": text}, logprobs, c.finish_reason, c.stop_reason)
                    else:
                        prefix = self.echo[i] if self.echo and sent_chars[k] == sent_tokens[k] == 0 else ""
                        choice = _choice(k, "text", prefix + text, logprobs, c.finish_reason, c.stop_reason)
                    choices.append(choice)
                    sent_chars[k], sent_tokens[k], done[k] = len(c.text), num_tokens, c.finished
                if choices:
                    yield self._chunk(choices)
            if self.include_usage:
                yield self._chunk([], self.usage())
        except EngineStoppedError as error:  # the headers are gone: the error becomes the last event
            yield f"data: {json.dumps(APIError(503, str(error)).body())}\n\n"
        finally:
            self.close()
        yield "data: [DONE]\n\n"

    # ---- formatting -----------------------------------------------------------------------------------------

    def _index(self, prompt_index: int, c: CompletionOutput) -> int:
        return prompt_index * self.params.n + c.index

    def _chunk(self, choices: list[dict], usage: Usage | None = None) -> str:
        """One event: a ChatCompletionChunk (chat) or CompletionResponse, as its pydantic model would write it
        (a chat delta lists only what it carries; `usage` only where the client asked for it). A stream sends
        one of these per output of every request: plain dicts and one json.dumps, no model per chunk."""
        if self._head is None:
            kind = ChatCompletionChunk if self.chat else CompletionResponse
            empty = kind(id=self.id, created=self.created, model=self.model, choices=[]).model_dump(mode="json")
            del empty["usage"]
            text = json.dumps(empty, ensure_ascii=False)
            assert text.endswith(', "choices": []}')
            self._head = "data: " + text[: -len("[]}")]
        if usage is not None:
            tail = f', "usage": {_to_json(usage.model_dump(mode="json"))}}}\n\n'
        else:
            tail = ', "usage": null}\n\n' if self.include_usage else "}\n\n"
        return self._head + _to_json(choices) + tail

    def usage(self) -> Usage:
        finals = [out for out in self.latest if out is not None]
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
        cached = sum(out.num_cached_tokens for out in finals)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details={"cached_tokens": cached},
        )

    def summary(self) -> str:
        """One line for the request log: id, tokens in and out, how each choice ended."""
        usage = self.usage()
        cached = sum(out.num_cached_tokens for out in self.latest if out)
        reasons = sorted({c.finish_reason or "unfinished" for out in self.latest if out for c in out.outputs})
        return (
            f"{self.id} prompt_tokens={usage.prompt_tokens} output_tokens={usage.completion_tokens} "
            f"cached_tokens={cached} finish={','.join(reasons) or 'none'}"
        )

    def _token(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False) if self.engine.tokenizer else ""

    def _top(self, logprobs: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(logprobs.items(), key=lambda kv: -kv[1])[: self.top_logprobs]

    def _completion_logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]] | None, offset: int
    ) -> CompletionLogprobs | None:
        if self.top_logprobs is None or logprobs is None:
            return None
        tokens = [self._token(t) for t in token_ids]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.get(t) for t, lp in zip(token_ids, logprobs)],
            top_logprobs=[{self._token(k): v for k, v in self._top(lp)} for lp in logprobs],
            text_offset=[offset + start for start in accumulate((len(s) for s in tokens[:-1]), initial=0)],
        )

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> ChoiceLogprobs | None:
        if self.top_logprobs is None or logprobs is None:
            return None

        def top(token_id: int, value: float) -> TopLogprob:
            text = self._token(token_id)
            return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

        content = [
            TokenLogprob(**top(t, lp[t]).model_dump(), top_logprobs=[top(k, v) for k, v in self._top(lp)])
            for t, lp in zip(token_ids, logprobs)
        ]
        return ChoiceLogprobs(content=content)


def _choice(
    index: int,
    name: str,
    value: str | dict,
    logprobs: dict | None = None,
    finish_reason: str | None = None,
    stop_reason: str | int | None = None,
) -> dict:
    """A streamed choice as a dict: `name` is "text" (a completion) or "delta" (chat), in the fields' order
    of CompletionChoice and ChatChunkChoice."""
    return {
        "index": index,
        name: value,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }


# ---- requests -> jobs ------------------------------------------------------------------------------------------


def completion_job(body: CompletionRequest, engine: Engine | EngineProcess, config: ServerConfig, model: str) -> Job:
    raw = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else list(body.prompt)
    if len(raw) > config.max_prompts:
        raise APIError(
            400, f"{len(raw)} prompts in one request; this server takes at most {config.max_prompts}", "prompt"
        )
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs needs the prompt's logprobs, which miniengine does not compute", "echo")
    prompts = [_tokenize(p, engine) for p in raw]  # type: ignore[arg-type]
    max_tokens = _max_tokens(
        body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, prompts, engine, config, "max_tokens", "prompt"
    )
    echo = None
    if body.echo:
        echo = [p if isinstance(p, str) else engine.tokenizer.decode(p) if engine.tokenizer else "" for p in raw]
    return Job(
        chat=False,
        model=model,
        engine=engine,
        prompts=prompts,
        params=_sampling_params(body, max_tokens, body.logprobs, config),
        echo=echo,
        top_logprobs=body.logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def chat_job(body: ChatCompletionRequest, engine: Engine | EngineProcess, config: ServerConfig, model: str) -> Job:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    ids = chat_prompt_ids(body.messages, engine)
    requested, param = (body.max_completion_tokens, "max_completion_tokens")
    if requested is None:
        requested, param = body.max_tokens, "max_tokens"
    max_tokens = _max_tokens(requested, None, [ids], engine, config, param, "messages")
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Job(
        chat=True,
        model=model,
        engine=engine,
        prompts=[ids],
        params=_sampling_params(body, max_tokens, top_logprobs, config),
        top_logprobs=top_logprobs,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )


def chat_prompt_ids(messages: list[ChatMessage], engine: Engine | EngineProcess) -> list[int]:
    """The conversation under the model's chat template, as token ids (text parts of a message joined)."""
    plain = [
        {
            "role": m.role,
            "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or []),
        }
        for m in messages
    ]
    try:
        ids = engine.chat_prompt(plain)["prompt_token_ids"]
    except Exception as error:  # the template is the model's own code: whatever it raises, these messages caused
        raise APIError(400, f"the chat template cannot render these messages: {error}", "messages") from None
    _check_ids(ids, engine, "messages")
    return ids


def _tokenize(prompt: str | list[int], engine: Engine | EngineProcess) -> list[int]:
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
        ids = engine.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    _check_ids(ids, engine, "prompt")
    return ids


def _check_ids(ids: list[int], engine: Engine | EngineProcess, param: str) -> None:
    if not ids:
        raise APIError(400, "the prompt is empty: it needs at least one token", param)
    vocab = engine.hf_config.vocab_size
    if max(ids) >= vocab:
        raise APIError(400, f"token id {max(ids)} is outside the vocabulary [0, {vocab})", param)


def _max_tokens(
    requested: int | None,
    default: int | None,
    prompts: list[list[int]],
    engine: Engine | EngineProcess,
    config: ServerConfig,
    param: str,
    prompt_param: str,
) -> int:
    """The tokens each completion may generate: what was asked, or the default, within context and limits."""
    context, longest = engine.max_model_len, max(len(ids) for ids in prompts)
    room = context - longest
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {longest} tokens, but this model's context is {context} tokens: shorten the prompt",
            prompt_param,
        )
    cap = config.max_completion_tokens
    if requested is None:
        value = room if default is None else min(default, room)
        return value if cap is None else min(value, cap)
    if cap is not None and requested > cap:
        raise APIError(400, f"{param}={requested} is above this server's limit of {cap} tokens", param)
    if requested > room:
        raise APIError(
            400,
            f"this model's context is {context} tokens, but the prompt has {longest} tokens and {param} asks for "
            f"{requested} more ({longest + requested} in all): shorten the prompt or lower {param}",
            param,
        )
    return requested


def _sampling_params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None, config: ServerConfig
) -> SamplingParams:
    if body.n > config.max_n:
        raise APIError(400, f"n={body.n} is above this server's limit of {config.max_n}", "n")
    try:
        return SamplingParams(
            n=body.n,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop,  # type: ignore[arg-type]
            stop_token_ids=body.stop_token_ids,  # type: ignore[arg-type]
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as error:
        field_name = re.search(r"SamplingParams\.(\w+)=", str(error))
        raise APIError(400, str(error), field_name.group(1) if field_name else None) from None
