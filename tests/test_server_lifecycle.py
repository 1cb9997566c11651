"""The server under pressure and at its end: the API key, overload (503 + Retry-After instead of an
unbounded queue), and SIGTERM in the middle of streams (each ends with "abort", the process exits 0, and so
does the engine process)."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import psutil
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.slow

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(smollm2_path):
    proc = ServerProcess(
        smollm2_path, "--max-num-seqs", "2", "--max-waiting-requests", "2", env={"MINIENGINE_API_KEY": KEY}
    )
    yield proc
    proc.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_api_key_guards_the_api_only(server):
    body = {"prompt": "Hello", "max_tokens": 2}
    assert httpx.post(server.base_url + "/completions", json=body).status_code == 401
    wrong = httpx.post(server.base_url + "/completions", json=body, headers=auth(KEY + "x"))
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.post(server.base_url + "/completions", json=body, headers=auth(KEY)).status_code == 200
    assert httpx.post(server.root + "/tokenize", json={"prompt": "x"}).status_code == 401
    for open_path in ("/health", "/metrics", "/version"):
        assert httpx.get(server.root + open_path).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.base_url, api_key=KEY).models.list().data


def test_overload_is_refused_with_retry_after(server):
    body = {"prompt": "Tell me a story.", "max_tokens": 16, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth(KEY), timeout=300) as client:
            return await asyncio.gather(*(client.post("/completions", json=body) for _ in range(10)))

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "overloaded" in refused.json()["error"]["message"]
    assert all(len(r.json()["choices"][0]["text"]) > 0 for r in responses if r.status_code == 200)
    again = httpx.post(server.base_url + "/completions", json=body, headers=auth(KEY), timeout=300)
    assert again.status_code == 200  # once the queue drained, the server takes requests again


def test_sigterm_ends_streams_with_abort_and_exits_0(server):
    body = {"prompt": "Tell me a long story.", "max_tokens": 16, "ignore_eos": True, "stream": True}

    async def stream(client: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
        lines = []
        async with client.stream("POST", "/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    started.set()
        return lines

    async def main() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth(KEY), timeout=60) as client:
            events = [asyncio.Event() for _ in range(2)]
            tasks = [asyncio.create_task(stream(client, e)) for e in events]
            for event in events:
                await event.wait()
            signalled.append(time.monotonic())  # the clock starts at the signal, not at the streams' set-up
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    children = psutil.Process(server.proc.pid).children()  # the engine process (and multiprocessing's tracker)
    assert any("spawn_main" in " ".join(child.cmdline()) for child in children)
    signalled: list[float] = []
    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    for lines in results:
        assert lines[-1] == "[DONE]"
        assert '"finish_reason":"abort"' in lines[-2].replace(" ", "")
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - signalled[0] < 15
    assert not psutil.wait_procs(children, timeout=5)[1]  # they left with the server: no orphan
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.root + "/health")


def test_a_dead_engine_loop_turns_health_to_503(tmp_path):
    """In process, on a tiny model: a step that raises ends the request in flight with 503, and /health says so."""
    from fastapi.testclient import TestClient
    from tiny_models import make_tiny_model

    from miniengine import AsyncEngine, Engine
    from miniengine.server import ServerConfig, build_app
    from miniengine.server.metrics import PrometheusStatLogger

    engine = Engine(str(make_tiny_model(tmp_path, "llama")), num_kv_blocks=16, block_size=4, stat_loggers=[])
    metrics = PrometheusStatLogger("tiny")
    engine.stat_loggers.append(metrics)
    real_step = engine.step

    def failing_step():
        if engine.scheduler.running:  # the first step that has work to do
            raise RuntimeError("device lost")
        return real_step()

    engine.step = failing_step
    async_engine = AsyncEngine(engine)
    with TestClient(build_app(async_engine, ServerConfig(), metrics, "tiny")) as client:
        assert client.get("/health").status_code == 200
        answer = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert answer.status_code == 503 and "device lost" in answer.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
        again = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert again.status_code == 503
    async_engine.shutdown()
