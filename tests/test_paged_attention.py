"""Paged attention: reading K/V through block tables equals plain causal attention on contiguous tensors.

Random mixed batches (prefill chunks with and without earlier context, decodes), grouped-query heads,
several block sizes, blocks scattered in random order over the cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from miniengine.kernels import paged_attention
from miniengine.kernels.paged_attention import paged_attention_ref, paged_attention_sdpa, store_kv


def dense_attention(q, k, v, scale):
    """q [n, H, D] are the last n positions of k, v [L, Hkv, D]; causal."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    L, n = k.shape[0], q.shape[0]
    mask = torch.arange(L)[None, :] > torch.arange(L - n, L)[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(mask, float("-inf")).softmax(-1), v)


# (context already cached, new tokens this step): decodes, a fresh prefill, a later chunk
MIXED = [(0, 7), (12, 1), (37, 1), (5, 9), (0, 1), (50, 20), (3, 1)]
DECODES = [(12, 1), (37, 1), (0, 1), (3, 1), (15, 1), (16, 1)]
EQUAL_DECODES = [(20, 1), (20, 1), (20, 1)]  # no sequence shorter than the longest: no mask (one sequence alone)


def make_batch(seed, block_size, num_heads=8, num_kv_heads=2, head_dim=16, shapes=MIXED, fill=None):
    """`fill`: the value of every cache slot no token writes (None: random numbers)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in shapes) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    if fill is not None:
        k_cache.fill_(fill)
        v_cache.fill_(fill)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables, queries, new_k, new_v, slots, dense, starts, lens = [], [], [], [], [], [], [0], []
    for context, n in shapes:
        length = context + n
        table = [free.pop() for _ in range(-(-length // block_size))]
        k = torch.randn(length, num_kv_heads, head_dim, generator=g)
        v = torch.randn(length, num_kv_heads, head_dim, generator=g)
        for pos in range(context):  # earlier tokens are already in the cache
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(context, length)]
        q = torch.randn(n, num_heads, head_dim, generator=g)
        queries.append(q)
        new_k.append(k[context:])
        new_v.append(v[context:])
        dense.append((q, k, v))
        tables.append(table)
        starts.append(starts[-1] + n)
        lens.append(length)
    width = max(map(len, tables))
    meta = SimpleNamespace(
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_start_loc_host=starts,
        seq_lens_host=lens,
        backend_state={},
    )
    return meta, torch.cat(queries), torch.cat(new_k), torch.cat(new_v), torch.tensor(slots), k_cache, v_cache, dense


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("attend", [paged_attention_ref, paged_attention_sdpa])
@pytest.mark.parametrize("group_limit", [64, paged_attention.MAX_PADDED_SCORES])  # many padded groups, or few
def test_paged_attention_equals_dense(block_size, attend, group_limit, monkeypatch):
    monkeypatch.setattr(paged_attention, "MAX_PADDED_SCORES", group_limit)
    meta, q, k, v, slots, k_cache, v_cache, dense = make_batch(block_size, block_size)
    store_kv(k, v, k_cache, v_cache, slots)
    out = attend(q, k_cache, v_cache, meta, 0.25)
    expected = torch.cat([dense_attention(dq, dk, dv, 0.25) for dq, dk, dv in dense])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shapes", [MIXED, DECODES, EQUAL_DECODES, [(29, 1)]], ids=["mixed", "decodes", "equal", "one"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_unwritten_cache_slots_are_never_read(shapes, block_size):
    """The cache is allocated without zero-filling: NaN in every slot no token wrote (block tables are padded
    with block 0, which may be one of them) changes nothing."""
    results = []
    for fill in (0.0, float("nan")):
        meta, q, k, v, slots, k_cache, v_cache, dense = make_batch(3, block_size, shapes=shapes, fill=fill)
        store_kv(k, v, k_cache, v_cache, slots)
        results.append(paged_attention_sdpa(q, k_cache, v_cache, meta, 0.25))
    assert not results[1].isnan().any()
    torch.testing.assert_close(results[1], results[0], atol=0, rtol=0)
    expected = torch.cat([dense_attention(dq, dk, dv, 0.25) for dq, dk, dv in dense])
    torch.testing.assert_close(results[1], expected, atol=1e-5, rtol=1e-4)


def test_decode_attention_of_an_empty_row_is_zero():
    """A padded row of a compiled decode step (seq_len 0) reads no key and returns zeros, not NaN."""
    k_cache = torch.full((4, 4, 2, 8), float("nan"))
    out = paged_attention.paged_decode_attention(
        torch.randn(2, 4, 8), k_cache, k_cache, torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 0]), 0.5
    )
    assert torch.equal(out, torch.zeros(2, 4, 8))


def test_store_kv_writes_only_its_slots():
    k_cache = torch.randn(4, 4, 2, 8)
    v_cache = torch.randn(4, 4, 2, 8)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([13, 2, 7])
    store_kv(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 8), v_cache.view(-1, 2, 8)
    torch.testing.assert_close(flat_k[slots], key)
    torch.testing.assert_close(flat_v[slots], value)
    untouched = [i for i in range(16) if i not in slots.tolist()]
    torch.testing.assert_close(flat_k[untouched], before_k.view(-1, 2, 8)[untouched])
    torch.testing.assert_close(flat_v[untouched], before_v.view(-1, 2, 8)[untouched])
