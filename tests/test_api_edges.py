"""The public API's edges, tried as an adversarial caller would: wrong types, one bad prompt among good
ones, outputs of requests another loop did not add, request ids, counters after preemption, broken files.
A tiny random Llama (token-id prompts) keeps these fast; the broken files are cut from the real SmolLM2."""

from __future__ import annotations

import math
import shutil

import pytest
from tiny_models import make_tiny_model

from miniengine import Engine, SamplingParams
from miniengine.engine import MAX_PROMPTS_PER_CALL
from miniengine.gguf_loader import CorruptGGUFError, load_gguf

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(str(model_dir), max_model_len=64, num_kv_blocks=64, block_size=4, stat_loggers=[])


def assert_idle(engine: Engine) -> None:
    assert not engine.has_unfinished() and engine.step() == []
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "field, value",
    [
        ("logprobs", 1.5), ("logprobs", 21), ("max_tokens", 1.5), ("max_tokens", math.inf), ("n", 2.0),
        ("n", 129), ("n", True), ("temperature", "0.5"), ("temperature", math.nan), ("top_p", math.inf),
        ("top_k", 2.5), ("seed", 1.0), ("stop", [""]), ("stop", 3), ("stop_token_ids", [-1]),
        ("stop_token_ids", ["7"]), ("min_tokens", 0.5), ("ignore_eos", "yes"), ("presence_penalty", None),
    ],
)  # fmt: skip
def test_sampling_params_check_types_and_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_stop_none_means_no_stop_strings():
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop="x").stop == ["x"]


def test_a_tiny_temperature_is_greedy(engine):
    prompt = [5, 9, 2, 7, 1, 3]
    greedy = alone(engine, prompt, SamplingParams(max_tokens=12, **GREEDY))
    tiny = alone(engine, prompt, SamplingParams(max_tokens=12, temperature=1e-39, ignore_eos=True))
    assert tiny == greedy and len(set(greedy)) > 1  # not token 0 forever


def test_one_bad_prompt_queues_none_of_the_call(engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 2, 3], [4, 5, 6], [7, 10**9]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate([[1, 2, 3], [4, 5]], [SamplingParams(), {"max_tokens": 4}], use_tqdm=False)  # type: ignore[list-item]
    assert_idle(engine)
    with pytest.raises(ValueError, match="split them into several calls"):
        engine.generate([[1]] * (MAX_PROMPTS_PER_CALL + 1), use_tqdm=False)
    assert_idle(engine)


@pytest.mark.parametrize("loop", ["generate", "stream"])
def test_outputs_of_a_hosts_requests_are_handed_back(engine, loop):
    """A host's request that finishes inside another loop's steps still reaches the host through step()."""
    short, long_ = SamplingParams(max_tokens=3, **GREEDY), SamplingParams(max_tokens=10, **GREEDY)
    host_prompt, loop_prompt = [11, 12, 13, 14, 15], [21, 22, 23]
    expected = alone(engine, host_prompt, short)
    host_id = engine.add_request(host_prompt, short)
    if loop == "generate":
        assert len(engine.generate([loop_prompt], long_, use_tqdm=False)[0].outputs[0].token_ids) == 10
    else:
        assert sum(len(d.token_ids) for d in engine.stream(loop_prompt, long_)) == 10
    assert engine.has_unfinished()  # only the held output is left
    outs = engine.step()
    assert [o.request_id for o in outs] == [host_id] and outs[0].finished
    assert outs[0].outputs[0].token_ids == expected
    assert_idle(engine)


def test_a_stream_closed_early_leaves_nothing_behind(engine):
    stream = engine.stream([1, 2, 3, 4], SamplingParams(max_tokens=20, **GREEDY))
    next(stream)
    stream.close()
    assert_idle(engine)


def test_auto_request_ids_never_collide_with_chosen_ones(engine):
    params = SamplingParams(max_tokens=2, **GREEDY)
    chosen = [engine.add_request([1, 2], params, request_id=str(i)) for i in range(3)]
    auto = engine.add_request([1, 2], params)
    assert auto not in chosen
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], params, request_id=auto)
    with pytest.raises(TypeError, match="request_id must be a string"):
        engine.add_request([1, 2], params, request_id=7)  # type: ignore[arg-type]
    finished = set()
    while engine.has_unfinished():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {*chosen, auto}
    assert_idle(engine)


def test_prefix_cache_counters_are_honest_after_preemption(model_dir):
    class Sum:
        queries = hits = preemptions = 0

        def record(self, stats):
            self.queries += stats.prefix_cache_queries
            self.hits += stats.prefix_cache_hits
            self.preemptions += stats.num_preemptions

    total = Sum()
    engine = Engine(str(model_dir), max_model_len=48, num_kv_blocks=16, block_size=4, stat_loggers=[total])
    shared = [7, 3, 9, 1, 4, 4, 8, 2]  # two full blocks every prompt shares
    prompts = [shared + [10 + i, 20 + i, 30 + i, 40 + i, 50 + i] for i in range(5)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)
    bm = engine.block_manager
    assert total.preemptions > 0, "the test needs preemptions to mean anything"
    looked_up = len(prompts) * ((len(prompts[0]) - 1) // 4)  # each prompt's full blocks, once
    assert (bm.queries, total.queries) == (looked_up, looked_up * 4)
    assert bm.hits <= bm.queries and total.hits == bm.hits * 4
    for out in outs:
        assert out.num_cached_tokens <= len(out.prompt_token_ids) - 1
        assert out.outputs[0].token_ids == alone(engine, out.prompt_token_ids, SamplingParams(max_tokens=24, **GREEDY))


@pytest.fixture(scope="module")
def smollm2_bytes(smollm2_path):
    with open(smollm2_path, "rb") as f:
        return f.read(2_000_000)


@pytest.mark.parametrize("cut", [0, 3, 30, 1000, 200_000, 1_500_000])
def test_truncated_gguf_names_the_file(tmp_path, smollm2_bytes, cut):
    path = tmp_path / "cut.gguf"
    path.write_bytes(smollm2_bytes[:cut])
    with pytest.raises(CorruptGGUFError, match=r"cut\.gguf is truncated or corrupt"):
        load_gguf(path)


def test_truncated_tensor_data_and_flipped_bytes_name_the_file(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(smollm2_path, cut)
    with open(cut, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(CorruptGGUFError, match="cut.gguf is truncated or corrupt"):
        Engine(str(cut))
    with open(smollm2_path, "rb") as f:
        head = bytearray(f.read(100_000))
    for offset in (20, 5000, 50_000):
        flipped = bytearray(head)
        flipped[offset : offset + 8] = bytes(b ^ 0xFF for b in flipped[offset : offset + 8])
        path = tmp_path / f"flip{offset}.gguf"
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptGGUFError, match=f"flip{offset}.gguf"):
            load_gguf(path)
