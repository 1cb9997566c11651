"""`miniengine serve` driven by the official `openai` client: the real server in a child process, the real
SmolLM2 on the CPU. Completions and chat, streamed and not; n, stop strings, seeds, logprobs, echo, usage;
every error answered as OpenAI answers it; 32 concurrent streams with a third of them leaving early."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from server_process import ServerProcess, metric

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    proc = ServerProcess(smollm2_path, "--max-n", "4", "--max-prompts", "4", "--max-body-bytes", "65536")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def post(server, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    return httpx.post(server.root + path, content=content, headers=headers, timeout=120, **kwargs)


def test_models_health_version_and_tokenize(server, client, model):
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    assert httpx.get(server.root + "/health").json() == {"status": "ok"}
    assert httpx.get(server.root + "/version").json()["version"]
    ids = post(server, "/tokenize", {"prompt": PROMPT}).json()
    assert ids["count"] == len(ids["tokens"]) == 5 and ids["max_model_len"] == 1024
    assert post(server, "/detokenize", {"tokens": ids["tokens"]}).json() == {"prompt": PROMPT}
    chat_ids = post(server, "/tokenize", {"messages": CHAT}).json()["tokens"]
    assert post(server, "/detokenize", {"tokens": chat_ids}).json()["prompt"].endswith("assistant\n")


def test_greedy_stream_equals_the_whole_answer(client, model):
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert "Paris" in whole.choices[0].text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == 5 and whole.usage.total_tokens == 5 + whole.usage.completion_tokens
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    answer = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    assert "Paris" in answer.choices[0].message.content and answer.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_n_samples_of_several_prompts(client, model):
    out = client.completions.create(
        model=model, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=8, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5 + 4, 4 * 8)
    assert out.choices[0].text != out.choices[1].text  # two samples of one prompt
    stream = client.completions.create(
        model=model, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=8, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True}, stream=True,
    )  # fmt: skip
    texts, ends = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            ends.setdefault(c.index, []).extend([c.finish_reason] if c.finish_reason else [])
    assert texts == {c.index: c.text for c in out.choices}  # seeded: the same samples, streamed
    assert ends == {k: ["length"] for k in range(4)}  # each choice ends once
    tokens = client.completions.create(model=model, prompt=[[1, 2, 3], [4, 5]], max_tokens=4, temperature=0)
    assert len(tokens.choices) == 2 and tokens.usage.prompt_tokens == 5


def test_stop_string_ends_the_text_before_it(server, client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stops_before = metric(
        httpx.get(server.root + "/metrics").text, "miniengine:request_success_total", finished_reason="stop"
    )
    # Short of max_tokens: the server finds the stop string, and only its Finish ends the request with "stop" there.
    cut = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)
    deadline = time.monotonic() + 10
    while (text := httpx.get(server.root + "/metrics").text) and time.monotonic() < deadline:
        if metric(text, "miniengine:request_success_total", finished_reason="stop") == stops_before + 1:
            break
        time.sleep(0.05)
    assert metric(text, "miniengine:request_success_total", finished_reason="stop") == stops_before + 1
    assert metric(text, "miniengine:num_kv_blocks_used") == 0 and metric(text, "miniengine:num_requests_running") == 0
    streamed = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_seed_reproduces_a_sample(client, model):
    def sample(seed: int) -> str:
        out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=1.5, seed=seed)
        return out.choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_logprobs_in_openai_shapes(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0 and top[token] == pytest.approx(max(top.values()))  # greedy: the best
    chat = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    ).choices[0]
    content = chat.logprobs.content
    assert "".join(t.token for t in content) == chat.message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    assert bytes(content[0].bytes).decode() == content[0].token


def test_echo_puts_the_prompt_first(client, model):
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].text == PROMPT + plain.choices[0].text


def assert_error(response: httpx.Response, status: int, *words: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(w in error["message"] for w in words), error["message"]
    if param is not None:
        assert error["param"] == param


def test_bad_requests_get_openai_errors(server, client, model):
    assert_error(post(server, "/v1/completions", b'{"prompt": "x", '), 400, "not valid JSON")
    assert_error(
        post(server, "/v1/completions", {"prompt": "x", "max_tokens": "8"}), 400, "integer", param="max_tokens"
    )
    assert_error(post(server, "/v1/completions", {"prompt": 3}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "temperature": -1}), 400, param="temperature")
    assert_error(post(server, "/v1/chat/completions", {"messages": []}), 400, param="messages")
    assert_error(post(server, "/v1/completions", {"prompt": [1, 10**6]}), 400, "vocabulary", param="prompt")
    long_prompt = [1] * 1020
    assert_error(
        post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 16}),
        400, "1024", "1020", "16", param="max_tokens",
    )  # fmt: skip
    assert_error(post(server, "/v1/completions", {"prompt": [1] * 1024}), 400, "1024", param="prompt")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "model": "gpt-9"}), 404, "gpt-9", param="model")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "n": 5}), 400, "limit of 4", param="n")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "max_tokens": 17}), 400, "16", param="max_tokens")
    assert_error(post(server, "/v1/completions", {"prompt": ["x"] * 5}), 400, "at most 4", param="prompt")
    assert_error(post(server, "/v1/completions", {"prompt": "x" * 70_000}), 413, "65,536")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "min_tokens": 20}), 400, param="min_tokens")
    assert_error(post(server, "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}), 400, param="top_logprobs")
    assert httpx.get(server.root + "/v1/nowhere").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi " * 1100}])
    # The server is unharmed: the next request is answered.
    assert client.completions.create(model=model, prompt=PROMPT, max_tokens=2).choices[0].text


def test_32_streams_with_a_third_leaving_early(server, model):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    before = httpx.get(server.root + "/metrics").text

    async def one(i: int) -> str | None:
        kind = i % 6  # 0: leaves before its first token, 3: after its first chunk, others read to the end
        stream = await client.completions.create(
            model=model, prompt=f"Story number {i}:", max_tokens=16, temperature=0.8, seed=i, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        if kind == 0:
            await stream.close()
            return None
        pieces, reason = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
            if kind == 3:
                await stream.close()
                return None
        assert reason == "length"
        return "".join(pieces)

    async def bad(i: int) -> None:  # failing requests among them stall nobody
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model=model, prompt=[1, 10**6 + i], max_tokens=4, stream=i % 2 == 0)

    async def main() -> list[str | None]:
        try:
            results = await asyncio.gather(*(one(i) for i in range(32)), *(bad(i) for i in range(4)))
            return results[:32]
        finally:
            await client.close()

    results = asyncio.run(asyncio.wait_for(main(), timeout=300))
    left = sum(r is None for r in results)
    assert left == 11 and all(r for r in results if r is not None)

    deadline = time.monotonic() + 30
    while True:  # the aborts reach the engine within a step or two
        after = httpx.get(server.root + "/metrics").text
        aborted = metric(after, "miniengine:request_success_total", finished_reason="abort") - metric(
            before, "miniengine:request_success_total", finished_reason="abort"
        )
        if aborted == left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert aborted == left
    assert metric(after, "miniengine:num_kv_blocks_used") == 0
    assert metric(after, "miniengine:num_requests_running") == 0
    assert metric(after, "miniengine:generation_tokens_total") > 16 * 21
    # Every token computed was computed in some step: the step histogram's tokens are the two counters' sum
    # (read again while a last step may still be on its way: a scrape is not one instant).
    for _ in range(50):
        text = httpx.get(server.root + "/metrics").text
        computed = metric(text, "miniengine:prompt_tokens_total") + metric(text, "miniengine:generation_tokens_total")
        if metric(text, "miniengine:iteration_tokens_total_sum") == computed:
            break
        time.sleep(0.1)
    assert metric(text, "miniengine:iteration_tokens_total_sum") == computed
    steps = metric(text, "miniengine:engine_step_seconds_count")
    assert steps == metric(text, "miniengine:iteration_tokens_total_count") > 0
    sync = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    assert "Paris" in sync.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text


def test_a_client_gone_before_its_answer_aborts_it(server, model):
    before = metric(
        httpx.get(server.root + "/metrics").text, "miniengine:request_success_total", finished_reason="abort"
    )
    body = {"prompt": PROMPT, "max_tokens": 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(server.root + "/metrics").text
        if metric(text, "miniengine:request_success_total", finished_reason="abort") == before + 1:
            break
        time.sleep(0.2)
    assert metric(text, "miniengine:request_success_total", finished_reason="abort") == before + 1
    assert metric(text, "miniengine:num_kv_blocks_used") == 0
    assert "499" in server.log_text()  # its log line


def test_one_log_line_per_request(server, client, model):
    def lines() -> list[str]:
        return [x for x in server.log_text().splitlines() if "POST /v1/completions 200" in x]

    before = len(lines())
    client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 10  # the line is written once the response is out: it may trail the client

    def mine() -> list[str]:  # (an earlier test's request may log after this one's started)
        return [x for x in lines()[before:] if "prompt_tokens=5 output_tokens=3" in x]

    while not mine() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(mine()) == 1, lines()[before:]
    assert "finish=length" in mine()[0] and "cmpl-" in mine()[0]
