"""Every model, token for token against transformers under greedy decoding, through the whole engine.

Nine prompts of different lengths run together with a small token budget, so one step mixes decodes with
chunks of several prefills; a second round reuses prompt prefixes (prefix-cache hits); a third runs in a
KV cache too small for everyone at once (preemption by recompute). All must equal transformers' output.
"""

from __future__ import annotations

import random

import pytest
from tiny_models import hf_greedy, make_tiny_model

from miniengine import Engine, SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 17, 40, 5, 64, 33, 16, 90)]
    prompts.append(prompts[4][:32] + [7, 8, 9])  # shares two full blocks with prompt 4
    return prompts


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    prompts = make_prompts(1)
    follow_ups = [p + [11, 12] for p in prompts[4:]] + [prompts[1][:16] + [5]]
    expected = hf_greedy(directory, prompts + follow_ups, MAX_TOKENS)
    return directory, prompts, follow_ups, expected


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_outputs_vary(tiny):
    _, _, _, expected = tiny
    assert all(len(set(ids)) > MAX_TOKENS // 2 for ids in expected), "the random model must not repeat one token"


def record_steps(engine: Engine) -> list[tuple[int, int]]:
    """Record, for each step, how many decodes and how many partial prompt chunks it scheduled."""
    steps: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        remaining = [s.num_tokens - s.num_computed_tokens for s in batch.seqs]
        decodes = sum(r == 1 for r in remaining)
        chunks = sum(n < r for n, r in zip(batch.num_new_tokens, remaining))
        steps.append((decodes, chunks))
        return batch

    engine.scheduler.schedule = recording_schedule
    return steps


def test_continuous_batching_chunked_prefill_and_prefix_hits(tiny):
    directory, prompts, follow_ups, expected = tiny
    engine = Engine(str(directory), max_num_batched_tokens=48, max_num_seqs=16, block_size=16, num_kv_blocks=128)
    steps = record_steps(engine)
    assert token_ids(engine.generate(prompts, GREEDY, use_tqdm=False)) == expected[: len(prompts)]
    assert any(decodes and chunks for decodes, chunks in steps), "some step should mix decodes with a prompt chunk"
    second = engine.generate(follow_ups, GREEDY, use_tqdm=False)
    assert token_ids(second) == expected[len(prompts) :]
    assert all(o.num_cached_tokens > 0 for o in second), "follow-ups should hit the prefix cache"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_keeps_greedy_outputs(tiny):
    directory, prompts, _, expected = tiny
    engine = Engine(str(directory), max_num_batched_tokens=64, max_num_seqs=16, block_size=8, num_kv_blocks=24)
    assert token_ids(engine.generate(prompts, GREEDY, use_tqdm=False)) == expected[: len(prompts)]
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_any_block_size(tiny, block_size):
    directory, prompts, _, expected = tiny
    engine = Engine(
        str(directory),
        max_num_batched_tokens=40,
        max_num_seqs=16,
        block_size=block_size,
        num_kv_blocks=4096 // block_size,
    )
    assert token_ids(engine.generate(prompts[:5], GREEDY, use_tqdm=False)) == expected[:5]
