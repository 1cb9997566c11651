"""The CPU's 4-bit decode path (kernels/int4_matmul.py, models/quantized.py): the GGUF types map onto torch's
int4 kernel exactly, the kernel equals its plain-torch reference on random inputs, the layers choose by the
number of rows, and SmolLM2 through it picks float32's greedy tokens wherever float32's choice is clear."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from miniengine.gguf_loader import _INT4_ROWS, dequantize_tensor
from miniengine.gguf_reader import GGUFTensor
from miniengine.kernels import int4_matmul as int4
from miniengine.kernels.int4_matmul import Int4Rows, Int4Weight, int4_matmul, int4_matmul_reference

pytestmark = pytest.mark.skipif(not int4.int4_kernel_available(), reason="this torch has no CPU int4 kernel")


def random_rows(n: int, k: int, seed: int = 0) -> Int4Rows:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    return Int4Rows(q, scale, torch.randn(n, k // 32, generator=g) * 0.05)


@pytest.mark.parametrize(("n", "k", "rows"), [(64, 128, 1), (96, 64, 5), (128, 256, 16), (48, 96, 3)])
def test_kernel_equals_reference(n, k, rows):
    """Random weights and activations (never zeros); 48 rows is not a whole 32-row block pair on AVX2 or a
    64-row block on AVX-512: torch's own packing is used there."""
    weights = random_rows(n, k)
    x = torch.randn(rows, k)
    got = int4_matmul(x, Int4Weight.pack(weights))
    want = int4_matmul_reference(x, weights)
    # Both sum in float32 (in different orders) and round to bf16: at most a bf16 step apart.
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7 * want.abs().max().item())


