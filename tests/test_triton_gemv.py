"""The one-row matmul (kernels/triton_gemv.py): equals torch's on random inputs (under Triton's interpreter
here, at real layer shapes on a GPU), every output row written whatever N and K are, and a layer with it
attached takes it for one row only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miniengine.kernels import triton_gemv
from miniengine.kernels.triton_gemv import GemvWeight, gemv
from miniengine.models.parallel import ColumnParallelLinear
from miniengine.models.quantized import attach_gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(37, 200), (64, 1024), (20, 1536)])
def test_equals_torch(n, k, dtype):
    g = torch.Generator().manual_seed(n * k)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    x, bias = torch.randn(1, k, generator=g).to(DEVICE, dtype), torch.randn(n, generator=g).to(DEVICE, dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for block in triton_gemv.CANDIDATES:  # every tile shape the GPU may pick, edges of N and K included
        y = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
        triton_gemv._launch(x, weight, y, *block)
        torch.testing.assert_close(y.float(), reference(x, weight), **tolerance)
    got = gemv(x, weight, bias)
    assert got.dtype == dtype and got.shape == (1, n)
    torch.testing.assert_close(got.float(), reference(x, weight) + bias.float(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(37, 200), (20, 1024)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_prologue_equals_norm_then_gemv(n, k, dtype, with_residual):
    """The norm fused in front of the GEMV: the same y as rms_norm's output through the plain GEMV, and the
    next residual bit for bit (x + residual, or x itself)."""
    from miniengine.kernels.fused_ops import rms_norm

    g = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    x, residual = (torch.randn(1, k, generator=g).to(DEVICE, dtype) for _ in range(2))
    norm_weight = (1 + torch.randn(k, generator=g) / 4).to(DEVICE, dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    for block in triton_gemv.CANDIDATES:
        triton_gemv._chosen[(n, k, dtype, x.device)] = block
        y, new_residual = triton_gemv.gemv_rms_norm(x, residual if with_residual else None, norm_weight, 1e-6, weight)
        normed, expected_residual = rms_norm(x, norm_weight, 1e-6, residual) if with_residual else (
            rms_norm(x, norm_weight, 1e-6), x)  # fmt: skip
        # (Triton's interpreter rounds to bf16 its own way: one unit in the last place apart at most)
        torch.testing.assert_close(new_residual, expected_residual, **({} if dtype == torch.float32 else tolerance))
        torch.testing.assert_close(y.float(), reference(normed, weight), **tolerance)
    triton_gemv._chosen.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(37, 200), (24, 768)])
def test_silu_and_mul_prologue_equals_activation_then_gemv(n, k, dtype):
    from miniengine.kernels.fused_ops import silu_and_mul

    g = torch.Generator().manual_seed(n * 7 + k)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    gate_up = (2 * torch.randn(1, 2 * k, generator=g)).to(DEVICE, dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    for block in triton_gemv.CANDIDATES:
        triton_gemv._chosen[(n, k, dtype, gate_up.device)] = block
        y = triton_gemv.gemv_silu_and_mul(gate_up, weight)
        torch.testing.assert_close(y.float(), reference(silu_and_mul(gate_up), weight), **tolerance)
    triton_gemv._chosen.clear()
    with pytest.raises(ValueError, match=rf"x \[1, {2 * k}\]"):
        triton_gemv.gemv_silu_and_mul(gate_up[:, :k], weight)


def test_decoder_layer_fuses_only_one_row_steps(monkeypatch):
    """A Llama layer with GEMV views attached: a one-row step (both norms and the activation fused into the
    GEMVs) and a three-row step (separate kernels) give the layer's plain outputs."""
    from types import SimpleNamespace

    from miniengine.forward_context import ForwardContext, Kernels, set_forward_context
    from miniengine.models.layers import RMSNorm, fused_prologue
    from miniengine.models.llama import LlamaMLP

    monkeypatch.setenv("MINIENGINE_CUDA_FUSE", "1")
    torch.manual_seed(0)
    config = SimpleNamespace(hidden_size=64, intermediate_size=96, hidden_act="silu")
    with set_forward_context(ForwardContext(None, Kernels("torch", None, None))):
        norm, mlp = RMSNorm(64, 1e-6), LlamaMLP(config)
        norm.weight.data.uniform_(0.5, 1.5)
        model = torch.nn.ModuleList([norm, mlp]).to(DEVICE)
        x, residual = torch.randn(3, 64, device=DEVICE), torch.randn(3, 64, device=DEVICE)
        with torch.no_grad():
            plain = [norm.then(mlp.gate_up_proj, x[i : i + 1], residual[i : i + 1]) for i in range(3)]
            plain_down = [mlp.down(gu) for gu, _ in plain]
            assert attach_gemv(model) == 2
            assert fused_prologue(mlp.down_proj, x[:1, :96], "silu_matmul") is not None  # one row: fused
            assert fused_prologue(mlp.down_proj, x[:, :96], "silu_matmul") is None  # three rows: apart
            for i, ((gu, res), down) in enumerate(zip(plain, plain_down)):
                fused_gu, fused_res = norm.then(mlp.gate_up_proj, x[i : i + 1], residual[i : i + 1])
                assert torch.equal(fused_res, res)
                torch.testing.assert_close(fused_gu, gu, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(mlp.down(gu), down, rtol=1e-5, atol=1e-5)
            three, three_res = norm.then(mlp.gate_up_proj, x, residual)
            torch.testing.assert_close(three, torch.cat([gu for gu, _ in plain]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(three_res, torch.cat([r for _, r in plain]))


def test_bad_inputs_raise():
    weight = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[1, 16\]"):
        gemv(torch.randn(2, 16, device=DEVICE), weight)
    with pytest.raises(ValueError, match=r"x \[1, 16\]"):
        gemv(torch.randn(1, 12, device=DEVICE), weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(1, 8, device=DEVICE), weight.t())


def test_layer_takes_it_for_one_row_only():
    layer = torch.nn.Sequential(ColumnParallelLinear(96, [40, 24], bias=False)).to(DEVICE)
    assert attach_gemv(layer) == 1
    linear = layer[0]
    assert isinstance(linear.packed_weight, GemvWeight) and linear.packed_weight.weight is linear.weight
    one, two = torch.randn(1, 96, device=DEVICE), torch.randn(2, 96, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(linear(one), reference(one, linear.weight), rtol=1e-5, atol=1e-5)
        assert torch.equal(linear(two), F.linear(two, linear.weight))
        assert linear(one[:0]).shape == (0, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("n", "k"), [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024),
                                      (6144, 4096), (28672, 4096), (4096, 14336)])  # fmt: skip
def test_gpu_real_shapes(n, k):
    """Qwen3-0.6B and Llama-3-8B layers (and Qwen3's LM head) in bf16: the tuned choice, against fp32 math."""
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(gemv(x, weight).float(), reference(x, weight), rtol=1e-2, atol=2e-2)
    from miniengine.kernels.fused_ops import rms_norm, silu_and_mul

    residual, norm_weight = torch.randn_like(x), 1 + torch.randn(k, device="cuda", dtype=torch.bfloat16) / 4
    y, new_residual = triton_gemv.gemv_rms_norm(x, residual, norm_weight, 1e-6, weight)
    normed, expected = rms_norm(x, norm_weight, 1e-6, residual)
    assert torch.equal(new_residual, expected)
    torch.testing.assert_close(y.float(), reference(normed, weight), rtol=1e-2, atol=2e-2)
    gate_up = 2 * torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    y = triton_gemv.gemv_silu_and_mul(gate_up, weight)
    torch.testing.assert_close(y.float(), reference(silu_and_mul(gate_up), weight), rtol=1e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dependent_launches_in_a_graph_keep_the_stream_order(monkeypatch):
    """Forty GEMVs in a row, each reading what the one before wrote (its first weight tile loaded before it
    waits), replayed in a CUDA graph with dependent launches on (where the GPU has them), give the very
    values of plain launches: no kernel reads its input early."""
    torch.manual_seed(0)
    hidden, inner = 1024, 3072
    x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
    norm = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
    up = [torch.randn(2 * inner, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5 for _ in range(20)]
    down = [torch.randn(hidden, inner, device="cuda", dtype=torch.bfloat16) / inner**0.5 for _ in range(20)]

    def chain():
        h, residual = x, torch.zeros_like(x)
        for gate_up, proj in zip(up, down):
            y, residual = triton_gemv.gemv_rms_norm(h, residual, norm, 1e-6, gate_up)
            h = triton_gemv.gemv_silu_and_mul(y, proj)
        return h + residual

    monkeypatch.setenv("MINIENGINE_CUDA_PDL", "0")
    expected = chain()
    assert triton_gemv.pdl_options(x.device)["PDL"] is False
    monkeypatch.setenv("MINIENGINE_CUDA_PDL", "1")
    if torch.cuda.get_device_capability()[0] >= 9:
        assert triton_gemv.pdl_options(x.device)["PDL"] is True, "Hopper and later launch dependent kernels"
    chain()  # compiled and timed outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        graph.replay()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
