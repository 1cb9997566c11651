"""Paged attention in Triton: one launch for a whole mixed batch of decodes and prefill chunks.

The flat batch is cut into query tiles: a few query tokens of one sequence, times the query heads that
share one KV head (GQA), stacked as the rows of one matrix. One program takes one tile, one KV head and
one split of the keys. It walks its keys BLOCK_N at a time, finding each key's cache slot through the
block table, and keeps a running ("online") softmax, so the scores of a long context never sit in memory:

    tile rows (tokens x heads)   keys of the sequence, through block_table [5, 1, 8, 2, ...]
      t0: h0 h1 h2 h3            |--- BLOCK_N ---|--- BLOCK_N ---|--- BLOCK_N ---|-- ...
      t1: h0 h1 h2 h3              s = q k^T       for each tile of keys:
                                                     m' = max(m, rowmax(s))         running max
                                                     p  = exp(s - m')
                                                     l  = l * exp(m - m') + rowsum(p)  running sum
                                                     acc = acc * exp(m - m') + p v
                                                   at the end: out = acc / l

Query token t of a sequence sits at position `seq_len - q_len + t` and sees keys up to its own position.
Keys below the tile's first position are seen by every row (no mask needed); only the last few key tiles,
near the diagonal, are masked.

Flash-decoding: a decode has one query token, so a batch of a few long sequences would give too few
programs to fill the GPU. The keys are then split across programs; each writes its partial output and
log-sum-exp, and a small second kernel merges them (weights exp(lse_s - max lse)). (Merging in the
attention kernel instead, by whichever split finishes last, told by an atomic counter, measured slower on an
H100 at every shape tried: 9.3 vs 7.7 us a launch at one sequence of 640 keys and 8 splits.)

    keys  |-------- split 0 --------|-------- split 1 --------|---- split 2 ----|
            (o0, lse0)                (o1, lse1)                (o2, lse2)   ->  o = sum_s w_s o_s / sum_s w_s

The grid depends only on host integers (number of tokens, sequences, KV heads, splits): every program
reads its sequence's lengths on the device, so a captured CUDA graph replays right for any `seq_lens`.
A program finds its sequence by a binary search over `query_start_loc`, except in a pure decode batch,
where tile i is sequence i.
A split past a sequence's end does nothing; a sequence of length 0 (a padded graph row) gets zeros.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from miniengine.kernels.paged_attention import PagedMetadata
from miniengine.kernels.triton_fused_ops import check_kv_store, pdl_options, wait_for_inputs

# Flash-decoding heuristic: split while (tiles x KV heads) gives fewer than TARGET_PROGRAMS_PER_SM programs
# per SM, never below MIN_KEYS_PER_SPLIT keys per split, nor more than MAX_SPLITS.
TARGET_PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 512
MAX_SPLITS = 32
# Prefill and mixed batches over caches whose elements all lie within this many of their first compute K/V
# addresses (a [BLOCK_N, head_dim] offset tile per key tile) in 32-bit integers: prefill 8 x 2048 on an H100
# 817 -> 783 us. Decode keeps 64-bit offsets, which measured faster there (64 x 4096: 370 vs 417 us).
MAX_INT32_SPAN = 2**31 - 1


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows of a query tile: (query tokens) x (query heads of one KV head, padded to a power of 2)
    block_n: int  # keys per loop step
    num_warps: int
    num_stages: int
    # q k^T and P V on tensor cores (tl.dot, at least 16 rows); False, decode only: products and sums on the
    # CUDA cores over the real rows alone (one query token's heads of a KV head), as decode kernels without
    # tensor cores do. A candidate of `bench/kernels/attention.py --sweep`, not yet in the tables.
    dot: bool = True


# Keyed on the batch kind, then head_dim (<= 64, <= 128, else 256). Decode is bandwidth-bound: the
# smallest row count tl.dot allows (16), and key tiles of 32 KB (K and V) per step, so three pipeline stages
# keep ~64 KB in flight per program with two programs per SM. Prefill is compute-bound: 128 rows share each
# K/V tile (32 tokens x 4 heads at GQA 4); 4 warps measured fastest on an H100 (796 us vs 995 us with 8 for
# 8 x 2048 tokens, `bench/kernels/attention.py --sweep`).
# Mixed batches (mostly decodes plus a few chunks) take 64 rows: decode tiles waste half as much tensor-core
# work as with 128, and stay bandwidth-bound. head_dim 256 halves a tile's keys (decode, mixed) or rows
# (prefill), so K/V stages fit shared memory and the accumulator fits registers.
TILE_CONFIGS: dict[str, dict[int, TileConfig]] = {
    "decode": {64: TileConfig(16, 128, 4, 3), 128: TileConfig(16, 64, 4, 3), 256: TileConfig(16, 32, 4, 3)},
    "mixed": {64: TileConfig(64, 64, 4, 3), 128: TileConfig(64, 64, 4, 3), 256: TileConfig(64, 32, 8, 2)},
    "prefill": {64: TileConfig(128, 64, 4, 3), 128: TileConfig(128, 64, 4, 3), 256: TileConfig(64, 64, 8, 2)},
}
# float32 (the parity tests' dtype, never a fast one): smaller prefill and mixed tiles. Compiling the 128-row,
# 3-stage fp32 kernel at head_dim 128 for sm90 took 37 s (ptxas, on a 2-core CPU with `triton.compile`); this
# tile took 4.7 s. A fresh machine compiles each variant once, and the model tests ran out of time on it.
FP32_TILE_CONFIGS: dict[int, TileConfig] = {64: TileConfig(32, 64, 4, 2), 128: TileConfig(32, 64, 4, 2),
                                            256: TileConfig(32, 32, 4, 2)}  # fmt: skip


def batch_kind(num_tokens: int, num_seqs: int, max_query_len: int) -> str:
    """The row of TILE_CONFIGS: decode (one query each), mixed (mostly short queries: under a quarter of
    the padded tokens are real), or prefill."""
    if max_query_len <= 1:
        return "decode"
    return "mixed" if 4 * num_tokens < num_seqs * max_query_len else "prefill"


def tile_config(
    head_dim: int, num_tokens: int, num_seqs: int, max_query_len: int, dtype: torch.dtype = torch.bfloat16
) -> TileConfig:
    kind = batch_kind(num_tokens, num_seqs, max_query_len)
    configs = FP32_TILE_CONFIGS if dtype == torch.float32 and kind != "decode" else TILE_CONFIGS[kind]
    return configs[64 if head_dim <= 64 else 128 if head_dim <= 128 else 256]


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_tiles: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many programs share one tile's keys: enough to give every SM TARGET_PROGRAMS_PER_SM programs."""
    programs = num_tiles * num_kv_heads
    wanted = -(-TARGET_PROGRAMS_PER_SM * num_sms // programs)
    return max(1, min(wanted, -(-max_seq_len // MIN_KEYS_PER_SPLIT), MAX_SPLITS))


@dataclass(frozen=True)
class LaunchPlan:
    config: TileConfig
    block_m: int  # config.block_m, raised to hold one KV head's query heads
    block_q: int  # query tokens per tile
    num_tiles: int  # grid size over query tiles: an upper bound, spare tiles exit at once
    num_splits: int
    decode: bool  # one query token per sequence: tile i is sequence i, no search


def plan_launch(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    metadata: PagedMetadata,
    device: torch.device,
    num_splits: int | None = None,
    config: TileConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> LaunchPlan:
    """Tile sizes and grid of a batch, from host integers only (so a captured graph stays valid)."""
    num_seqs = metadata.seq_lens.shape[0]
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    config = config or tile_config(head_dim, num_tokens, num_seqs, metadata.max_query_len, dtype)
    if not config.dot and metadata.max_query_len > 1:
        raise ValueError("a tile config without tl.dot serves decode batches (one query token each) only")
    block_m = max(config.block_m, group_pad) if config.dot else group_pad
    block_q = block_m // group_pad
    if num_splits is None:
        useful_tiles = num_seqs + (num_tokens - num_seqs) // block_q
        num_splits = choose_num_splits(useful_tiles, num_kv_heads, metadata.max_seq_len, _num_sms(device))
    if metadata.max_query_len <= 1:
        return LaunchPlan(config, block_m, block_q, num_seqs, num_splits, decode=True)
    # Sequence i owns tiles query_start_loc[i] // block_q + i onwards: at most this many in all.
    return LaunchPlan(config, block_m, block_q, num_tokens // block_q + num_seqs, num_splits, decode=False)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    metadata: PagedMetadata,
    scale: float,
    *,
    num_splits: int | None = None,
    config: TileConfig | None = None,
    shared_offsets: bool = True,
) -> torch.Tensor:
    """Attention of every query token ([num_tokens, num_heads, head_dim]) over its sequence's cached K/V
    ([num_blocks, block_size, num_kv_heads, head_dim]), as `paged_attention_ref` computes it.

    `num_splits` forces the flash-decoding split count, `config` the tile sizes (for tests and tuning).
    K and V caches laid out alike (the engine's) share one offset tensor, K read as rows and transposed for
    q k^T: half the address arithmetic (prefill 8 x 2048 on an H100: 796 vs 874 us); `shared_offsets=False`
    (or differently strided caches) reads K as columns with offsets of its own.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"query head_dim {head_dim} and caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} differ")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    if not query.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"query {query.dtype} and KV cache {k_cache.dtype}/{v_cache.dtype} must have one dtype")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache must be contiguous in head_dim")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    query = query if query.stride(-1) == 1 else query.contiguous()
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    num_seqs = metadata.seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    plan = plan_launch(
        num_tokens, num_heads, num_kv_heads, head_dim, metadata, query.device, num_splits, config, query.dtype
    )
    num_splits = plan.num_splits
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    pdl = pdl_options(query.device)  # both launches
    if num_splits == 1:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=out.device)
        part_lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=out.device)
    block_tables = metadata.block_tables
    _paged_attention_kernel[(plan.num_tiles, num_kv_heads, num_splits)](
        out, part_out, part_lse, query, k_cache, v_cache,
        block_tables, metadata.query_start_loc, metadata.seq_lens,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        num_seqs, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), num_tokens * num_heads * head_dim,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m,
        BLOCK_N=plan.config.block_n,
        BLOCK_SIZE=block_size, SPLIT=num_splits > 1, DECODE=plan.decode,
        # triton 3.9's interpreter returns garbage from tl.dot on bf16 operands: there, dot in fp32.
        UPCAST_DOT=interpret and query.dtype == torch.bfloat16, USE_DOT=plan.config.dot,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        SHARED_OFFSETS=shared_offsets and k_cache.stride()[:3] == v_cache.stride()[:3],
        OFFSETS_32=not plan.decode and max(_span(k_cache), _span(v_cache)) <= MAX_INT32_SPAN,
        num_warps=plan.config.num_warps, num_stages=plan.config.num_stages, **pdl,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_lse, num_splits, out.stride(0), out.stride(1), num_tokens * num_heads * head_dim,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            SPLITS_PAD=triton.next_power_of_2(num_splits), **pdl,
        )  # fmt: skip
    return out


def _span(t: torch.Tensor) -> int:
    """How many elements from a tensor's first to its last, strides included."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


@triton.jit
def _find_sequence(query_start_loc, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence a tile belongs to: the last i with query_start_loc[i] // BLOCK_Q + i <= tile."""
    lo: tl.int32 = 0  # annotated: the compiler carries it through the loop as an int32 tensor
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q, start, kv_end, row_pos, table, k_head, v_head, dims, dim_ok,
    scale_log2, stride_kb, stride_ks, stride_vb, stride_vs,
    MASKED: tl.constexpr, DIM_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, SHARED_OFFSETS: tl.constexpr, OFFSETS_32: tl.constexpr,
    USE_DOT: tl.constexpr,
):  # fmt: skip
    """One step of the online softmax over keys start .. start + BLOCK_N (masked: past kv_end or the diagonal)."""
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < kv_end
    if MASKED:
        block = tl.load(table + keys // BLOCK_SIZE, mask=key_ok, other=0)
    else:
        block = tl.load(table + keys // BLOCK_SIZE)
    if OFFSETS_32:
        block = block.to(tl.int32)
    else:
        block = block.to(tl.int64)
    slot = keys % BLOCK_SIZE
    kv_off = block[:, None] * stride_vb + slot[:, None] * stride_vs + dims[None, :]  # [BLOCK_N, D]
    if SHARED_OFFSETS:  # K and V laid out alike: one offset tensor addresses both, K read as rows too
        k_ptrs = k_head + kv_off
    else:
        k_ptrs = k_head + block[None, :] * stride_kb + slot[None, :] * stride_ks + dims[:, None]  # [D, BLOCK_N]
    v_ptrs = v_head + kv_off
    k_mask = key_ok[:, None] & dim_ok[None, :] if SHARED_OFFSETS else key_ok[None, :] & dim_ok[:, None]
    k_dim_mask = dim_ok[None, :] if SHARED_OFFSETS else dim_ok[:, None]
    if MASKED:
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
    elif DIM_MASK:
        k = tl.load(k_ptrs, mask=k_dim_mask, other=0.0)
        v = tl.load(v_ptrs, mask=dim_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if USE_DOT:
        if SHARED_OFFSETS:
            k = tl.trans(k)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
    else:  # [rows, 1, D] * [1, BLOCK_N, D], summed over D: K as rows
        if not SHARED_OFFSETS:
            k = tl.trans(k)
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale_log2
    if MASKED:
        s = tl.where(key_ok[None, :] & (keys[None, :] <= row_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep exp2 away from NaN
    else:
        m_safe = m_new  # every row sees every key of an unmasked tile: the max is finite
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)  # P V in the cache dtype, accumulated in fp32, as flash attention does
    if USE_DOT:
        if UPCAST_DOT:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    else:  # [rows, BLOCK_N, 1] * [1, BLOCK_N, D], summed over the keys
        acc = acc * alpha[:, None] + tl.sum(p.to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], 1)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["num_seqs", "num_splits", "stride_bt", "stride_part"])
def _paged_attention_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2, num_seqs, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_part,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SHARED_OFFSETS: tl.constexpr, OFFSETS_32: tl.constexpr, DECODE: tl.constexpr, USE_DOT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the last (longest) query tiles first: a shorter tail
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query each: tile i is sequence i (a search's chain of dependent loads costs ~2 us)
        seq = tile
    else:
        seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if DECODE:
        first_q = 0
    else:
        first_q = (tile - q_start // BLOCK_Q - seq) * BLOCK_Q  # the tile's first query, counted in its sequence
    if first_q >= q_len:
        return  # a spare tile: the grid is an upper bound
    context = tl.load(seq_lens_ptr + seq) - q_len  # keys cached before this step's first query

    # Row r of the tile is query token first_q + r // GROUP_PAD, head kv_head * GROUP + r % GROUP_PAD.
    rows = tl.arange(0, BLOCK_M)
    q_idx = first_q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    row_pos = context + q_idx
    token = (q_start + q_idx).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # This split's keys: an equal share (in whole key tiles) of those the tile's last query sees.
    kv_len = context + tl.minimum(q_len, first_q + BLOCK_Q)
    chunk = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    kv_start = split * chunk
    kv_end = tl.minimum(kv_start + chunk, kv_len)
    # Whole key tiles that every row sees (before the first row's position) need no mask.
    all_see = tl.minimum(context + first_q + 1, kv_end)
    unmasked_end = kv_start + tl.maximum(all_see - kv_start, 0) // BLOCK_N * BLOCK_N

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for start in range(kv_start, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q, start, kv_end, row_pos, table, k_head, v_head, dims, dim_ok,
            scale_log2, stride_kb, stride_ks, stride_vb, stride_vs,
            False, HEAD_DIM != HEAD_DIM_PAD, BLOCK_N, BLOCK_SIZE, UPCAST_DOT, DOT_PRECISION, SHARED_OFFSETS, OFFSETS_32,
            USE_DOT,
        )  # fmt: skip
    for start in range(unmasked_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_keys(
            acc, l_i, m_i, q, start, kv_end, row_pos, table, k_head, v_head, dims, dim_ok,
            scale_log2, stride_kb, stride_ks, stride_vb, stride_vs,
            True, HEAD_DIM != HEAD_DIM_PAD, BLOCK_N, BLOCK_SIZE, UPCAST_DOT, DOT_PRECISION, SHARED_OFFSETS, OFFSETS_32,
            USE_DOT,
        )  # fmt: skip

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key seen (seq_len 0, empty split): zeros
    o_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    if SPLIT:
        # Partials are [split, token, head, dim] (lse: [split, token, head]), contiguous.
        heads = tl.num_programs(1) * GROUP
        row = token * heads + head  # (token, head) in the partials
        part = split.to(tl.int64) * stride_part + row * HEAD_DIM
        tl.store(part_out_ptr + part[:, None] + dims[None, :], acc, mask=q_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + split.to(tl.int64) * (stride_part // HEAD_DIM) + row, lse, mask=row_ok)
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["num_splits", "stride_part"])
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, num_splits, stride_ot, stride_oh, stride_part,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """The split merge, one program per (token, query head): out = sum_s w_s o_s / sum_s w_s with
    w_s = exp2(lse_s - max lse), every split's partial loaded at once (one memory round trip, not one per
    split). Loads go through L2 only (.cg): another kernel wrote them, and under dependent launches this one
    started before that kernel had ended."""
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token * tl.num_programs(1) + head  # (token, head) in the partials: [split, token, head(, dim)]
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    split_ok = splits < num_splits
    dim_ok = dims < HEAD_DIM
    lse_ptrs = part_lse_ptr + splits.to(tl.int64) * (stride_part // HEAD_DIM) + row
    lse = tl.load(lse_ptrs, mask=split_ok, other=float("-inf"), cache_modifier=".cg")
    part_ptrs = part_out_ptr + splits.to(tl.int64)[:, None] * stride_part + row * HEAD_DIM + dims[None, :]
    part = tl.load(part_ptrs, mask=split_ok[:, None] & dim_ok[None, :], other=0.0, cache_modifier=".cg")
    top = tl.max(lse, 0)
    weight = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # every split empty: all 0
    total = tl.sum(weight, 0)
    merged = tl.sum(part * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, merged.to(out_ptr.dtype.element_ty), mask=dim_ok)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the new tokens' K and V ([num_tokens, num_kv_heads, head_dim]) into their cache slots, one launch.

    A negative slot skips its token (a padded row of a CUDA-graph batch).
    """
    check_kv_store(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache must be contiguous in head_dim")
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1], **pdl_options(key.device),
    )  # fmt: skip


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims, k, mask=mask)
    tl.store(v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims, v, mask=mask)
