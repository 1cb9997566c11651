"""AsyncEngine: many asyncio streams over one engine loop. Every stream gets exactly its own request's
outputs, equal to running that request alone; cancelling a stream aborts its request and frees its blocks;
bad input raises where the caller awaits; a dead loop ends every stream with an error and says why."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from tiny_models import make_tiny_model

from miniengine import AsyncEngine, Engine, EngineStoppedError, PromptTooLongError, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture
def engine(model_dir):
    return Engine(str(model_dir), max_model_len=64, num_kv_blocks=48, block_size=4, max_num_seqs=8, stat_loggers=[])


def workload(count: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of different lengths, greedy and seeded samples, n=2: enough to batch, chunk and preempt."""
    jobs = []
    for i in range(count):
        prompt = [(7 * i + j) % 500 + 1 for j in range(3 + 5 * (i % 4))]
        params = SamplingParams(max_tokens=4 + 3 * (i % 5), seed=i, n=1 + i % 2, **(GREEDY if i % 3 else {}))
        jobs.append((prompt, params))
    return jobs


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=120))


async def consume(async_engine: AsyncEngine, prompt, params, request_id=None):
    outs = []
    async for out in async_engine.generate(prompt, params, request_id):
        outs.append(out)
    return outs


def assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_each_stream_gets_its_own_outputs(model_dir):
    engine = Engine(str(model_dir), max_model_len=64, num_kv_blocks=20, block_size=4, max_num_seqs=8, stat_loggers=[])
    jobs = workload(16)
    alone = [[c.token_ids for c in engine.generate([p], sp, use_tqdm=False)[0].outputs] for p, sp in jobs]
    async_engine = AsyncEngine(engine)

    async def main():
        return await asyncio.gather(*(consume(async_engine, p, sp) for p, sp in jobs))

    results = run(main())
    async_engine.shutdown()
    assert engine.scheduler.num_preemptions > 0  # batched under KV pressure
    for (prompt, _), outs, expected in zip(jobs, results, alone):
        assert len({o.request_id for o in outs}) == 1 and outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert all(o.prompt_token_ids == prompt for o in outs)
        for earlier, later in zip(outs, outs[1:]):  # each output extends the one before
            for a, b in zip(earlier.outputs, later.outputs):
                assert b.token_ids[: len(a.token_ids)] == a.token_ids
        assert [c.token_ids for c in outs[-1].outputs] == expected
    assert_idle(engine)


def test_cancelling_a_stream_aborts_its_request(engine):
    async_engine = AsyncEngine(engine)
    long_params = SamplingParams(max_tokens=50, **GREEDY)

    async def main():
        started = asyncio.Event()

        async def cancelled_after_first_output():
            async for _ in async_engine.generate([1, 2, 3], long_params):
                started.set()

        task = asyncio.create_task(cancelled_after_first_output())
        other = asyncio.create_task(consume(async_engine, [4, 5, 6], SamplingParams(max_tokens=20, **GREEDY)))
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Leaving an `async for` early (closing the generator) aborts too.
        async with contextlib.aclosing(async_engine.generate([7, 8, 9], long_params)) as stream:
            async for _ in stream:
                break
        return await other

    outs = run(main())
    async_engine.shutdown()
    assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].token_ids) == 20
    assert_idle(engine)


def test_bad_input_raises_where_the_caller_awaits(engine):
    async_engine = AsyncEngine(engine)

    async def main():
        with pytest.raises(PromptTooLongError):
            await consume(async_engine, list(range(1, 80)), SamplingParams())
        # Queued together: the second asks for the id the first holds, and is refused; the first runs on.
        return await asyncio.gather(
            consume(async_engine, [1, 2], SamplingParams(max_tokens=30, **GREEDY), "mine"),
            consume(async_engine, [3, 4], SamplingParams(), "mine"),
            return_exceptions=True,
        )

    outs, refused = run(main())
    async_engine.shutdown()
    assert isinstance(refused, ValueError) and "already in use" in str(refused)
    assert outs[-1].request_id == "mine" and len(outs[-1].outputs[0].token_ids) == 30
    assert_idle(engine)


def test_abort_and_drain_end_streams_with_abort(engine):
    async_engine = AsyncEngine(engine)

    async def first_then_rest(request_id, started):
        outs = []
        async for out in async_engine.generate([5, 6, 7], SamplingParams(max_tokens=60, **GREEDY), request_id):
            outs.append(out)
            started.set()
        return outs

    async def main():
        outs = {}
        for rid in ("aborted", "drained"):
            started = asyncio.Event()
            task = asyncio.create_task(first_then_rest(rid, started))
            await started.wait()
            async_engine.abort(rid) if rid == "aborted" else async_engine.drain()
            outs[rid] = await task
        with pytest.raises(EngineStoppedError, match="shutting down"):
            await consume(async_engine, [1], SamplingParams())
        return outs

    outs = run(main())
    async_engine.shutdown()
    for rid in ("aborted", "drained"):
        assert outs[rid][-1].finished and outs[rid][-1].outputs[0].finish_reason == "abort"
    assert_idle(engine)


def test_a_dead_loop_ends_every_stream_and_says_why(engine):
    async_engine = AsyncEngine(engine)
    real_step = engine.step
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("device lost")
        return real_step()

    engine.step = failing_step

    async def main():
        results = await asyncio.gather(
            *(consume(async_engine, [i + 1, i + 2], SamplingParams(max_tokens=20, **GREEDY)) for i in range(4)),
            return_exceptions=True,
        )
        with pytest.raises(EngineStoppedError, match="device lost"):
            await consume(async_engine, [1], SamplingParams())
        return results

    results = run(main())
    assert all(isinstance(r, EngineStoppedError) and "device lost" in str(r) for r in results)
    assert not async_engine.healthy and isinstance(async_engine.error, RuntimeError)
    async_engine.shutdown()
