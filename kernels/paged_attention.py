"""Paged attention in plain torch: the reference every faster kernel is checked against, and the CPU path.

The KV cache of one layer is two tensors `[num_blocks, block_size, num_kv_heads, head_dim]`. A sequence's
K/V are scattered over blocks; its block table says which, in order:

    block_table [5, 1, 8]   block_size 4   seq_len 10
    K rows:     k_cache[5, 0:4] | k_cache[1, 0:4] | k_cache[8, 0:2]

The flat batch mixes prefill chunks and decodes. Query token t of a sequence sits at position
`seq_len - query_len + t` and attends causally to every cached position up to its own.
Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads).

The padded backends gather whole blocks, so they also read slots no token has written yet (the tail of a
sequence's last block, the padding of its block table). The cache is allocated without zero-filling and
those slots may hold anything, NaN included; a zero attention weight does not cancel NaN (0 x NaN = NaN),
so the gathered K and V are zeroed past each sequence's length before they meet a query.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class PagedMetadata(Protocol):
    block_tables: torch.Tensor
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    backend_state: dict


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


def gather_padded(cache: torch.Tensor, tables: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
    """The cached rows of each table's blocks, [B, blocks * block_size, Hkv, D], zero where `key_ok` [B, keys]
    is False (slots past a sequence's length may never have been written)."""
    rows = cache.index_select(0, tables.flatten()).view(tables.shape[0], -1, *cache.shape[2:])
    return torch.where(key_ok[:, :, None, None], rows, 0.0)


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per sequence (query [B, H, D]) over the first `seq_lens` [B] cached rows
    of `block_tables` [B, blocks], all in one call: tensors only, no host values, so a decode step can be
    compiled. A sequence of length 0 (a padded row of a compiled step) reads nothing and gets zeros."""
    key_ok = torch.arange(block_tables.shape[1] * k_cache.shape[1], device=query.device) < seq_lens[:, None]
    k, v = gather_padded(k_cache, block_tables, key_ok), gather_padded(v_cache, block_tables, key_ok)
    out = F.scaled_dot_product_attention(
        query[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_ok[:, None, None], scale=scale,
        enable_gqa=True,
    )  # fmt: skip
    return torch.where(seq_lens[:, None, None] > 0, out[:, :, 0], 0.0)


def paged_attention_sdpa(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PagedMetadata, scale: float
) -> torch.Tensor:
    """The same function through torch's scaled_dot_product_attention, a few padded groups at a time.

    A decode step (one query per sequence) is one `paged_decode_attention` call. Otherwise sequences are
    grouped (decodes together, prefill chunks together while the padded score matrix stays small); each
    group's queries and cached K/V are padded to its longest and attended in one call. The grouping and
    index tensors are the same in every layer, so the first layer builds them and stashes them in
    `metadata.backend_state` for the rest.
    """
    block_size = k_cache.shape[1]
    plan = metadata.backend_state.get("sdpa")
    if plan is None:
        plan = metadata.backend_state["sdpa"] = _plan(metadata, query.shape[0], block_size, query.device)
    if isinstance(plan, DecodePlan):
        return _planned_decode_attention(query, k_cache, v_cache, plan, scale)
    out = torch.empty_like(query)
    for tokens, valid, tables, mask, key_ok in plan:
        q = query[tokens].transpose(1, 2)  # [B, H, max_q, D]
        k, v = gather_padded(k_cache, tables, key_ok), gather_padded(v_cache, tables, key_ok)
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[tokens[valid]] = o.transpose(1, 2)[valid]
    return out


class DecodePlan(NamedTuple):
    rows: torch.Tensor  # [B * blocks of the longest sequence]: the cache blocks to gather, table by table
    keys: int  # the longest sequence's length: gathered keys past it are dropped
    key_ok: torch.Tensor | None  # [B, 1, 1, keys]: the keys below each sequence's length; None: all are
    pad_rows: torch.Tensor | None  # the other keys' indices in the gathered [B * keys] rows


def _planned_decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan, scale: float
) -> torch.Tensor:
    """`paged_decode_attention` with the step's index tensors made once for every layer (`_plan`): the
    slots past each sequence's length are zeroed by their row indices, a few per sequence, instead of a
    `where` over every gathered value (half the attention's time on the CPU at 32 sequences); sequences of
    one length (one sequence alone) need neither that nor a mask."""
    batch, heads = query.shape[0], k_cache.shape[2:]
    k, v = (cache.index_select(0, plan.rows).view(batch, -1, *heads)[:, : plan.keys] for cache in (k_cache, v_cache))
    if plan.pad_rows is not None:
        k, v = k.flatten(0, 1), v.flatten(0, 1)  # copies (the slice above is strided), then zero the padding
        k.index_fill_(0, plan.pad_rows, 0.0)
        v.index_fill_(0, plan.pad_rows, 0.0)
        k, v = k.view(batch, plan.keys, *heads), v.view(batch, plan.keys, *heads)
    out = F.scaled_dot_product_attention(
        query[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.key_ok, scale=scale, enable_gqa=True
    )  # fmt: skip
    return out[:, :, 0]


def _plan(metadata: PagedMetadata, num_tokens: int, block_size: int, device: torch.device) -> DecodePlan | list:
    seq_lens = metadata.seq_lens_host
    if num_tokens == len(seq_lens):  # every sequence has one new token: a decode step
        keys = max(seq_lens)
        rows = metadata.block_tables[:, : -(-keys // block_size)].flatten()
        if min(seq_lens) == keys:
            return DecodePlan(rows, keys, None, None)
        key_ok = torch.arange(keys, device=device) < torch.tensor(seq_lens, device=device)[:, None]
        return DecodePlan(rows, keys, key_ok[:, None, None], torch.nonzero(~key_ok.flatten()).flatten())
    return _plan_groups(metadata, block_size, device)


MAX_PADDED_SCORES = 1 << 22  # per head: queries x keys of one padded group


def _plan_groups(metadata: PagedMetadata, block_size: int, device: torch.device) -> list[tuple]:
    """For each group: token indices [B, max_q] (padding repeats a real token), which are real, block
    tables [B, blocks], the mask [B, 1, max_q, keys] (causal, offset by the cached context), and which
    keys [B, keys] lie below each sequence's length."""
    starts, seq_lens = metadata.query_start_loc_host, metadata.seq_lens_host
    # By query length: decodes first, then prefill chunks, so each group's last member has its longest query.
    order = sorted(range(len(seq_lens)), key=lambda i: (starts[i + 1] - starts[i], seq_lens[i]))
    groups: list[list[int]] = []
    longest = 0  # the longest sequence in the last group
    for i in order:
        q_len = starts[i + 1] - starts[i]
        if groups:
            first_q = starts[groups[-1][0] + 1] - starts[groups[-1][0]]
            fits = (len(groups[-1]) + 1) * q_len * max(longest, seq_lens[i]) <= MAX_PADDED_SCORES
            if (q_len == 1) == (first_q == 1) and fits:
                groups[-1].append(i)
                longest = max(longest, seq_lens[i])
                continue
        groups.append([i])
        longest = seq_lens[i]
    plan = []
    for g in groups:
        q_lens = [starts[i + 1] - starts[i] for i in g]
        lens = [seq_lens[i] for i in g]
        max_q, blocks = max(q_lens), -(-max(lens) // block_size)
        tokens = torch.tensor([[starts[i] + min(t, n - 1) for t in range(max_q)] for i, n in zip(g, q_lens)])
        valid = torch.arange(max_q)[None, :] < torch.tensor(q_lens)[:, None]
        q_pos = torch.tensor([n - q for n, q in zip(lens, q_lens)])[:, None] + torch.arange(max_q)[None, :]
        mask = torch.arange(blocks * block_size)[None, None, :] <= q_pos[:, :, None]
        key_ok = torch.arange(blocks * block_size)[None, :] < torch.tensor(lens)[:, None]
        tables = metadata.block_tables[g, :blocks]
        plan.append((tokens.to(device), valid.to(device), tables, mask[:, None].to(device), key_ok.to(device)))
    return plan
