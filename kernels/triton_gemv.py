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

The first weight tile is loaded before the kernel waits for its input: under programmatic dependent
launch (`triton_fused_ops.py`) that load overlaps the end of the kernel before.

The tile shape that streams best depends on the matrix, so the first call for each (N, K) on a GPU times a
few candidates and keeps the fastest (a few milliseconds, once, before any CUDA graph is captured).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from miniengine.kernels.triton_fused_ops import fusing, pdl_options, wait_for_inputs

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
    # the layers may run the op before the matmul inside it (`normed_matmul`, `silu_matmul`); turned off by
    # MINIENGINE_CUDA_FUSE=0 (`fusing`), as the rotary + KV store kernel is
    fuses: bool = field(default_factory=lambda: fusing())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self.weight)

    def normed_matmul(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return gemv_rms_norm(x, residual, norm_weight, eps, self.weight)

    def silu_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return gemv_silu_and_mul(x, self.weight)


# What each program does to x as it loads it (the op before the matmul, fused so it needs no launch):
PLAIN, RMS_NORM, SILU_AND_MUL = 0, 1, 2


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias) -> [1, N] in x's dtype, accumulated in float32."""
    _check(x, weight, weight.shape[1])
    if x.shape[0] == 0:  # a step that samples nothing still asks its LM head
        return torch.nn.functional.linear(x, weight, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    y = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, y, *_config(x, weight, y))
    return y if bias is None else y + bias


def gemv_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm(x, norm_weight, eps, residual)` then the GEMV, in one launch: every program sums the squares of
    the whole row (K elements, from cache after the first) before streaming its rows of the weight, and
    program 0 writes x + residual. Returns (y [1, N], the next residual: x + residual, or x itself)."""
    _check(x, weight, weight.shape[1])
    if norm_weight.shape != (weight.shape[1],) or norm_weight.dtype != x.dtype:
        raise ValueError(f"gemv_rms_norm: norm weight {tuple(norm_weight.shape)} {norm_weight.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")  # fmt: skip
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"gemv_rms_norm: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    new_residual = torch.empty_like(x) if residual is not None else x
    y = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, y, *_config(x, weight, y), prologue=RMS_NORM, residual=residual, new_residual=new_residual,
            norm_weight=norm_weight, eps=eps)  # fmt: skip
    return y, new_residual


def gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul(x)` (x [1, 2K]: gate | up) then the GEMV by weight [N, K], in one launch."""
    _check(x, weight, 2 * weight.shape[1])
    x = x.contiguous()
    y = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, y, *_config(x, weight, y), prologue=SILU_AND_MUL)
    return y


def _check(x: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[0] > 1 or x.shape[1] != k:
        raise ValueError(f"gemv takes x [1, {k}], got {tuple(x.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("gemv needs a weight contiguous along K")


def _config(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    """The tile shape for this matrix: timed on its first call on a GPU (all prologues share it)."""
    n, k = weight.shape
    key = (n, k, weight.dtype, x.device)
    config = _chosen.get(key)
    if config is None:
        if x.device.type != "cuda":
            config = _chosen[key] = CANDIDATES[0]
        elif torch.cuda.is_current_stream_capturing():
            config = CANDIDATES[0]  # no timing inside a graph capture (warm-ups come first)
        else:
            config = _chosen[key] = _fastest(x[:, :k], weight, y)
    return config


def _launch(
    x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, block_n: int, block_k: int, warps: int,
    prologue: int = PLAIN, residual: torch.Tensor | None = None, new_residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
) -> None:  # fmt: skip
    n, k = weight.shape
    block_k = min(block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, n, k, weight.stride(0),
        residual if residual is not None else x, new_residual if new_residual is not None else x,
        norm_weight if norm_weight is not None else x, eps,
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, PROLOGUE=prologue,
        HAS_RESIDUAL=residual is not None, K_PAD=triton.next_power_of_2(k) if prologue == RMS_NORM else 1,
        num_warps=warps, num_stages=3, **pdl_options(x.device),
    )  # fmt: skip


def _fastest(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int]:
    x = x.contiguous()
    times = [triton.testing.do_bench(lambda c=c: _launch(x, weight, y, *c), warmup=5, rep=20) for c in CANDIDATES]
    return CANDIDATES[times.index(min(times))]


@triton.jit
def _load_x(x_ptr, res_ptr, cols, ok, HAS_RESIDUAL: tl.constexpr):
    """x (+ the residual, rounded to x's dtype as rms_norm rounds the sum) at `cols`."""
    x = tl.load(x_ptr + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _load_w(w_rows, row_ok, cols, col_ok, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_rows + cols[None, :], mask=row_ok[:, None], other=0.0)
    return tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _input_chunk(x_ptr, res_ptr, norm_w_ptr, inv_rms, cols, col_ok, K, PROLOGUE: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """x at `cols`, after the op before the matmul (PROLOGUE), in float32."""
    if PROLOGUE == 1:  # as rms_norm rounds: normalised in fp32, rounded, times the weight, rounded
        x = _load_x(x_ptr, res_ptr, cols, col_ok, HAS_RESIDUAL)
        g = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0)
        x = (g.to(tl.float32) * (x.to(tl.float32) * inv_rms).to(x.dtype).to(tl.float32)).to(x.dtype)
    elif PROLOGUE == 2:  # as silu_and_mul rounds: silu(gate) rounded, times up, rounded
        gate = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        up = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        x = (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    elif EVEN_K:
        x = tl.load(x_ptr + cols)
    else:
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr, N, K, stride_w, res_ptr, new_res_ptr, norm_w_ptr, eps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    # The first weight tile: no kernel writes it, so under PDL it loads while the kernel before still runs.
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    w = _load_w(w_rows, row_ok, cols, col_ok, EVEN_K)
    wait_for_inputs(PDL)
    inv_rms = 0.0
    if PROLOGUE == 1:  # RMSNorm: the whole row's mean square first (program 0 also writes x + residual)
        every = tl.arange(0, K_PAD)
        h = _load_x(x_ptr, res_ptr, every, every < K, HAS_RESIDUAL)
        if HAS_RESIDUAL and tl.program_id(0) == 0:
            tl.store(new_res_ptr + every, h, mask=every < K)
        h = h.to(tl.float32)
        inv_rms = tl.math.rsqrt(tl.sum(h * h, 0) / K + eps)
    x = _input_chunk(x_ptr, res_ptr, norm_w_ptr, inv_rms, cols, col_ok, K, PROLOGUE, HAS_RESIDUAL, EVEN_K)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = _load_w(w_rows, row_ok, cols, col_ok, EVEN_K)
        x = _input_chunk(x_ptr, res_ptr, norm_w_ptr, inv_rms, cols, col_ok, K, PROLOGUE, HAS_RESIDUAL, EVEN_K)
        acc += w.to(tl.float32) * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=row_ok)
