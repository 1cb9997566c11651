"""The CPU's fp16 decode path (kernels/fp16_matmul.py, models/quantized.py): fbgemm's fp16 GEMM equals its
plain-torch reference on random inputs, the layers choose by the number of rows, the platform's flags
choose between the packed copies, and SmolLM2 through fp16 weights picks float32's greedy tokens wherever
float32's choice is clear."""

from __future__ import annotations

import pytest
import torch

from miniengine.kernels.fp16_matmul import Fp16Weight, fp16_kernel_available, fp16_matmul, fp16_matmul_reference
from miniengine.platforms import cpu

pytestmark = pytest.mark.skipif(not fp16_kernel_available(), reason="this torch has no fbgemm fp16 GEMM")


@pytest.mark.parametrize(("n", "k", "rows"), [(64, 128, 1), (96, 64, 5), (960, 576, 32), (49, 70, 3)])
def test_kernel_equals_reference(n, k, rows):
    g = torch.Generator().manual_seed(n + k)
    weight, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(rows, k, generator=g)
    got, want = fp16_matmul(x, Fp16Weight.pack(weight)), fp16_matmul_reference(x, weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # both float32 sums of the same products
    assert (want - x @ weight.t()).norm() / want.norm() < 2e-3  # the weight's fp16 rounding: ~2^-12 relative


def test_layer_uses_fp16_only_for_few_rows():
    from miniengine.models.parallel import RowParallelLinear

    layer = RowParallelLinear(128, 96, bias=True)
    torch.nn.init.normal_(layer.bias)
    layer.packed_weight = Fp16Weight.pack(layer.weight, max_rows=4)
    few, many = torch.randn(4, 128), torch.randn(5, 128)
    want = fp16_matmul_reference(few, layer.weight) + layer.bias
    torch.testing.assert_close(layer(few), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(many), torch.nn.functional.linear(many, layer.weight, layer.bias))


def test_handle_names_the_packed_weight_and_goes_with_it():
    """The op takes a handle tensor (a graph cannot carry fbgemm's script object); the packed weight it names
    is dropped with its last handle."""
    from miniengine.kernels import fp16_matmul as module

    weight, x = torch.randn(40, 32) * 0.1, torch.randn(3, 32)
    packed = Fp16Weight.pack(weight)
    key = int(packed.handle)
    assert key in module._PACKED
    got = torch.ops.miniengine.fp16_linear(x, packed.handle, 40)
    torch.testing.assert_close(got, fp16_matmul_reference(x, weight), rtol=1e-5, atol=1e-5)
    del packed
    assert key not in module._PACKED


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_across_threads(threads):
    """fbgemm's GEMM splits the output's columns over torch's threads: the same sums at any count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        weight, x = torch.randn(1536, 576, generator=g) * 0.05, torch.randn(7, 576, generator=g)
        got = fp16_matmul(x, Fp16Weight.pack(weight))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, fp16_matmul_reference(x, weight), rtol=1e-5, atol=1e-5)


def choose(monkeypatch, dense: float, fp16: float, int4: float) -> list[tuple]:
    """Make the platform's probe report these seconds (and record what it was asked to time)."""
    asked = []

    def seconds(kinds, dtype, threads):
        assert threads == torch.get_num_threads() and dtype in (torch.float32, torch.bfloat16)
        asked.append(kinds)
        return {"dense": dense, "fp16": fp16, "int4": int4}

    monkeypatch.setattr(cpu, "one_row_seconds", seconds)
    monkeypatch.setattr(cpu, "int4_kernel_available", lambda: True)
    monkeypatch.delenv("MINIENGINE_CPU_FP16", raising=False)
    monkeypatch.delenv("MINIENGINE_CPU_INT4", raising=False)
    return asked


def test_packed_weights_tiers_by_measurement(monkeypatch):
    choose(monkeypatch, dense=3.0, fp16=2.0, int4=1.0)
    tiers = cpu.packed_weights(torch.float32, has_int4=True)
    assert tiers == {"fp16": cpu.FP16_MAX_ROWS, "int4": cpu.INT4_BESIDE_FP16_ROWS}
    # fbgemm takes float32 only; beside bf16 weights (half float32's cost) int4 pays for fewer rows
    assert cpu.packed_weights(torch.bfloat16, has_int4=True) == {"int4": cpu.INT4_MAX_ROWS_BF16}
    assert cpu.packed_weights(torch.bfloat16, has_int4=False) == {}
    assert cpu.packed_weights(torch.float32, has_int4=False) == {"fp16": cpu.FP16_MAX_ROWS}
    choose(monkeypatch, dense=3.0, fp16=1.0, int4=2.0)  # int4 slower than fp16 at one row: fp16 alone
    assert cpu.packed_weights(torch.float32, has_int4=True) == {"fp16": cpu.FP16_MAX_ROWS}
    choose(monkeypatch, dense=3.0, fp16=4.0, int4=2.0)  # fp16 slower than float32: int4 alone, its own rows
    assert cpu.packed_weights(torch.float32, has_int4=True) == {"int4": cpu.INT4_MAX_ROWS}
    choose(monkeypatch, dense=1.0, fp16=2.0, int4=2.0)
    assert cpu.packed_weights(torch.float32, has_int4=True) == {}


def test_packed_weights_flags_override(monkeypatch):
    asked = choose(monkeypatch, dense=1.0, fp16=2.0, int4=3.0)  # measured: neither pays
    monkeypatch.setenv("MINIENGINE_CPU_FP16", "32")
    monkeypatch.setenv("MINIENGINE_CPU_INT4", "4")
    assert cpu.packed_weights(torch.float32, has_int4=True) == {"fp16": 32, "int4": 4}
    assert asked == []  # both forced: nothing to time
    monkeypatch.setenv("MINIENGINE_CPU_INT4", "0")
    assert cpu.packed_weights(torch.float32, has_int4=True) == {"fp16": 32}
    monkeypatch.setenv("MINIENGINE_CPU_FP16", "0")
    assert cpu.packed_weights(torch.float32, has_int4=True) == {}
    monkeypatch.delenv("MINIENGINE_CPU_INT4")
    assert cpu.packed_weights(torch.float32, has_int4=True) == {}  # int4 measured, slower than float32
    assert asked[-1] == ("int4",)  # fp16 is off: not timed
    monkeypatch.setenv("MINIENGINE_CPU_INT4", "8")
    assert cpu.packed_weights(torch.bfloat16, has_int4=False) == {}  # no 4-bit matrices to keep


@pytest.mark.parametrize(("flag", "value"), [("MINIENGINE_CPU_FP16", "many"), ("MINIENGINE_CPU_INT4", "-2")])
def test_packed_weights_bad_flag(monkeypatch, flag, value):
    choose(monkeypatch, dense=1.0, fp16=2.0, int4=3.0)
    monkeypatch.setenv(flag, value)
    with pytest.raises(ValueError, match=flag):
        cpu.packed_weights(torch.float32, has_int4=True)


@pytest.mark.slow
def test_smollm2_fp16_agrees_with_float32(smollm2_packed_runs):
    """Greedy tokens through fp16 weights equal float32's until the two first differ, and they differ only
    at a near-tie of float32's top two; while they agree, the chosen token's logprob moves by little (the
    weights' fp16 rounding is ~2^-12 relative; the arithmetic stays float32)."""
    layers, outputs, _, kinds = smollm2_packed_runs["fp16"]
    assert layers == 30 * 4 + 1 and kinds == {"Fp16Weight"}  # qkv, o, gate_up, down of 30 layers; the LM head
    compared = 0
    for fp32, fp16 in zip(smollm2_packed_runs["dense"][1], outputs):
        tokens, other = fp32.outputs[0].token_ids, fp16.outputs[0].token_ids
        for step, (token, top) in enumerate(zip(tokens, fp32.outputs[0].logprobs)):
            if other[step] != token:
                first, second = sorted(top.values(), reverse=True)[:2]
                assert first - second < 0.05, (fp32.prompt, step, first - second)
                break
            assert abs(top[token] - fp16.outputs[0].logprobs[step][token]) < 0.02, (fp32.prompt, step)
            compared += 1
    assert compared >= 100  # nearly every token of the 4 x 32 agrees


@pytest.mark.slow
def test_smollm2_fp16_answers_paris(smollm2_packed_runs):
    assert "Paris" in smollm2_packed_runs["fp16"][2]
