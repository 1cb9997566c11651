"""The CPU's compiled one-sequence decode step (miniengine/compiled_decode.py): it runs every decode step of a
lone sequence (across block boundaries: the block table's width is a symbol of the graph), and its greedy
tokens equal transformers' (dense weights) and the eager path's (fp16 packed weights, fbgemm's GEMM as an
opaque op in the graph). One tiny random Llama, compiled twice: some 10-20 s here."""

from __future__ import annotations

import pytest

from miniengine import Engine, SamplingParams
from miniengine.compiled_decode import CompiledDecode
from miniengine.kernels.fp16_matmul import fp16_kernel_available
from tests.tiny_models import hf_greedy, make_tiny_model

PROMPTS = [[5, 17, 300, 42, 9, 77, 13], [101, 3, 250, 8]]
MAX_TOKENS = 40  # past two block boundaries (block size 16) from either prompt


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def engine(path, monkeypatch, compiled: bool, fp16: bool) -> Engine:
    monkeypatch.setenv("MINIENGINE_CPU_COMPILE", "1" if compiled else "0")
    monkeypatch.setenv("MINIENGINE_CPU_FP16", "64" if fp16 else "0")
    return Engine(str(path), device="cpu", stat_loggers=[], num_kv_blocks=32)


def greedy_one_at_a_time(e: Engine) -> tuple[list[list[int]], int]:
    """Each prompt alone (one sequence: the compiled step's case); also how many steps it ran."""
    runs = [0]
    run = e.runner.graphs.run if e.runner.graphs else None
    if run is not None:

        def counted(*args):
            runs[0] += 1
            return run(*args)

        e.runner.graphs.run = counted
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens = [e.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    return tokens, runs[0]


def test_compiled_dense_matches_transformers(tiny_llama, monkeypatch):
    e = engine(tiny_llama, monkeypatch, compiled=True, fp16=False)
    assert isinstance(e.runner.graphs, CompiledDecode)
    tokens, runs = greedy_one_at_a_time(e)
    assert runs == len(PROMPTS) * (MAX_TOKENS - 1)  # every decode step; the first token comes from the prefill
    assert tokens == hf_greedy(tiny_llama, PROMPTS, MAX_TOKENS)


@pytest.mark.skipif(not fp16_kernel_available(), reason="this torch has no fbgemm fp16 GEMM")
def test_compiled_fp16_matches_eager(tiny_llama, monkeypatch):
    eager, _ = greedy_one_at_a_time(engine(tiny_llama, monkeypatch, compiled=False, fp16=True))
    e = engine(tiny_llama, monkeypatch, compiled=True, fp16=True)
    tokens, runs = greedy_one_at_a_time(e)
    assert runs == len(PROMPTS) * (MAX_TOKENS - 1)
    assert tokens == eager
    # Two sequences at once decode eagerly, with the same tokens as each alone.
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in e.generate(PROMPTS, params, use_tqdm=False)] == eager


def test_compile_flag(monkeypatch):
    monkeypatch.setenv("MINIENGINE_CPU_COMPILE", "yes")
    with pytest.raises(ValueError, match="MINIENGINE_CPU_COMPILE"):
        Engine(load_format="dummy", device="cpu", stat_loggers=[], num_kv_blocks=16)
