"""The layers Llama-family models are built from: RMSNorm, rotary embedding, attention (the linears, split
across tensor parallel ranks, are in parallel.py).

`Attention` writes the new K/V into the paged cache and attends through block tables. The math of each layer
is a function of the platform's `Kernels` (plain torch on the CPU, Triton on CUDA), found in the forward
context.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from miniengine.forward_context import get_forward_context


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise `x`; with `residual`, first add it and also return the sum (the next residual)."""
        return get_forward_context().kernels.rms_norm(x, self.weight, self.eps, residual)

    def then(self, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None):
        """`linear(self(x, residual))` and the next residual (x + residual, or x itself when there is none).
        Where `linear` takes this step's rows through a GEMV that normalises its own input (a one-row decode
        on a GPU, kernels/triton_gemv.py) that is one launch instead of two."""
        fused = fused_prologue(linear, x, "normed_matmul")
        if fused is not None and self.weight.dtype == x.dtype:
            y, residual = fused(x, residual, self.weight, self.eps)
            return (y if linear.bias is None else y + linear.bias), residual
        if residual is None:
            return linear(self(x)), x
        x, residual = self(x, residual)
        return linear(x), residual


def fused_prologue(linear: nn.Module, x: torch.Tensor, name: str):
    """The packed weight's fused form `name` of `linear` (see `RMSNorm.then`) when it takes x's rows; else None."""
    packed = getattr(linear, "packed_weight", None)
    if packed is None or not getattr(packed, "fuses", False) or x.dim() != 2 or x.shape[0] > packed.max_rows:
        return None
    return getattr(packed, name, None)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, "neox" layout (rotate the two halves of each head), as HF Llama does."""

    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        # float32 throughout, as transformers computes it, so positions rotate to the same bits.
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type != "default":
            raise NotImplementedError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3 are)")
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, norms: tuple[RMSNorm, RMSNorm] | None = None
    ):
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by their token positions [T]; with `norms` (Qwen3's q_norm and
        k_norm), normalise each head first, in one kernel where the platform has it."""
        kernels = get_forward_context().kernels
        if norms is None:
            return kernels.rotary(positions, q, k, self.cos, self.sin)
        q_norm, k_norm = norms
        if kernels.qk_norm_rotary is None:
            return kernels.rotary(positions, q_norm(q), k_norm(k), self.cos, self.sin)
        return kernels.qk_norm_rotary(positions, q, k, q_norm.weight, k_norm.weight, q_norm.eps, self.cos, self.sin)

    def rotate_into_cache(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        norms: tuple[RMSNorm, RMSNorm] | None, attention: Attention,
    ) -> bool:  # fmt: skip
        """`forward`, then `attention`'s store of k and v into its KV cache, in one kernel where the platform
        has one (False: it has none, and nothing was done)."""
        context = get_forward_context()
        fused = context.kernels.rotary_store
        if fused is None:
            return False
        weights, eps = ((norms[0].weight, norms[1].weight), norms[0].eps) if norms else ((None, None), 0.0)
        fused(positions, q, k, v, self.cos, self.sin, *weights, eps, attention.k_cache, attention.v_cache,
              context.attn_metadata.slot_mapping)  # fmt: skip
        return True


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent stretch: long wavelengths slowed by `factor`, short ones kept."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(middle, blended, scaled)


class Attention(nn.Module):
    """Paged attention over this layer's slice of the KV cache (`k_cache`, `v_cache`, set by the runner)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq * D]."""
        context = get_forward_context()
        context.kernels.store_kv(k, v, self.k_cache, self.v_cache, context.attn_metadata.slot_mapping)
        return self.attend(q)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """`forward` once this step's K and V are in the cache."""
        context = get_forward_context()
        return context.kernels.attend(q, self.k_cache, self.v_cache, context.attn_metadata, self.scale).flatten(1)
