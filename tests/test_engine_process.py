"""The engine loop in a process of its own (EngineProcess). Outputs across the boundary equal the in-process
ones exactly (per-step token deltas, turned into text by the front end's output processor: n=2, logprobs,
stop strings, aborts); a stop string the front end finds ends the request in the engine process and frees its
blocks; bad input and start-up errors
arrive as their own types, with the engine process's traceback; a model registered in the caller's memory
reaches the engine process; a killed engine process ends every stream with an error and turns /health 503;
no engine process outlives its front end."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_tensor_parallel import DriverOnlyLlama, with_architecture
from tiny_models import make_tiny_model

from miniengine import (
    AsyncEngine,
    Engine,
    EngineProcess,
    EngineStoppedError,
    ModelRegistry,
    PromptTooLongError,
    SamplingParams,
)
from miniengine.distributed import DriverOnlyModelError
from miniengine.engine_process import from_wire, to_wire
from miniengine.models.llama import LlamaForCausalLM
from miniengine.output_processor import OutputProcessor

OPTIONS = dict(device="cpu", num_kv_blocks=64, max_model_len=512, max_num_seqs=8)
CASES = [  # (prompt, params): greedy with a stop string, n=2 seeded with logprobs, a chat-like prompt
    ("The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=[".", " is"])),
    ("Once upon a time", SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=8, logprobs=3)),
    ("List three colors:", SamplingParams(temperature=0, max_tokens=6, logprobs=0, stop=["\n\n"])),
]


@pytest.fixture(scope="module")
def in_process(smollm2_path):
    engine = Engine(smollm2_path, **OPTIONS, stat_loggers=[])
    yield engine
    engine.shutdown()


class Recorder:
    def __init__(self) -> None:
        self.stats = []

    def record(self, stats) -> None:
        self.stats.append(stats)


@pytest.fixture(scope="module")
def engine_process(smollm2_path):
    process = EngineProcess(smollm2_path, **OPTIONS, stat_loggers=[Recorder()])
    async_engine = AsyncEngine(process)
    yield process, async_engine
    async_engine.shutdown()
    process.shutdown()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("llama"), "llama"))


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=120))


def test_token_deltas_through_a_pipe_give_the_engines_own_outputs(in_process):
    """A front end's loop (step_deltas through to_wire, pickled, from_wire, an OutputProcessor of its own,
    finish_sample for each stop string it finds) gives the very outputs the engine's own `step()` gives; a
    step's delta carries one token per sequence that sampled, and no text; every block is free at the end."""
    processor = OutputProcessor(in_process.tokenizer)

    def front_end_step() -> list:
        delta = in_process.step_deltas()
        assert len(set(delta.seq_ids)) == len(delta.seq_ids) == len(delta.token_ids)
        outputs, stops = processor.process(from_wire(pickle.loads(pickle.dumps(to_wire(delta)))))
        for request_id, index in stops:
            in_process.finish_sample(request_id, index)
        return outputs

    runs = []
    for step in (in_process.step, front_end_step):
        in_process.reset_prefix_cache()  # both runs compute every prompt
        for i, (prompt, params) in enumerate(CASES):
            in_process.add_request(prompt, params, f"r{i}")
        in_process.add_request(
            "Tell me a story.", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), "aborted"
        )
        outputs, steps = [], 0
        while in_process.has_unfinished():
            outputs.append(step())
            steps += 1
            if steps == 4:
                in_process.abort("aborted")
        runs.append(outputs)
    assert runs[1] == runs[0]
    finals = {out.request_id: out for outputs in runs[1] for out in outputs if out.finished}
    assert {c.stop_reason for c in finals["r0"].outputs} <= {".", " is"}  # a stop string ended it
    assert {c.finish_reason for c in finals["aborted"].outputs} == {"abort"}
    assert not processor._requests and not in_process.has_unfinished()
    assert in_process.block_manager.num_free_blocks == in_process.block_manager.num_blocks


