"""The per-step forward context: the one ambient object, read by the layers during a forward pass.

The model runner builds an `AttentionMetadata` for the flat token batch of a step and sets it here, with
the platform's `Kernels`, for the duration of `model.forward`. Each attention layer reads the metadata to
find where to write the new K/V (`slot_mapping`) and which cached K/V each sequence attends to
(`block_tables`, `seq_lens`); every layer calls its norm, rotary, activation and attention through `kernels`.

    flat batch   [ a0 a1 a2 a3 | b7 | c0 c1 ]      a: prefill chunk, b: decode, c: prefill chunk
    query_start_loc [0, 4, 5, 7]                    where each sequence's tokens start
    seq_lens        [4, 8, 2]                       tokens each sequence attends to, new ones included
    slot_mapping    one cache slot per new token: block_table[pos // B] * B + pos % B
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from miniengine.kernels import fused_ops


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, so CPU backends can loop without device syncs.
    query_start_loc_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # Scratch space for the attention backend: what it derives from this metadata once per step
    # (in the first layer) and reuses in the others.
    backend_state: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Kernels:
    """The hot-path functions a platform supplies; layers call them through the forward context.

    The CPU gives the plain-torch references (kernels/paged_attention.py, kernels/fused_ops.py), CUDA the
    Triton kernels beside them; a platform plugin may bring its own. Same signatures everywhere.
    """

    name: str
    store_kv: Callable[..., None]  # (key, value, k_cache, v_cache, slot_mapping)
    attend: Callable[..., torch.Tensor]  # (query, k_cache, v_cache, metadata, scale) -> output
    rms_norm: Callable[..., Any] = fused_ops.rms_norm  # (x, weight, eps, residual=None)
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] = fused_ops.rotary  # (positions, q, k, cos, sin)
    silu_and_mul: Callable[..., torch.Tensor] = fused_ops.silu_and_mul
    # (x, w13, w2, topk_weights, topk_ids) -> [T, hidden]: the experts of a MoE layer (kernels/moe.py)
    fused_moe: Callable[..., torch.Tensor] | None = None
    # (positions, q, k, q_weight, k_weight, eps, cos, sin): Qwen3's q/k RMSNorm fused into rotary; None runs
    # rms_norm twice, then rotary
    qk_norm_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    # (positions, q, k, v, cos, sin, q_weight | None, k_weight | None, eps, k_cache, v_cache, slot_mapping):
    # rotary (Qwen3's q/k norms first when the weights are given), then store_kv, in one kernel; None: apart
    rotary_store: Callable[..., None] | None = None


@dataclass(slots=True)
class ForwardContext:
    attn_metadata: AttentionMetadata
    kernels: Kernels


_context: ForwardContext | None = None


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[None]:
    global _context
    previous, _context = _context, context
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> ForwardContext:
    if _context is None:
        raise RuntimeError("no forward context: call the model through ModelRunner, or set_forward_context(...)")
    return _context
