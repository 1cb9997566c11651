"""The experts of a MoE layer as two grouped GEMMs in Triton: one launch serves every expert at once.

The align step (kernels/moe.py has it in torch; here it is two small kernels) sorts the (token, k) pairs by
expert and pads each expert's group to BLOCK_M rows, so every tile of BLOCK_M rows belongs to one expert.
E=4, top-2 of T=5 tokens, BLOCK_M=4 (pair = t*2 + j, "-" is padding, 10 = T*k):

    sorted_ids    [ 0  3  6  - | 1  8  -  - | 2  4  5  9 | 7  -  -  - | ... ]   rows past the last tile unused
    tile_experts  [     0      |     1      |     2      |     3      | ... ]   (expert 2 got 4 pairs, etc.)
    tile_starts   [ 0            4            8            12           16 ]   tile t: rows starts[t]..starts[t+1]

With short tiles (`MoeConfig.short_tiles`), groups are padded to BLOCK_M / 2 only and a group's last tile may
be that short; its programs run a half-height tile. At 256 +- 16 rows per expert (Qwen3-30B-A3B at 4096
tokens, bench/kernels/moe.py's routing) that cuts the padded rows from 17% of the rows to 9%:

    e0: 250 rows -> [128 | 128]          e1: 262 rows -> [128 | 128 | 64]   (not [128 | 128 | 128])

Each program takes one (tile, BLOCK_N columns) pair: it reads its tile's rows of activations and a
BLOCK_N-wide slab of its expert's weights, and writes BLOCK_M x BLOCK_N outputs. Tiles of the same expert
sit next to each other, and programs are ordered GROUP_M tiles at a time, so an expert's weights stream
from HBM once and are reused from L2 by its other tiles.

    gate_up: rows x[pair // k]  @ w13[e]^T  -> SiLU(gate) * up in registers -> h [padded rows, I]
    down:    rows h[row]        @ w2[e]^T   -> times the pair's routing weight -> out[pair] [T*k, H]
    combine: out.view(T, k, H).sum(1)  (one small kernel, summed in float32)

On Hopper, a tile may bring its operands with TMA (`GemmTile.tma`): the weight slab, and down's rows of h
(contiguous in sorted order), each one box copy per K step. gate_up's rows of x are gathered by token, so
they stay plain loads. `GemmTile.paired` goes one step further for gate_up: one box of w13 viewed
[E, 2, I, H] holds a slab's gate rows and its up rows, and one dot twice as wide computes both halves
(compiled for sm90 it is one m64n256 wgmma per K step in place of two m64n128). `GemmTile.persistent`
launches one program per SM, each looping over (tile, slab) items, so one tile's loads overlap the last
one's epilogue.

The tile count is not read on the host: the grid covers the bound T*k + min(E, T*k)*(BLOCK_M-1) rows, and
programs past the count return at once (persistent ones loop up to it). So a MoE layer never waits for the
device, and CUDA graphs can capture it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from miniengine.kernels.moe import Tiles, max_tiles, tile_granule
from miniengine.kernels.triton_fused_ops import is_hopper_or_later, pdl_options, wait_for_inputs

# triton 3.9's interpreter returns wrong results for tl.dot on bf16 operands (fp16 and fp32 are right), so
# in interpreter mode bf16 tiles are upcast to fp32 before the dot; compiled kernels never take that path.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemmTile:
    """Tile of one of the two GEMMs: columns and reduction chunk per program, warps, pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False  # weight slabs (and down's rows of h) through the TMA unit: Hopper and later
    paired: bool = False  # gate_up with TMA: gate and up slabs in one box and one dot, 2 * block_n wide
    persistent: bool = False  # one program per SM looping over the tiles (the next tile's loads overlap)


@dataclass(frozen=True)
class MoeConfig:
    """BLOCK_M is shared: both GEMMs walk the same sorted, padded rows. GROUP_M tiles share a weight slab."""

    block_m: int
    gate_up: GemmTile
    down: GemmTile
    group_m: int = 8
    short_tiles: bool = False  # a group's last tile may be block_m / 2 rows, run at that height

    def __post_init__(self):
        if self.short_tiles and self.block_m < 32:
            raise ValueError(f"short tiles are block_m / 2 >= 16 rows (tl.dot's least); block_m is {self.block_m}")

    @property
    def granule(self) -> int:
        """Each expert's group of rows is padded to a multiple of this."""
        return self.block_m // 2 if self.short_tiles else self.block_m