def test_a_stop_string_found_in_the_front_end_ends_the_request_in_the_engine(in_process, engine_process):
    """The engine process does no string work: the front end finds the stop string and sends Finish, which
    ends the request there at once (not at max_tokens) and frees its blocks; the stat loggers hear of it."""
    engine_process, there = engine_process
    prompt, params = "Once upon a time", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = in_process.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 4 : len(full.text) // 4 + 4]
    recorded = engine_process.stat_loggers[0].stats
    recorded.clear()
    cut = run(collect(there, prompt, dataclasses.replace(params, stop=[stop]), "stopped"))[-1].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and full.text.startswith(cut.text + stop)
    assert len(cut.token_ids) < len(full.token_ids) // 2
    deadline = time.monotonic() + 10
    while not any(r.request_id == "stopped" for s in list(recorded) for r in s.finished):
        assert time.monotonic() < deadline, "the engine process never finished the request"
        time.sleep(0.01)
    (done,) = [r for s in recorded for r in s.finished if r.request_id == "stopped"]
    # At most a step or two past the stop before the Finish arrived, not the 40 tokens of max_tokens.
    assert done.finish_reason == "stop" and done.num_output_tokens <= len(cut.token_ids) + 4
    assert recorded[-1].num_running == 0 and recorded[-1].num_free_kv_blocks == recorded[-1].num_kv_blocks


async def collect(async_engine: AsyncEngine, prompt, params, request_id: str) -> list:
    return [out async for out in async_engine.generate(prompt, params, request_id)]


def test_outputs_across_the_process_equal_those_in_process(in_process, engine_process):
    """One request at a time (so both engines batch alike): the same outputs, bit for bit, logprobs included."""
    (engine_process, there), here = engine_process, AsyncEngine(in_process)
    recorded = engine_process.stat_loggers[0].stats  # the StepStats of every step, forwarded
    before = len(recorded)
    finals = []
    try:
        for i, (prompt, params) in enumerate(CASES):
            mine = run(collect(here, prompt, params, f"r{i}"))
            theirs = run(collect(there, prompt, params, f"r{i}"))
            assert theirs[-1] == mine[-1] and theirs[-1].finished
            for out in theirs[:-1]:  # every output on the way is the final one, cut short
                for c, final in zip(out.outputs, theirs[-1].outputs):
                    assert final.text.startswith(c.text) and final.token_ids[: len(c.token_ids)] == c.token_ids
            finals.append(theirs[-1])
    finally:
        here.shutdown()
    assert {c.stop_reason for c in finals[0].outputs} <= {".", " is"}  # the stop string ended it
    assert all(len(lp) == 4 or len(lp) == 3 for c in finals[1].outputs for lp in c.logprobs)
    delivered = sum(len(c.token_ids) for o in finals for c in o.outputs)
    # The engine may sample a token or two past a stop string before the front end's Finish reaches it.
    assert delivered <= sum(s.num_generation_tokens for s in recorded[before:]) <= delivered + 4
    assert recorded[-1].num_running == 0 and recorded[-1].num_free_kv_blocks == recorded[-1].num_kv_blocks

    async def bad_input() -> None:
        with pytest.raises(PromptTooLongError, match="max_model_len is 512"):
            await collect(there, list(range(100, 700)), SamplingParams(), "long")
        with pytest.raises(TypeError, match="params must be a SamplingParams"):
            await collect(there, "Hi", "not params", "typed")  # type: ignore[arg-type]
        first = asyncio.create_task(collect(there, "Hi", SamplingParams(max_tokens=40, ignore_eos=True), "mine"))
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="'mine' is already in use"):
            await collect(there, "Hello", SamplingParams(), "mine")
        assert len((await first)[-1].outputs[0].token_ids) == 40  # the refused duplicate left it alone

    run(bad_input())
    assert there.healthy and there.num_waiting == 0


