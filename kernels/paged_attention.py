"""Paged attention in plain torch: the reference every faster kernel is checked against, and the CPU path.

The KV cache of one layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`. A sequence's
K/V are scattered over blocks; its block table says which, in order:

    block_table [5, 1, 8]   block_size 4   seq_len 10
    K rows:     k_cache[5, 0:4] | k_cache[1, 0:4] | k_cache[8, 0:2]

The flat batch mixes prefill chunks and decodes. Query token t of a sequence sits at position
`seq_len - query_len + t` and attends causally to every cached position up to its own.
Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class PagedMetadata(Protocol):
    block_tables: torch.Tensor
    query_start_loc_host: list[int]
    seq_lens_host: list[int]


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) into their cache slots."""
    num_kv_heads, head_dim = key.shape[1:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A sequence's first `seq_len` cached rows, contiguous: [seq_len, num_kv_heads, head_dim]."""
    num_blocks = -(-seq_len // cache.shape[1])
    return cache[block_table[:num_blocks]].flatten(0, 1)[:seq_len]


def paged_attention_ref(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PagedMetadata, scale: float
) -> torch.Tensor:
    """Attention of every query token ([num_tokens, num_heads, head_dim]) over its sequence's cached K/V.

    One sequence at a time, written for clarity: the function faster kernels are compared against.
    """
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_host
    for i, seq_len in enumerate(metadata.seq_lens_host):
        q = query[starts[i] : starts[i + 1]]  # [q_len, H, D]
        k = gather_kv(k_cache, metadata.block_tables[i], seq_len)
        v = gather_kv(v_cache, metadata.block_tables[i], seq_len)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
        q_pos = torch.arange(seq_len - q.shape[0], seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(out.dtype)
    return out


def paged_attention_sdpa(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PagedMetadata, scale: float
) -> torch.Tensor:
    """The same function through torch's scaled_dot_product_attention: the CPU backend.

    Decode tokens (one query each) go in one padded batch; each prefill chunk is one call of its own.
    """
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_host
    seq_lens = metadata.seq_lens_host
    decodes = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
    prefills = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] > 1]
    if decodes:
        rows = torch.tensor([starts[i] for i in decodes], device=query.device)
        lens = torch.tensor([seq_lens[i] for i in decodes], device=query.device)
        max_len = int(lens.max())
        tables = metadata.block_tables[decodes, : -(-max_len // k_cache.shape[1])]
        k = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, Hkv, S, D]
        v = v_cache[tables].flatten(1, 2).transpose(1, 2)
        mask = torch.arange(k.shape[2], device=query.device)[None, :] < lens[:, None]
        q = query[rows].unsqueeze(2)  # [B, H, 1, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(2)
    for i in prefills:
        q = query[starts[i] : starts[i + 1]].transpose(0, 1)  # [H, q_len, D]
        k = gather_kv(k_cache, metadata.block_tables[i], seq_lens[i]).transpose(0, 1)
        v = gather_kv(v_cache, metadata.block_tables[i], seq_lens[i]).transpose(0, 1)
        q_pos = torch.arange(seq_lens[i] - q.shape[1], seq_lens[i], device=query.device)
        mask = torch.arange(seq_lens[i], device=query.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[starts[i] : starts[i + 1]] = o.transpose(0, 1)
    return out
