"""Triton RMSNorm (with the fused residual add), rotary embedding and SiLU-and-mul equal their torch
references (`kernels/fused_ops.py`) on random inputs, with every new output poisoned with NaN first.

On the CPU these run in Triton's interpreter; `-m gpu` repeats them at a real model's sizes.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from miniengine.kernels import fused_ops  # noqa: E402
from miniengine.kernels import triton_fused_ops as tfo  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # two rounding steps of the dtype


class _Poisoned:
    """Stands in for `torch` inside the kernel module: new float tensors come filled with NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    @staticmethod
    def empty_like(*args, **kwargs):
        t = torch.empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(tfo, "torch", _Poisoned())


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def close(actual, expected, rounded_to=None):
    """Equal up to the rounding of `rounded_to` (default: the output's dtype)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[rounded_to or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(dtype, device="cpu", tokens=5, hidden=96):
    x, residual = (
        randn(tokens, hidden, dtype=dtype, device=device),
        randn(tokens, hidden, dtype=dtype, device=device, seed=1),
    )
    weight = randn(hidden, dtype=dtype, device=device, seed=2)
    close(tfo.rms_norm(x, weight, 1e-6), fused_ops.rms_norm(x, weight, 1e-6))
    out, new_residual = tfo.rms_norm(x, weight, 1e-6, residual)
    expected_out, expected_residual = fused_ops.rms_norm(x, weight, 1e-6, residual)
    close(out, expected_out)
    if dtype == torch.bfloat16 and device == "cpu":  # the interpreter rounds fp32 -> bf16 toward zero
        close(new_residual, expected_residual)
    else:
        assert torch.equal(new_residual, expected_residual)  # one fp32 add, rounded once: bit for bit


def test_rms_norm_per_head_on_a_strided_view_and_fp32_weight():
    """Qwen3's q/k norm: [T, heads, D] views into the fused qkv output; an fp32 weight promotes the output."""
    qkv = randn(4, 6 * 64, dtype=torch.bfloat16)
    q = qkv[:, : 4 * 64].view(4, 4, 64)
    weight = randn(64, seed=3)
    close(tfo.rms_norm(q, weight, 1e-6), fused_ops.rms_norm(q, weight, 1e-6), rounded_to=torch.bfloat16)
    close(tfo.rms_norm(q, weight.bfloat16(), 1e-6), fused_ops.rms_norm(q, weight.bfloat16(), 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_views(dtype, device="cpu", tokens=6, heads=4, kv_heads=2, head_dim=64):
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    max_pos = max(100, 2 * tokens)
    angles = torch.outer(
        torch.arange(max_pos, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    )
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    positions = torch.randperm(max_pos, generator=torch.Generator().manual_seed(5))[:tokens].to(device)
    expected_q, expected_k = fused_ops.rotary(positions, q.clone(), k.clone(), cos, sin)
    out_q, out_k = tfo.rotary(positions, q, k, cos, sin)
    close(out_q, expected_q)
    close(out_k, expected_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # V, beside them, untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rotary_in_place(dtype, device="cpu", tokens=5, heads=4, kv_heads=2, head_dim=96):
    """Qwen3's per-head q/k RMSNorm fused into rotary equals rms_norm twice, then rotary (head_dim 96: the
    halves are padded to 64 lanes, so the norm's sum must ignore the padding)."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device) * 3
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    q_weight = randn(head_dim, dtype=dtype, device=device, seed=7)
    k_weight = randn(head_dim, dtype=dtype, device=device, seed=8)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), 1.0 / 500 ** (torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    positions = torch.tensor([0, 63, 5, 17, 40], device=device).repeat(tokens // 5 + 1)[:tokens]
    expected = fused_ops.qk_norm_rotary(positions, q.clone(), k.clone(), q_weight, k_weight, 1e-6, cos, sin)
    out_q, out_k = tfo.qk_norm_rotary(positions, q, k, q_weight, k_weight, 1e-6, cos, sin)
    assert out_q.data_ptr() == qkv.data_ptr()  # in place
    close(out_q, expected[0])
    close(out_k, expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "norm"), [(64, False), (96, True)])
def test_rotary_store_equals_rotary_then_store_kv(dtype, head_dim, norm, device="cpu", tokens=7, heads=4, kv_heads=2):
    """Rotary (with Qwen3's norms or not) and the KV store in one kernel: q and k as rotary leaves them, the
    cache as store_kv fills it (rotated K, V as is) in slots across blocks, a negative slot skipped, every
    other cache entry untouched."""
    from miniengine.kernels.paged_attention import store_kv

    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device) * 2
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    weights = (randn(head_dim, dtype=dtype, device=device, seed=3), randn(head_dim, dtype=dtype, device=device, seed=4))
    weights = weights if norm else (None, None)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), 1.0 / 500 ** (torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    positions = torch.tensor([3, 63, 5, 17, 40, 0, 9], device=device)[:tokens]
    slots = torch.tensor([5, 31, -1, 8, 16, 2, 30], device=device)[:tokens]  # block size 8: four blocks
    k_cache, v_cache = (randn(4, 8, kv_heads, head_dim, dtype=dtype, device=device, seed=s) for s in (5, 6))
    expected_cache = [k_cache.clone(), v_cache.clone()]
    if norm:
        expected_q, expected_k = fused_ops.qk_norm_rotary(positions, q.clone(), k.clone(), *weights, 1e-6, cos, sin)
    else:
        expected_q, expected_k = fused_ops.rotary(positions, q.clone(), k.clone(), cos, sin)
    keep = slots >= 0
    store_kv(expected_k[keep], v[keep], *expected_cache, slots[keep])
    tfo.rotary_store(positions, q, k, v, cos, sin, *weights, 1e-6, k_cache, v_cache, slots)
    close(q, expected_q)
    close(k, expected_k)
    close(k_cache, expected_cache[0])
    assert torch.equal(v_cache, expected_cache[1])
    with pytest.raises(ValueError, match="slot_mapping"):
        tfo.rotary_store(positions, q, k, v, cos, sin, *weights, 1e-6, k_cache, v_cache, slots[:3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, device="cpu"):
    x = randn(3, 2, 2 * 1100, dtype=dtype, device=device)  # two column blocks, the second partial
    close(tfo.silu_and_mul(x), fused_ops.silu_and_mul(x))


def test_bad_inputs_raise():
    x = randn(3, 8)
    with pytest.raises(ValueError, match="rms_norm"):
        tfo.rms_norm(x, randn(6), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        tfo.rms_norm(x, randn(8), 1e-6, randn(2, 8))
    with pytest.raises(ValueError, match="even"):
        tfo.silu_and_mul(randn(3, 7))
    with pytest.raises(ValueError, match="rotary"):
        tfo.rotary(torch.zeros(3, dtype=torch.long), randn(3, 2, 8), randn(3, 2, 6), randn(10, 4), randn(10, 4))


def test_fusion_setting(monkeypatch):
    """Fused by default; MINIENGINE_CUDA_FUSE=0 keeps the ops apart; anything else is an error naming it."""
    monkeypatch.delenv("MINIENGINE_CUDA_FUSE", raising=False)
    assert tfo.fusing()
    monkeypatch.setenv("MINIENGINE_CUDA_FUSE", "0")
    assert not tfo.fusing()
    monkeypatch.setenv("MINIENGINE_CUDA_FUSE", "on")
    with pytest.raises(ValueError, match="MINIENGINE_CUDA_FUSE"):
        tfo.fusing()


def test_dependent_launch_setting(monkeypatch):
    """PDL by default, only where a GPU has it: never on the CPU (the interpreter); MINIENGINE_CUDA_PDL is 0 or 1."""
    monkeypatch.delenv("MINIENGINE_CUDA_PDL", raising=False)
    assert tfo.pdl_options(torch.device("cpu")) == {"PDL": False}
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        assert tfo.pdl_options(torch.device("cuda"))["PDL"] is True, "on by default where the GPU has it"
    monkeypatch.setenv("MINIENGINE_CUDA_PDL", "1")
    assert tfo.pdl_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("MINIENGINE_CUDA_PDL", "yes")
    with pytest.raises(ValueError, match="MINIENGINE_CUDA_PDL"):
        tfo.pdl_options(torch.device("cpu"))
    monkeypatch.setenv("MINIENGINE_CUDA_PDL", "0")
    assert tfo.pdl_options(torch.device("cpu")) == {"PDL": False}


# ---- a real model's sizes on a GPU (pytest -m gpu) -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(dtype):
    test_rms_norm_with_and_without_residual(dtype, "cuda", tokens=300, hidden=4096)
    test_rotary_in_place_on_views(dtype, "cuda", tokens=300, heads=32, kv_heads=8, head_dim=128)
    test_qk_norm_rotary_in_place(dtype, "cuda", tokens=300, heads=16, kv_heads=8, head_dim=128)
    test_rotary_store_equals_rotary_then_store_kv(dtype, 128, True, "cuda", tokens=7, heads=16, kv_heads=8)
    x = randn(300, 2 * 14336, dtype=dtype, device="cuda")
    close(tfo.silu_and_mul(x), fused_ops.silu_and_mul(x))
