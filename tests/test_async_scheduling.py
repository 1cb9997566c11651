"""Async scheduling (miniengine/async_scheduling.py) on the CPU: the tokens of synchronous steps, exactly.

The CPU runs the model in the calling thread, so nothing overlaps here, but all of the logic runs: the
placeholders, ids fed to the next step on the device (here CPU tensors), the extra step of a sequence that
turns out finished, preemption while a step is in flight, aborts, n > 1 siblings sharing blocks, the prefix
cache, and penalties (whose steps wait for the ids first). A tiny random Llama computes each row alone, so
the same sequence gives the same tokens however the steps batch it.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from tiny_models import make_tiny_model

from miniengine import Engine, SamplingParams
from miniengine.model_runner import ModelRunner
from miniengine.sampler import Sampled


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only adds waiting, which a busy machine makes long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_next_step_is_launched_before_the_last_tokens_are_read(model_dir, monkeypatch):
    events = []
    launch, results = ModelRunner.launch, Sampled.results

    def logged_launch(self, batch, sampler, fed=None):
        events.append("launch")
        return launch(self, batch, sampler, fed)

    def logged_results(self):
        events.append("read")
        return results(self)

    monkeypatch.setattr(ModelRunner, "launch", logged_launch)
    monkeypatch.setattr(Sampled, "results", logged_results)
    engine = Engine(str(model_dir), num_kv_blocks=16, block_size=4, async_scheduling=True, stat_loggers=[])
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    # prefill, then two decodes; the last decode runs once more before its sequence is seen to be done
    assert events == ["launch", "launch", "read", "launch", "read", "launch", "read"]
    assert len(out.outputs[0].token_ids) == 3 and not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_scheduling_is_off_on_the_cpu_and_refused_with_tensor_parallel(model_dir):
    assert Engine(str(model_dir), num_kv_blocks=16, block_size=4, stat_loggers=[]).async_scheduling is None
    with pytest.raises(ValueError, match="async_scheduling needs the whole model"):
        Engine(str(model_dir), tensor_parallel_size=2, async_scheduling=True)


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    request = st.fixed_dictionaries(
        {
            "prompt": st.lists(st.integers(1, 4), min_size=1, max_size=20),  # few tokens: prefixes repeat
            "max_tokens": st.integers(1, 12),
            "n": st.integers(1, 3),
            "seed": st.one_of(st.none(), st.integers(0, 9)),  # None: greedy
            "stops": st.lists(st.integers(0, 511), max_size=40),  # ~40 of 512 ids: some requests stop early
            "penalty": st.booleans(),
            "logprobs": st.one_of(st.none(), st.integers(0, 2)),
            "abort_at": st.one_of(st.none(), st.integers(1, 6)),  # abort once this many tokens were seen
        }
    )
    requests = draw(st.lists(request, min_size=1, max_size=5))
    block_size = draw(st.integers(1, 4))
    max_model_len = max(len(r["prompt"]) + r["max_tokens"] for r in requests) + 1
    max_num_seqs = draw(st.integers(1, 6))
    return dict(
        requests=requests,
        block_size=block_size,
        max_model_len=max_model_len,
        num_kv_blocks=-(-max_model_len // block_size) + draw(st.integers(0, 6)),  # few spare: preemption
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_seqs + draw(st.integers(4, 24)),
        enable_prefix_caching=draw(st.booleans()),
    )


def params_of(r: dict) -> SamplingParams:
    sampled = dict(temperature=0.8, top_p=0.9, seed=r["seed"]) if r["seed"] is not None else dict(temperature=0)
    return SamplingParams(
        n=r["n"], max_tokens=r["max_tokens"], stop_token_ids=r["stops"], logprobs=r["logprobs"],
        repetition_penalty=1.3 if r["penalty"] else 1.0, **sampled,
    )  # fmt: skip


def run(model_dir, w: dict, async_scheduling: bool) -> list:
    options = {k: v for k, v in w.items() if k != "requests"}
    engine = Engine(str(model_dir), async_scheduling=async_scheduling, stat_loggers=[], **options)
    ids = [engine.add_request(r["prompt"], params_of(r)) for r in w["requests"]]
    abort_at = {rid: r["abort_at"] for rid, r in zip(ids, w["requests"])}
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
            elif abort_at[out.request_id] is not None and len(out.outputs[0].token_ids) >= abort_at[out.request_id]:
                engine.abort(out.request_id)
        live = engine.scheduler.running + list(engine.scheduler.waiting)
        engine.block_manager.check_invariants(live)
        assert all(t >= 0 for seq in live for t in seq.token_ids), "a placeholder outlived its step"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [final[rid] for rid in ids]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workloads())
def test_random_workloads_give_the_tokens_of_synchronous_steps(model_dir, w):
    sync, overlapped = run(model_dir, w, False), run(model_dir, w, True)
    for r, a, b in zip(w["requests"], sync, overlapped):
        for x, y in zip(a.outputs, b.outputs):
            if r["abort_at"] is not None and r["n"] > 1 and x.index > 0:
                # The siblings' counts when the first one reaches abort_at depend on how steps batched them.
                shorter = min(len(x.token_ids), len(y.token_ids))
                assert x.token_ids[:shorter] == y.token_ids[:shorter]
                continue
            assert (x.token_ids, x.finish_reason, x.stop_reason) == (y.token_ids, y.finish_reason, y.stop_reason)
            if x.logprobs is not None:
                assert [sorted(d) for d in x.logprobs] == [sorted(d) for d in y.logprobs]
                for dx, dy in zip(x.logprobs, y.logprobs):
                    assert all(abs(dx[t] - dy[t]) < 1e-4 for t in dx)
