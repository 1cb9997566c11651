"""The small per-token ops of a transformer layer in Triton, each one launch with no host sync, so CUDA
graphs capture them; same signatures and results as their references in `fused_ops.py`.

    rms_norm      one program per row: (x + residual) -> new residual, then w * x / rms(x)
    rotary        one program per token: every q and k head's two halves rotated in place
    qk_norm_rotary  the same program, each head first RMS-normalised (Qwen3): three launches become one
    rotary_store  either of them, also writing each token's rotated K and its V into the KV cache (store_kv)
    silu_and_mul  one program per (token, column block): silu(gate) * up

Each computes in float32 and rounds where the reference rounds (after the residual add, before the weight,
after silu), so results agree with torch to the last bit or one rounding step.

Programmatic dependent launch (PDL, Hopper and later; `pdl_options`). A decode step of a small model is ~170
short kernels in a row, and between two of them the GPU idles: the next kernel is launched only once the
last program of the one before has ended, and its first loads start from cold. With PDL every Triton kernel
here is launched early, while the kernel before it is still finishing, and waits in `wait_for_inputs` until
that kernel has ended and its writes are visible; what does not depend on it (a GEMV's first weight tile)
it loads before waiting:

    without   |== gemv A ==|  launch  |== gemv B ==|
    with PDL  |== gemv A ==|
                      |B: load weights, wait|== gemv B ==|

Each kernel waits before it reads or writes anything another kernel touches, so a kernel ends only after
the one before it has ended: the stream keeps its order. Torch's own kernels launch as before.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def fusing() -> bool:
    """Whether the GPU path fuses ops across kernels' edges (on unless MINIENGINE_CUDA_FUSE=0): the norm and
    activation into the one-row GEMV, the KV store into rotary. On an H100 these passed the kernel tests and
    Qwen3-0.6B's model parity tests (`pytest -m gpu`), and one sequence's decode took 1.11 ms a token against
    1.22 apart (`bench/latency.py --compare-env MINIENGINE_CUDA_FUSE=0`; then with the split merge in the
    attention kernel, since removed as slower)."""
    flag = os.environ.get("MINIENGINE_CUDA_FUSE", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"MINIENGINE_CUDA_FUSE={flag!r} is not 0 (separate kernels) or 1 (fused)")
    return flag == "1"


def pdl_options(device: torch.device) -> dict:
    """The launch options of a kernel that calls `wait_for_inputs`: PDL on a GPU that has it (Hopper and
    later, with a Triton that has `launch_pdl`); MINIENGINE_CUDA_PDL=0, the CPU's interpreter and older GPUs
    launch each kernel after the one before has ended. On by default since the kernel tests and the model
    parity tests (tests/test_gpu_models.py, Qwen3-0.6B and Llama-3-8B shapes) passed with it on an H100,
    where it took one Qwen3-0.6B sequence's decode from 1.07 to 0.93 ms a token (fused kernels)."""
    flag = os.environ.get("MINIENGINE_CUDA_PDL", "1")
    if flag not in ("0", "1"):
        raise ValueError(f"MINIENGINE_CUDA_PDL={flag!r} is not 0 (plain launches) or 1 (dependent launches)")
    if flag == "1" and device.type == "cuda" and _has_pdl(device.index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@functools.lru_cache(maxsize=8)
def is_hopper_or_later(index: int | None) -> bool:
    """Compute capability 9.0 or more (PDL, TMA): asked once per device, off the launch path."""
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.lru_cache(maxsize=8)
def _has_pdl(index: int | None) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or not is_hopper_or_later(index):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under PDL: wait until the kernel before has ended (its writes visible), then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x ([T, H], or [T, heads, D] as Qwen3's q/k norm); with `residual`
    ([T, H]), first add it and also return the sum (the next residual)."""
    if x.dim() not in (2, 3) or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm takes x [T, H] or [T, heads, D] with D = {weight.shape[0]}, got {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or x.dim() != 2):
        raise ValueError(f"residual {tuple(residual.shape)} must be [T, H] like x {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    size = x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    rows = x.shape[0] * heads
    if rows:
        _rms_norm_kernel[(rows,)](
            x, weight, out, residual if residual is not None else x, new_residual, eps, size, heads,
            x.stride(0), x.stride(1) if x.dim() == 3 else 0,
            residual.stride(0) if residual is not None else 0,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(size),
            num_warps=min(8, max(1, triton.next_power_of_2(size) // 256)), **pdl_options(x.device),
        )  # fmt: skip
    return out if residual is None else (out, new_residual)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, new_res_ptr, eps, size, heads, stride_xt, stride_xh, stride_rt,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    token = row // heads
    x = tl.load(x_ptr + token * stride_xt + (row % heads) * stride_xh + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + token * stride_rt + cols, mask=ok, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(new_res_ptr + row * size + cols, x, mask=ok)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / size + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * size + cols, (w * h.to(x.dtype).to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the angles of their positions [T]
    (cos, sin: [max_pos, D/2]), "neox" layout; returns q and k."""
    return _rotary(positions, q, k, cos, sin, None, None, 0.0)


def qk_norm_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over each head of q and k (weights [D], in q's dtype), then `rotary`, in place: one launch."""
    head_dim = q.shape[-1]
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(f"qk_norm_rotary needs q/k norm weights of [{head_dim}]: got {tuple(q_weight.shape)}, "
                         f"{tuple(k_weight.shape)}")  # fmt: skip
    return _rotary(positions, q, k, cos, sin, q_weight, k_weight, eps)


def rotary_store(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:  # fmt: skip
    """`rotary` (after `qk_norm_rotary`'s per-head norms when q_weight / k_weight are given) and then
    `store_kv(k, v, k_cache, v_cache, slot_mapping)`, in one launch: each token's program writes its rotated
    K heads, and its V heads, into their cache slot as well (a negative slot: not stored)."""
    check_kv_store(k, v, k_cache, v_cache, slot_mapping)
    if v.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rotary_store needs v and the KV cache contiguous in head_dim")
    store = (v, k_cache, v_cache, slot_mapping)
    _rotary(positions, q, k, cos, sin, q_weight, k_weight, eps, store)


def check_kv_store(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Shapes of a store of the new tokens' K and V ([num_tokens, num_kv_heads, head_dim]) into their cache
    slots (`rotary_store` here, `store_kv` in triton_paged_attention.py)."""
    if value.shape != key.shape or k_cache.shape[2:] != key.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"key {tuple(key.shape)}, value {tuple(value.shape)} do not fit caches "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)} ([num_blocks, block_size, num_kv_heads, head_dim])"
        )
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} tokens")


def _rotary(positions, q, k, cos, sin, q_weight, k_weight, eps, store=None):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2 or cos.shape[-1] * 2 != head_dim:
        raise ValueError(
            f"rotary takes q [T, Hq, D], k [T, Hkv, D], cos/sin [max_pos, D/2]: got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(cos.shape)}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary rotates in place: q and k must be contiguous in head_dim")
    if num_tokens:
        half = head_dim // 2
        norm = q_weight is not None
        v, k_cache, v_cache, slots = store if store is not None else (k, k, k, positions)  # unread without one
        cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3]) if store is not None else (0,) * 6
        _rotary_kernel[(num_tokens,)](
            positions, q, k, cos.contiguous(), sin.contiguous(), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_weight if norm else q, k_weight if norm else k, eps,
            v, v.stride(0), v.stride(1), k_cache, v_cache, slots, *cache_strides,
            HALF=half, HALF_PAD=triton.next_power_of_2(half), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEADS_PAD=triton.next_power_of_2(max(num_heads, num_kv_heads)), NORM=norm, STORE=store is not None,
            BLOCK_SIZE=k_cache.shape[1] if store is not None else 1, **pdl_options(q.device),
        )  # fmt: skip
    return q, k


@triton.jit
def _rotate_heads(
    ptr, stride_h, c, s, w_ptr, eps, cache_ptr, stride_ch, slot,
    NUM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, NORM: tl.constexpr,
    STORE: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, HEADS_PAD)[:, None]
    cols = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM) & (cols < HALF)
    first = ptr + heads * stride_h + cols
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:  # as rms_norm: normalise in fp32, round, times the weight, round (padding adds zeros)
        r = tl.math.rsqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        a = (w1 * (a * r).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
        b = (w2 * (b * r).to(x1.dtype).to(tl.float32)).to(x1.dtype).to(tl.float32)
    y1, y2 = (a * c - b * s).to(x1.dtype), (b * c + a * s).to(x1.dtype)
    tl.store(first, y1, mask=mask)
    tl.store(first + HALF, y2, mask=mask)
    if STORE:  # K heads also go to their cache slot, unless it is negative
        cached = cache_ptr + heads * stride_ch + cols
        mask = mask & (heads * 0 + slot >= 0)  # (a scalar broadcast by arithmetic: the interpreter wants it)
        tl.store(cached, y1, mask=mask)
        tl.store(cached + HALF, y2, mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, q_w_ptr, k_w_ptr, eps,
    v_ptr, stride_vt, stride_vh, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr, NORM: tl.constexpr, STORE: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    c = tl.load(cos_ptr + pos * HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    q = q_ptr + token * stride_qt
    k = k_ptr + token * stride_kt
    if STORE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
    else:
        slot = token
    k_cached = k_cache_ptr + (slot // BLOCK_SIZE) * stride_kcb + (slot % BLOCK_SIZE) * stride_kcs
    _rotate_heads(q, stride_qh, c, s, q_w_ptr, eps, q, 0, 0, NUM_HEADS, HALF, HALF_PAD, HEADS_PAD, NORM, False)
    _rotate_heads(k, stride_kh, c, s, k_w_ptr, eps, k_cached, stride_kch, slot,
                  NUM_KV_HEADS, HALF, HALF_PAD, HEADS_PAD, NORM, STORE)  # fmt: skip
    if STORE:  # V as it is, into the same slot
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = tl.arange(0, 2 * HALF_PAD)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < 2 * HALF) & (heads * 0 + slot >= 0)
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
        v_cached = v_cache_ptr + (slot // BLOCK_SIZE) * stride_vcb + (slot % BLOCK_SIZE) * stride_vcs
        tl.store(v_cached + heads * stride_vch + dims, v, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up, [..., I] (gate the first half, up the second)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (gate | up), got {tuple(x.shape)}")
    size = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * size)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(rows.shape[0], size, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(size))
    if out.numel():
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(size, block))](
            rows, out, size, rows.stride(0), BLOCK=block, **pdl_options(x.device)
        )
    return out.view(*x.shape[:-1], size)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, size, stride_xt, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    gate = tl.load(x_ptr + token * stride_xt + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + token * stride_xt + size + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded, as F.silu returns it, before the product
    tl.store(out_ptr + token * size + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)