# Chosen by how many rows each expert gets on average, T*k/E (what decides the GEMM's shape):
#  - decode (<= 8 rows per expert): memory-bound on the weights of the experts hit. BLOCK_M=16, the smallest
#    tl.dot takes; narrow BLOCK_N and long BLOCK_K so many programs each stream a deep slab of weights.
#  - middle (<= 64): still memory-bound (Qwen3-30B at 256 tokens: 16 rows per expert, 1.2 GB of weights).
#    BLOCK_M a little above the mean keeps most experts in one or two tiles, read once.
#  - prefill (more): compute-bound. 128-row tiles with 8 warps feed the tensor cores, their operands
#    brought by TMA; down is 256 columns wide, gate_up's gate and up slabs paired in one 256-wide dot, and
#    both persistent. On an H100 (2026-12-07 sweeps, each pair from one run): Mixtral-8x7B at 4096 tokens
#    (1024 rows per expert) down 1,410 us against 1,651 for the best 128-wide tile; Qwen3-30B at 4096
#    tokens (256 rows per expert) down 258 against 276. On an H200 (one sweep, Qwen3-30B at 4096 tokens):
#    gate_up paired and persistent 350 us, paired 406, two 128-wide dots 405 (with short tiles); down
#    persistent 224 against 230. Short tiles (half-height group ends: 17% -> 9% padded rows there) help
#    the plain grid (gate_up 377 against 406) but keep the persistent loop from being flattened (395), so
#    they are off: 669 us in all against 702 with them. An H100 sweep of the same shape put short tiles with
#    plain paired gate_up first (742 us against 764 for this row, within the sweeps' run-to-run spread), and
#    64-row tiles (9% padding, no branch) last: 991 us, the 64-row wgmma feeding the tensor cores too slowly.
#    Short tiles walked as a second item list after the full ones would keep the loop flattened, but their
#    experts' weight slabs have left L2 by then: reading them again (~400 MB for gate_up) costs more than the
#    padding they save.
# The gate_up GEMM keeps two accumulators (gate and up), so its BLOCK_N counts half the columns it computes.
# `python bench/kernels/moe.py --sweep` times the alternatives per shape on the GPU.
_TABLE: list[tuple[float, MoeConfig]] = [
    (8, MoeConfig(16, GemmTile(64, 128, 4, 4), GemmTile(64, 128, 4, 4))),
    (24, MoeConfig(32, GemmTile(64, 128, 4, 4), GemmTile(64, 128, 4, 4))),
    (64, MoeConfig(64, GemmTile(128, 64, 8, 4, tma=True), GemmTile(128, 64, 8, 3, tma=True))),
    (
        float("inf"),
        MoeConfig(128, GemmTile(128, 64, 8, 4, True, True, True), GemmTile(256, 64, 8, 3, True, persistent=True)),
    ),
]


@functools.lru_cache(maxsize=1024)  # on every MoE layer's launch path: three dataclass copies cost ~15 us
def pick_config(num_tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int) -> MoeConfig:
    """The tile configuration for this shape, from the table above (keyed on rows per expert)."""
    rows_per_expert = num_tokens * top_k / num_experts
    config = next(config for limit, config in _TABLE if rows_per_expert <= limit)
    # Tiles wider than the matrix only add masked work (small test shapes).
    return replace(
        config, gate_up=_fit(config.gate_up, intermediate, hidden), down=_fit(config.down, hidden, intermediate)
    )


def _fit(tile: GemmTile, n: int, k: int) -> GemmTile:
    def cap(block: int, size: int) -> int:
        return max(16, min(block, _next_pow2(size)))

    return replace(tile, block_n=cap(tile.block_n, n), block_k=cap(tile.block_k, k))


