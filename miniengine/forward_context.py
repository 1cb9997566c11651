"""The per-step forward context: the one ambient object, read by attention layers during a forward pass.

The model runner builds an `AttentionMetadata` for the flat token batch of a step and sets it here for
the duration of `model.forward`; each attention layer reads it to find where to write the new K/V
(`slot_mapping`) and which cached K/V each sequence attends to (`block_tables`, `seq_lens`).

    flat batch   [ a0 a1 a2 a3 | b7 | c0 c1 ]      a: prefill chunk, b: decode, c: prefill chunk
    query_start_loc [0, 4, 5, 7]                    where each sequence's tokens start
    seq_lens        [4, 8, 2]                       tokens each sequence attends to, new ones included
    slot_mapping    one cache slot per new token: block_table[pos // B] * B + pos % B
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


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
class AttentionBackend:
    """The two functions a platform supplies: write new K/V into the paged cache, and attend through it."""

    name: str
    store_kv: Callable[..., None]  # (key, value, k_cache, v_cache, slot_mapping)
    attend: Callable[..., torch.Tensor]  # (query, k_cache, v_cache, metadata, scale) -> output


@dataclass(slots=True)
class ForwardContext:
    attn_metadata: AttentionMetadata
    attention: AttentionBackend


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
