"""One-row matmul (GEMV) in Triton: y = W x for the decode step of a single sequence.

At batch 1 a linear layer reads its whole weight to do one multiply-add per element: its time is the
weight's bytes over the memory bandwidth, nothing else. cuBLAS picks GEMM kernels for it that reach 24-71%
of the copy bandwidth on the small matrices of a Qwen3-0.6B layer, some split over K with a second reduce
kernel (H100, `bench/README.md`). This kernel streams the weight once, a BLOCK_N x BLOCK_K tile at a time,
and keeps one float32 partial sum per loaded element, folding them only at the end:

    W [N, K]      program p: rows p*BLOCK_N ..
    |=====|=====|=====|=====|    acc [BLOCK_N, BLOCK_K] += W tile * x chunk   (no reduction in the loop)
    |=====|=====|=====|=====|    y[rows] = sum over acc's columns
      ^ BLOCK_K   x [K] broadcast down the rows

The tile shape that streams best depends on the matrix, so the first call for each (N, K) on a GPU times a
few candidates and keeps the fastest (a few milliseconds, once, before any CUDA graph is captured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, num_warps): the fastest shapes measured on an H100 for Qwen3-0.6B and Llama-3-8B layers.
CANDIDATES = ((4, 1024, 8), (8, 1024, 8), (16, 512, 8), (8, 512, 4))
_chosen: dict[tuple, tuple[int, int, int]] = {}


@dataclass(frozen=True, slots=True)
class GemvWeight:
    """A layer's own weight (no copy), multiplied by this kernel in one-row steps: the GPU's entry in a
    layer's `packed_weight` slot (models/quantized.py); steps of more rows take the dense matmul."""

    weight: torch.Tensor
    nbytes: int = 0  # no second copy
    max_rows: int = 1

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self.weight)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias) -> [1, N] in x's dtype, accumulated in float32."""
    if x.dim() != 2 or x.shape[0] > 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [1, {weight.shape[1]}], got {tuple(x.shape)}")
    if x.shape[0] == 0:  # a step that samples nothing still asks its LM head
        return torch.nn.functional.linear(x, weight, bias)
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight contiguous along K")
    x = x if x.stride(1) == 1 else x.contiguous()
    n, k = weight.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    key = (n, k, weight.dtype, x.device)
    config = _chosen.get(key)
    if config is None:
        if x.device.type != "cuda":
            config = _chosen[key] = CANDIDATES[0]
        elif torch.cuda.is_current_stream_capturing():
            config = CANDIDATES[0]  # no timing inside a graph capture (warm-ups come first)
        else:
            config = _chosen[key] = _fastest(x, weight, y)
    _launch(x, weight, y, *config)
    return y if bias is None else y + bias


def _launch(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, block_n: int, block_k: int, warps: int) -> None:
    n, k = weight.shape
    block_k = min(block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, n, k, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=warps, num_stages=3,
    )  # fmt: skip


def _fastest(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    times = [triton.testing.do_bench(lambda c=c: _launch(x, weight, y, *c), warmup=5, rep=20) for c in CANDIDATES]
    return CANDIDATES[times.index(min(times))]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None], other=0.0)
            x = tl.load(x_ptr + cols)
        else:
            col_ok = cols < K
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=row_ok)
