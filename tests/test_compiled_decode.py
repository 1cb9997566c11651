"""The CPU's compiled one-sequence decode step (miniengine/compiled_decode.py): it runs every decode step of a
lone sequence (across block boundaries: the block table's width is a symbol of the graph), and its greedy
tokens equal transformers' (dense weights) and the eager path's (fp16 packed weights, fbgemm's GEMM as an
opaque op in the graph; both packed copies of a 4-bit GGUF, in tiers). Tiny random Llamas, compiled three
times: some 20-40 s here."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from miniengine import Engine, SamplingParams
from miniengine.compiled_decode import CompiledDecode, layer_zero_guards
from miniengine.kernels.fp16_matmul import fp16_kernel_available
from miniengine.kernels.int4_matmul import int4_kernel_available
from tests.tiny_models import hf_greedy, make_tiny_model

PROMPTS = [[5, 17, 300, 42, 9, 77, 13], [101, 3, 250, 8]]
MAX_TOKENS = 40  # past two block boundaries (block size 16) from either prompt


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def engine(path, monkeypatch, compiled: bool, fp16: bool, int4: int = 0) -> Engine:
    monkeypatch.setenv("MINIENGINE_CPU_COMPILE", "1" if compiled else "0")
    monkeypatch.setenv("MINIENGINE_CPU_FP16", "64" if fp16 else "0")
    monkeypatch.setenv("MINIENGINE_CPU_INT4", str(int4))
    return Engine(str(path), device="cpu", stat_loggers=[], num_kv_blocks=32)


def greedy_one_at_a_time(e: Engine, prompts: list[list[int]] = PROMPTS) -> tuple[list[list[int]], int]:
    """Each prompt alone (one sequence: the compiled step's case); also how many steps it ran."""
    runs = [0]
    run = e.runner.graphs.run if e.runner.graphs else None
    if run is not None:

        def counted(*args):
            runs[0] += 1
            return run(*args)

        e.runner.graphs.run = counted
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens = [e.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
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


@pytest.mark.skipif(not (fp16_kernel_available() and int4_kernel_available()), reason="no fbgemm fp16 or int4 kernel")
def test_compiled_tiered_matches_eager(tmp_path, monkeypatch):
    """A GGUF of 4-bit matrices with both packed copies (models/quantized.py, TieredWeight): the compiled
    one-row step goes through the int4 copies (its own opaque op) and the LM head's fp16 copy, as the eager
    step does, and picks the same tokens; two sequences at once (2 rows: int4 still) decode eagerly alike."""
    from miniengine.models.quantized import TieredWeight
    from tests.tiny_gguf import TOKENS, write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)
    prompts = [[t % len(TOKENS) for t in p] for p in PROMPTS]
    eager, _ = greedy_one_at_a_time(engine(path, monkeypatch, compiled=False, fp16=True, int4=2), prompts)
    e = engine(path, monkeypatch, compiled=True, fp16=True, int4=2)
    assert isinstance(e.runner.model.model.layers[1].mlp.down_proj.packed_weight, TieredWeight)
    tokens, runs = greedy_one_at_a_time(e, prompts)
    assert runs == len(prompts) * (MAX_TOKENS - 1)
    assert tokens == eager and len({tuple(t) for t in tokens}) == len(prompts)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in e.generate(prompts, params, use_tqdm=False)] == eager


def test_guards_of_later_layers_are_left_out():
    layer = "self.runner.model._modules['model']._modules['layers']._modules['{}']._modules['mlp'].weight"
    names = [layer.format(0), layer.format(1), layer.format(29), layer.format(10), "G['x'].block_tables", ""]
    entries = [SimpleNamespace(name=name) for name in names]
    assert layer_zero_guards(entries) == [True, False, False, False, True, True]


def test_compile_flag(monkeypatch):
    monkeypatch.setenv("MINIENGINE_CPU_COMPILE", "yes")
    with pytest.raises(ValueError, match="MINIENGINE_CPU_COMPILE"):
        Engine(load_format="dummy", device="cpu", stat_loggers=[], num_kv_blocks=16)