def test_start_up_errors_arrive_as_their_own_type(tiny_llama, tmp_path):
    before = set(multiprocessing.active_children())  # the module's engine process, if it runs
    with pytest.raises(ValueError, match="larger than the KV cache can hold") as caught:
        EngineProcess(tiny_llama, device="cpu", num_kv_blocks=4, block_size=4, max_model_len=64, stat_loggers=[])
    assert "in the engine process" in "".join(caught.value.__notes__) and "Traceback" in caught.value.__notes__[0]
    script_class = type("ScriptLlama", (LlamaForCausalLM,), {"__module__": "__main__"})  # as in a user's script
    ModelRegistry.register_model("ScriptLlamaForCausalLM", script_class)
    directory = with_architecture(tiny_llama, tmp_path / "script", "ScriptLlamaForCausalLM")
    with pytest.raises(DriverOnlyModelError, match="the engine process cannot import"):
        EngineProcess(directory, device="cpu", stat_loggers=[])
    assert set(multiprocessing.active_children()) == before


def test_a_model_registered_here_reaches_the_engine_process(tiny_llama, tmp_path):
    """An importable class registered in this process only goes over as "module:Class"; shutdown leaves no
    process behind, and the engine process exits 0."""
    ModelRegistry.register_model("DriverOnlyLlamaForCausalLM", DriverOnlyLlama)
    directory = with_architecture(tiny_llama, tmp_path / "driver", "DriverOnlyLlamaForCausalLM")
    engine = Engine(directory, device="cpu", num_kv_blocks=32, stat_loggers=[])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = engine.generate([[1, 2, 3]], params, use_tqdm=False)[0]
    before = set(multiprocessing.active_children())
    process = EngineProcess(directory, device="cpu", num_kv_blocks=32, stat_loggers=[])
    async_engine = AsyncEngine(process)
    assert run(collect(async_engine, [1, 2, 3], params, "0"))[-1] == expected
    async_engine.shutdown()
    process.shutdown()
    assert process.proc.exitcode == 0 and set(multiprocessing.active_children()) == before


def test_a_killed_engine_process_ends_streams_and_turns_health_503(engine_process):
    """Killed mid-stream (last in this module: it ends the module's engine process), the stream ends with an
    error event, /health says why, and new requests get 503."""
    from fastapi.testclient import TestClient

    from miniengine.server import ServerConfig, build_app
    from miniengine.server.metrics import PrometheusStatLogger

    process, async_engine = engine_process
    metrics = PrometheusStatLogger("smollm2")
    process.stat_loggers.append(metrics)
    body = {"prompt": "Tell me a story.", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with TestClient(build_app(async_engine, ServerConfig(), metrics, "smollm2")) as client:
        assert client.get("/health").status_code == 200
        lines = []
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if len(lines) == 1:
                        os.kill(process.proc.pid, signal.SIGKILL)
        assert lines[-1] == "[DONE]" and "the engine loop died" in lines[-2] and "SIGKILL" in lines[-2]
        health = client.get("/health")
        assert health.status_code == 503 and "SIGKILL" in health.json()["error"]["message"]
        assert client.post("/v1/completions", json={**body, "stream": False}).status_code == 503
    with pytest.raises(EngineStoppedError):
        run(collect(async_engine, [1, 2], SamplingParams(), "late"))
    async_engine.shutdown()
    process.shutdown()
    assert not process.proc.is_alive() and process.proc not in multiprocessing.active_children()


def test_the_engine_process_leaves_when_its_front_end_is_killed(tiny_llama):
    script = (
        "import sys\n"
        "from miniengine import EngineProcess\n"
        "if __name__ == '__main__':\n"
        "    engine = EngineProcess(sys.argv[1], device='cpu', stat_loggers=[])\n"
        "    print(engine.proc.pid, flush=True)\n"
        "    sys.stdin.read()\n"
    )
    front = subprocess.Popen(
        [sys.executable, "-c", script, tiny_llama], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        child = psutil.Process(int(front.stdout.readline()))
        assert child.is_running()
        front.kill()
        front.wait(10)
        start = time.monotonic()
        child.wait(timeout=15)  # raises if it outlives its front end
        assert time.monotonic() - start < 15
    finally:
        front.kill()