def test_packing_equals_torchs():
    q = random_rows(192, 128).q
    assert torch.equal(int4._pack_nibbles(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_types_map_exactly(kind):
    """The kernel's convention with float32 scales gives the file's weights exactly (gguf.quants' values); the
    bf16 scales of the fast path then err by about 2^-9 of a weight, the size of a bf16 rounding."""
    kind = GGMLQuantizationType[kind]
    weights = np.random.default_rng(0).standard_normal((64, 256), dtype=np.float32) * 0.1
    raw = np.ascontiguousarray(quantize(weights, kind)).view(np.uint8).reshape(64, -1)
    dense = dequantize_tensor(GGUFTensor("w", kind, (256, 64), raw)).view(64, 256)
    rows = _INT4_ROWS[kind](torch.from_numpy(raw))
    scale, zero = (v.repeat_interleave(32, dim=1) for v in (rows.scale, rows.zero))
    exact = ((rows.q.float() - 8) * scale + zero).view(64, rows.repeat, 256).sum(1)
    assert torch.equal(exact, dense)

    x = torch.randn(4, 256)
    got, want = int4_matmul(x, Int4Weight.pack(rows)), x @ dense.t()
    assert (got - want).norm() / want.norm() < 0.01  # bf16 activations, scales and output: ~0.3%


def test_layer_uses_int4_only_for_few_rows():
    from miniengine.models.parallel import ColumnParallelLinear

    layer = ColumnParallelLinear(128, [64, 32], bias=False)
    weights = random_rows(96, 128)
    scale, zero = (v.repeat_interleave(32, dim=1) for v in (weights.scale, weights.zero))
    layer.weight.data.copy_((weights.q.float() - 8) * scale + zero)
    layer.packed_weight = Int4Weight.pack(weights, max_rows=4)
    few, many = torch.randn(4, 128), torch.randn(5, 128)
    torch.testing.assert_close(layer(few), int4_matmul_reference(few, weights), rtol=2**-7, atol=1e-3)
    assert torch.equal(layer(many), many @ layer.weight.t())


def test_tiered_weight_picks_by_rows():
    """A layer holding both copies: 1-2 rows through int4, 3-8 through fp16, more through the dense weight;
    each equal to its own reference, and all near the float32 product."""
    from miniengine.kernels.fp16_matmul import Fp16Weight, fp16_kernel_available, fp16_matmul_reference
    from miniengine.models.parallel import ColumnParallelLinear
    from miniengine.models.quantized import TieredWeight

    if not fp16_kernel_available():
        pytest.skip("this torch has no fbgemm fp16 GEMM")
    layer = ColumnParallelLinear(128, [64, 32], bias=False)
    weights = random_rows(96, 128, seed=3)
    scale, zero = (v.repeat_interleave(32, dim=1) for v in (weights.scale, weights.zero))
    layer.weight.data.copy_((weights.q.float() - 8) * scale + zero)
    layer.packed_weight = TieredWeight((Int4Weight.pack(weights, max_rows=2), Fp16Weight.pack(layer.weight, 8)))
    assert layer.packed_weight.max_rows == 8
    for rows in range(1, 11):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        got, exact = layer(x), x @ layer.weight.t()
        if rows <= 2:
            torch.testing.assert_close(got, int4_matmul_reference(x, weights), rtol=2**-7, atol=1e-3)
        elif rows <= 8:
            torch.testing.assert_close(got, fp16_matmul_reference(x, layer.weight), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got, exact)
        assert (got - exact).norm() / exact.norm() < 0.01, rows


def tiny_engine(path, monkeypatch, fp16: int, int4: int):
    from miniengine import Engine

    monkeypatch.setenv("MINIENGINE_CPU_FP16", str(fp16))
    monkeypatch.setenv("MINIENGINE_CPU_INT4", str(int4))
    return Engine(path, stat_loggers=[], num_kv_blocks=32)


def test_loader_attaches_tiers(tmp_path, monkeypatch):
    """A GGUF of Q4_0 layers and a Q8_0 tied embedding: with both copies each layer holds int4 then fp16,
    and the LM head fp16 only (its Q8_0 is left out); with int4 alone the LM head takes the Q8_0 split."""
    from miniengine.kernels.fp16_matmul import Fp16Weight, fp16_kernel_available
    from miniengine.loader import open_checkpoint
    from miniengine.models.quantized import TieredWeight
    from tests.tiny_gguf import LAYERS, write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    names = [name for name, _ in open_checkpoint(path).int4_weights(q8_0=False)]
    assert len(names) == 7 * LAYERS and "model.embed_tokens.weight" not in names

    model = tiny_engine(path, monkeypatch, fp16=0, int4=2).runner.model
    assert isinstance(model.lm_head.packed_weight, Int4Weight) and model.lm_head.packed_weight.repeat == 2
    if not fp16_kernel_available():
        return
    model = tiny_engine(path, monkeypatch, fp16=8, int4=2).runner.model
    layers = [m for m in model.modules() if getattr(m, "packed_weight", None) is not None]
    assert len(layers) == 4 * LAYERS + 1
    for layer in layers[:-1]:
        assert isinstance(layer.packed_weight, TieredWeight)
        assert [(type(t), t.max_rows) for t in layer.packed_weight.tiers] == [(Int4Weight, 2), (Fp16Weight, 8)]
    assert isinstance(model.lm_head.packed_weight, Fp16Weight)


@pytest.mark.slow
def test_smollm2_int4_agrees_with_float32(smollm2_packed_runs):
    """Greedy tokens through the 4-bit path equal float32's until the two first differ, and they differ only
    where float32's top-2 margin is within the 4-bit path's error: its bf16 and scale roundings move a
    token's logprob by up to ~0.11 on these prompts, so a margin under 0.25 is a near-tie either may break."""
    assert smollm2_packed_runs["dense"][0] == 0
    assert smollm2_packed_runs["int4"][0] == 30 * 4 + 1  # qkv, o, gate_up, down of 30 layers; the tied LM head (Q8_0)
    compared = 0
    for fp32, four_bit in zip(smollm2_packed_runs["dense"][1], smollm2_packed_runs["int4"][1]):
        tokens, other = fp32.outputs[0].token_ids, four_bit.outputs[0].token_ids
        for step, (token, top) in enumerate(zip(tokens, fp32.outputs[0].logprobs)):
            if other[step] != token:
                first, second = sorted(top.values(), reverse=True)[:2]
                assert first - second < 0.25, (fp32.prompt, step, first - second)
                break  # from here the two runs follow different, equally good, continuations
            compared += 1
    assert compared >= 40  # the check saw real continuations, not just the first token of each


@pytest.mark.slow
def test_smollm2_int4_answers_paris(smollm2_packed_runs):
    assert "Paris" in smollm2_packed_runs["int4"][2]


@pytest.mark.slow
def test_smollm2_tiered(smollm2_packed_runs):
    """Both copies, as the platform keeps them where both pay: every layer holds int4 (1-2 rows) and fp16,
    the Q8_0 LM head fp16 only. The 4-row steps of the four prompts go through fp16 (float32's tokens, as
    test_fp16 checks); the one-row chat answer goes through the 4-bit layers and the fp16 LM head."""
    layers, outputs, answer, kinds = smollm2_packed_runs["tiered"]
    assert layers == 30 * 4 + 1 and kinds == {"TieredWeight", "Fp16Weight"}
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in smollm2_packed_runs["fp16"][1]]
    assert "Paris" in answer