def _halve(tile: GemmTile) -> GemmTile:
    return replace(tile, block_k=max(16, tile.block_k // 2), num_stages=min(tile.num_stages, 2))


# Sizes that change with the batch are not specialised on (divisible by 16 or not): no recompiles mid-serving.
@triton.jit(do_not_specialize=["num_pairs", "num_tiles_m"])
def _grouped_gemm(
    a_ptr,  # [rows, K]: x (gate_up, rows gathered by token) or h (down, rows in sorted order)
    a_desc,  # down with TMA: a tensor descriptor over h, BLOCK_M x BLOCK_K boxes (else a_ptr again)
    b_ptr,  # [E, N or 2N, K]: w13 or w2
    c_ptr,  # [padded rows, N] (gate_up) or [T*k, N] (down)
    weights_ptr,  # [T*k] routing weights (down only)
    sorted_ids_ptr,
    tile_experts_ptr,
    tile_starts_ptr,
    num_tiles_ptr,
    num_pairs,  # T*k: the pair index that marks padding
    N,
    K,
    num_tiles_m,  # the host's bound on tiles (the grid); num_tiles_ptr holds the count in use
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    TOP_K: tl.constexpr,
    GATE_UP: tl.constexpr,  # True: A rows are tokens (pair // TOP_K), two slabs of B, SiLU(gate) * up, C by row
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs: full fp32 products, not tf32 (fp32 is for parity)
    PDL: tl.constexpr,  # dependent launch (triton_fused_ops.py): launched while the kernel before ends
    TMA: tl.constexpr,  # b_ptr is a tensor descriptor over [E * rows, K] (and a_desc over h, for down)
    PAIRED: tl.constexpr = False,  # gate_up with TMA: b_ptr is a descriptor over w13 viewed [E, 2, N, K]
    SHORT: tl.constexpr = False,  # tiles of BLOCK_M / 2 rows may end a group: run them at that height
    PERSISTENT: tl.constexpr = False,  # a grid of one program per SM, each looping over work items
):
    wait_for_inputs(PDL)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    if PERSISTENT:  # one program per SM walks the (tile, slab) pairs; the loop nest is pipelined as one loop
        count = tl.load(num_tiles_ptr)
        for work in tl.range(tl.program_id(0), count * num_tiles_n, tl.num_programs(0), flatten=not SHORT):
            pid_m, pid_n = _tile_coords(work, count, num_tiles_n, GROUP_M)
            _one_tile(a_ptr, a_desc, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, tile_experts_ptr, tile_starts_ptr,
                      pid_m, pid_n, num_pairs, N, K, stride_am, stride_be, stride_bn, stride_cm, TOP_K, GATE_UP,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION, TMA, PAIRED, SHORT)  # fmt: skip
    else:  # a program per (tile, slab) of the host's bound; those past the count return at once
        pid_m, pid_n = _tile_coords(tl.program_id(0), num_tiles_m, num_tiles_n, GROUP_M)
        if pid_m < tl.load(num_tiles_ptr):
            _one_tile(a_ptr, a_desc, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, tile_experts_ptr, tile_starts_ptr,
                      pid_m, pid_n, num_pairs, N, K, stride_am, stride_be, stride_bn, stride_cm, TOP_K, GATE_UP,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, PRECISION, TMA, PAIRED, SHORT)  # fmt: skip


@triton.jit
def _tile_coords(work, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """Work item -> (tile, slab). Items run GROUP_M tiles down one column of slabs before moving right:
    neighbouring tiles (mostly the same expert) share the slab in L2."""
    per_group = GROUP_M * num_tiles_n
    first_m = (work // per_group) * GROUP_M
    group_size = tl.minimum(num_tiles_m - first_m, GROUP_M)
    return first_m + (work % per_group) % group_size, (work % per_group) // group_size


@triton.jit
def _one_tile(
    a_ptr, a_desc, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, tile_experts_ptr, tile_starts_ptr, pid_m, pid_n,
    num_pairs, N, K, stride_am, stride_be, stride_bn, stride_cm, TOP_K: tl.constexpr, GATE_UP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, PAIRED: tl.constexpr, SHORT: tl.constexpr,
):  # fmt: skip
    expert = tl.load(tile_experts_ptr + pid_m).to(tl.int64)
    row0 = tl.load(tile_starts_ptr + pid_m)
    if SHORT:  # a group's last tile may be BLOCK_M / 2 rows: run it at that height (down loads its h rows)
        short = tl.load(tile_starts_ptr + pid_m + 1) - row0 <= BLOCK_M // 2
    else:
        short = False
    if short:
        _tile(a_ptr, a_desc, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert, row0, pid_n, num_pairs, N, K,
              stride_am, stride_be, stride_bn, stride_cm, TOP_K, GATE_UP, BLOCK_M // 2, BLOCK_N, BLOCK_K,
              EVEN_K, UPCAST, PRECISION, TMA, False, PAIRED)  # fmt: skip
    else:
        _tile(a_ptr, a_desc, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert, row0, pid_n, num_pairs, N, K,
              stride_am, stride_be, stride_bn, stride_cm, TOP_K, GATE_UP, BLOCK_M, BLOCK_N, BLOCK_K,
              EVEN_K, UPCAST, PRECISION, TMA, TMA and not GATE_UP, PAIRED)  # fmt: skip


@triton.jit
def _tile(
    a_ptr, a_desc, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert, row0, pid_n, num_pairs, N, K,
    stride_am, stride_be, stride_bn, stride_cm,
    TOP_K: tl.constexpr, GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, TMA_A: tl.constexpr, PAIRED: tl.constexpr,
):  # fmt: skip
    """One program's BLOCK_M x BLOCK_N outputs: the rows from row0 (all one expert's), one slab of its weights."""
    rows = row0 + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows)
    real = pairs < num_pairs
    if GATE_UP:
        a_rows = pairs // TOP_K  # the token of each pair: x is not copied per pair, its rows are gathered
    else:
        a_rows = rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if not TMA_A:  # gate_up gathers its rows of x: plain loads
        a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    if not TMA:
        b_ptrs = b_ptr + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    n_ok = offs_n < N
    if TMA and not PAIRED:
        # The slab's first row in the [E * rows, K] view. Rows past the expert's N read the next rows (or
        # zeros past the end): they only reach output columns >= N, which are not stored. K's tail reads zeros.
        b_row = (expert * (2 * N if GATE_UP else N) + pid_n * BLOCK_N).to(tl.int32)

    if PAIRED:
        acc_pair = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)  # gate then up columns, one dot
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # gate_up only: the up half, rows N + n of w13
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = (offs_k < K - k * BLOCK_K) | EVEN_K  # a mask along K, where K is contiguous, costs vector loads
        if TMA_A:
            a = a_desc.load([row0, k * BLOCK_K])  # down's rows of h are contiguous: one TMA box
        else:
            a = tl.load(a_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
        if PAIRED:
            # one box of w13 viewed [E, 2, N, K]: the slab's gate rows and its up rows, 2 * BLOCK_N rows
            b_pair = b_ptr.load([expert.to(tl.int32), 0, pid_n * BLOCK_N, k * BLOCK_K])
            b_pair = b_pair.reshape(2 * BLOCK_N, BLOCK_K).T
            if UPCAST:
                a, b_pair = a.to(tl.float32), b_pair.to(tl.float32)
            acc_pair = tl.dot(a, b_pair, acc_pair, input_precision=PRECISION)
        else:
            if TMA:
                b = b_ptr.load([b_row, k * BLOCK_K]).T
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GATE_UP:
                if TMA:
                    b_up = b_ptr.load([b_row + N, k * BLOCK_K]).T
                else:
                    b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    b_up = b_up.to(tl.float32)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        if not TMA_A:
            a_ptrs += BLOCK_K
        if not TMA:
            b_ptrs += BLOCK_K

    if PAIRED:  # columns [gate | up] -> [BLOCK_M, BLOCK_N, 2] -> the two halves
        acc, acc_up = acc_pair.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
    if GATE_UP:
        out = acc * tl.sigmoid(acc) * acc_up  # SiLU(gate) * up, in float32
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=n_ok[None, :])
    else:
        out = acc * tl.load(weights_ptr + pairs, mask=real, other=0.0)[:, None]
        c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=real[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_rows"])
def _count_experts(ids_ptr, counts_ptr, sorted_ids_ptr, num_pairs, num_rows, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Pairs per expert (atomic adds); every row of sorted_ids starts as padding (num_pairs)."""
    wait_for_inputs(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(sorted_ids_ptr + offs, tl.full((BLOCK,), num_pairs, tl.int32), mask=offs < num_rows)
    ok = offs < num_pairs
    experts = tl.load(ids_ptr + offs, mask=ok, other=0)
    tl.atomic_add(counts_ptr + experts, tl.full((BLOCK,), 1, tl.int32), mask=ok)


@triton.jit(do_not_specialize=["num_pairs", "num_tiles"])
def _place_pairs(
    ids_ptr,
    counts_ptr,
    cursors_ptr,
    sorted_ids_ptr,
    tile_experts_ptr,
    tile_starts_ptr,
    tile_count_ptr,
    num_pairs,
    num_experts,
    num_tiles,
    BLOCK_M: tl.constexpr,
    GRANULE: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    """Each program recomputes the (tiny) prefix sum of padded group sizes, then writes its pairs at their
    expert's start plus a slot taken with an atomic add. Program 0 also writes the tile list."""
    wait_for_inputs(PDL)
    e_offs = tl.arange(0, E_PAD)
    e_ok = e_offs < num_experts
    counts = tl.load(counts_ptr + e_offs, mask=e_ok, other=0)
    padded = (counts + GRANULE - 1) // GRANULE * GRANULE
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    if tl.program_id(0) == 0:
        tiles = (padded + BLOCK_M - 1) // BLOCK_M  # an expert's tiles: full ones, the last maybe shorter
        tile_ends = tl.cumsum(tiles, 0)
        first_tile = tile_ends - tiles
        total_tiles, total_rows = tl.sum(tiles, 0), tl.sum(padded, 0)
        tl.store(tile_count_ptr, total_tiles)
        tl.store(tile_starts_ptr + num_tiles, total_rows)
        for t0 in range(0, num_tiles, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            expert = tl.sum(((tile_ends[None, :] <= t[:, None]) & e_ok[None, :]).to(tl.int32), 1)
            mine = e_offs[None, :] == expert[:, None]  # gathers starts[expert], first_tile[expert]
            row = tl.sum(tl.where(mine, starts[None, :] + (t[:, None] - first_tile[None, :]) * BLOCK_M, 0), 1)
            tl.store(tile_experts_ptr + t, expert, mask=t < num_tiles)
            tl.store(tile_starts_ptr + t, tl.where(t < total_tiles, row, total_rows), mask=t < num_tiles)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < num_pairs
    experts = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
    start = tl.sum(tl.where(e_offs[None, :] == experts[:, None], starts[None, :], 0), 1)  # starts[experts]
    slot = tl.atomic_add(cursors_ptr + experts, tl.full((BLOCK,), 1, tl.int32), mask=ok)
    tl.store(sorted_ids_ptr + start + slot, offs, mask=ok)


@triton.jit
def _combine(out_ptr, y_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """out[t] = sum over j of y[t * TOP_K + j], in float32: each program sums BLOCK_H columns of one token."""
    wait_for_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (token * TOP_K + j) * H + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def triton_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, granule: int | None = None) -> Tiles:
    """`kernels.moe.align` in two small kernels (the torch version takes ~25 launches, too many for decode).

    Same outputs, except that within one expert's group the pairs come in the order the atomics hand out
    slots (any order gives the same results: each row of a GEMM is computed on its own).
    """
    granule = tile_granule(block_m, granule)
    device = topk_ids.device
    ids = topk_ids.flatten()
    num_pairs = ids.numel()
    num_tiles = max_tiles(num_pairs, num_experts, block_m)
    e_pad = _next_pow2(num_experts)
    scratch = torch.zeros(2, e_pad, dtype=torch.int32, device=device)  # counts, then cursors
    sorted_ids = torch.empty(num_tiles * block_m, dtype=torch.int32, device=device)
    tile_experts = torch.empty(num_tiles, dtype=torch.int32, device=device)
    tile_starts = torch.empty(num_tiles + 1, dtype=torch.int32, device=device)
    tile_count = torch.empty(1, dtype=torch.int32, device=device)
    pdl = pdl_options(device)
    _count_experts[(_cdiv(sorted_ids.numel(), 1024),)](
        ids, scratch[0], sorted_ids, num_pairs, sorted_ids.numel(), BLOCK=1024, **pdl
    )
    block = max(16, 8192 // e_pad)  # the [block, E_PAD] gather of starts stays small
    _place_pairs[(_cdiv(num_pairs, block),)](
        ids, scratch[0], scratch[1], sorted_ids, tile_experts, tile_starts, tile_count, num_pairs, num_experts,
        num_tiles, BLOCK_M=block_m, GRANULE=granule, E_PAD=e_pad, BLOCK=block, BLOCK_T=max(16, 4096 // e_pad), **pdl,
    )  # fmt: skip
    return Tiles(sorted_ids, tile_experts, tile_starts, tile_count)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
) -> torch.Tensor:
    """x [T, H] through each token's top-k experts (w13 [E, 2I, H], w2 [E, H, I]) -> [T, H]; see the top."""
    _check_inputs(x, w13, w2, topk_weights, topk_ids)
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    intermediate = two_i // 2
    top_k = topk_ids.shape[1]
    if w13.shape != (num_experts, 2 * intermediate, hidden) or w2.shape != (num_experts, hidden, intermediate):
        raise ValueError(
            f"expert weights w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)}"
        )
    config = config or pick_config(num_tokens, hidden, intermediate, num_experts, top_k)
    if x.element_size() == 4:  # fp32 (parity runs): tiles of twice the bytes; halve K and the pipeline to fit
        config = replace(config, gate_up=_halve(config.gate_up), down=_halve(config.down))
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    weights = topk_weights.flatten().float().contiguous()
    tiles = triton_align(topk_ids, num_experts, config.block_m, config.granule)
    h = torch.empty(tiles.sorted_ids.numel(), intermediate, dtype=x.dtype, device=x.device)
    _launch_gemm(x, w13, h, weights, tiles, top_k, True, config.gate_up, config)
    out = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _launch_gemm(h, w2, out, weights, tiles, top_k, False, config.down, config)
    return combine(out, top_k)


def _check_inputs(x, w13, w2, topk_weights, topk_ids) -> None:
    """Types and ranks, before any kernel sees them (a mismatch inside a kernel is a compiler error)."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        dims = f"{x.dim()}, {w13.dim()}, {w2.dim()}"
        raise ValueError(f"fused_moe takes x [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {dims} dims")
    if not (x.dtype == w13.dtype == w2.dtype) or not x.is_floating_point():
        raise TypeError(f"x, w13 and w2 must share one float dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids and topk_weights must both be [T, k] with T = {x.shape[0]}; "
            f"got {tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        )
    if len({t.device for t in (x, w13, w2, topk_weights, topk_ids)}) != 1:
        raise ValueError("fused_moe's tensors must all be on one device")


def combine(y: torch.Tensor, top_k: int) -> torch.Tensor:
    """y [T*k, H] (each pair's weighted output) -> [T, H], the sum over k (`y.view(T, k, H).sum(1)`, one pass)."""
    hidden = y.shape[1]
    out = torch.empty(y.shape[0] // top_k, hidden, dtype=y.dtype, device=y.device)
    block_h = min(1024, _next_pow2(hidden))
    _combine[(out.shape[0], _cdiv(hidden, block_h))](
        out, y, hidden, TOP_K=top_k, BLOCK_H=block_h, num_warps=4, **pdl_options(y.device)
    )
    return out


def _launch_gemm(a, b, c, weights, tiles: Tiles, top_k: int, gate_up: bool, tile: GemmTile, config: MoeConfig) -> None:
    n, k = c.shape[1], a.shape[1]
    grid = (tiles.experts.numel() * _cdiv(n, tile.block_n),)
    if tile.persistent:
        grid = (min(grid[0], _num_sms(c.device)),)
    a_desc, b_arg, tma = a, b, tile.tma and uses_tma(a, k)
    paired = tma and gate_up and tile.paired
    if paired:
        b_arg = TensorDescriptor.from_tensor(b.view(b.shape[0], 2, n, k), [1, 2, tile.block_n, tile.block_k])
    elif tma:  # descriptors go by value: a CUDA graph captures them with the launch
        b_arg = TensorDescriptor.from_tensor(b.view(-1, k), [tile.block_n, tile.block_k])
    if tma and not gate_up:
        a_desc = TensorDescriptor.from_tensor(a, [config.block_m, tile.block_k])
    _grouped_gemm[grid](
        a, a_desc, b_arg, c, weights, tiles.sorted_ids, tiles.experts, tiles.starts, tiles.count, weights.numel(),
        n, k, tiles.experts.numel(), a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        TOP_K=top_k, GATE_UP=gate_up, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=config.group_m, EVEN_K=k % tile.block_k == 0, UPCAST=_INTERPRET and a.dtype == torch.bfloat16,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", TMA=tma, PAIRED=paired,
        SHORT=config.granule < config.block_m, PERSISTENT=tile.persistent, num_warps=tile.num_warps,
        num_stages=tile.num_stages, **pdl_options(c.device),
    )  # fmt: skip


# Host-side arithmetic on the launch path: triton.cdiv and triton.next_power_of_2 cost ~1.7 us a call each.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each looping over several work items
    return torch.cuda.get_device_properties(device).multi_processor_count


def uses_tma(a: torch.Tensor, k: int) -> bool:
    """TMA needs a Hopper-class GPU (or the interpreter) and rows whose byte length is a multiple of 16."""
    if k * a.element_size() % 16:
        return False
    return _INTERPRET or (a.is_cuda and is_hopper_or_later(a.device.index))
