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
