"""The small per-token ops of a transformer layer, in plain torch: the references their Triton versions
(`triton_fused_ops.py`) are checked against, and what the CPU runs.

    rms_norm(x, w, eps, residual)   x + residual -> the new residual; normalise it -> w * x / rms(x)
    rotary(positions, q, k, cos, sin)   rotate each head's two halves by its token's angle ("neox" layout)
    qk_norm_rotary(positions, q, k, q_weight, k_weight, eps, cos, sin)   RMSNorm each head (Qwen3), then rotary
    silu_and_mul(x)                 [T, 2I] -> silu(gate) * up -> [T, I]

Each computes in float32 and rounds once at the end, as transformers does, so outputs match it bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, first add it and also return the sum (the next residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by the angles of their positions [T] (cos, sin: [max_pos, D/2])."""
    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


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
    """Qwen3's per-head RMSNorm of q and k, then rotary: the reference of the fused Triton kernel."""
    return rotary(positions, rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
