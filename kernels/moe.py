"""Mixture of experts in plain torch: routing, the sort/align step, and the experts as a loop (the reference).

A MoE layer sends each token to `top_k` of its `E` experts (small gated MLPs) and sums their outputs,
weighted by the router. Three steps, each a function here:

    route(router_logits, top_k, ...)    -> topk_weights [T, k] fp32, topk_ids [T, k]   which experts, how much
    align(topk_ids, E, block_m)         -> the (token, k) pairs grouped by expert, each group padded and cut
                                           into GEMM tiles of block_m rows (what the Triton kernel iterates over)
    fused_moe(x, w13, w2, w, ids)       -> [T, hidden]: sum_k w[t, k] * expert_ids[t, k](x[t])

Weight layout (the kernel's, and transformers 5's fused one): `w13` [E, 2I, H] holds each expert's gate rows
then its up rows; `w2` [E, H, I] its down projection. An expert computes down(silu(gate x) * up x).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, softmax_after_topk: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k experts of each token and their weights (float32), from router logits [T, E].

    Qwen2/3-MoE and Mixtral take the softmax over all experts, then the top k (renormalised to sum to 1 when
    `renormalize`; Qwen's `norm_topk_prob`, always for Mixtral). `softmax_after_topk` takes the top k logits
    first and a softmax over just those (which sums to 1 by construction).
    """
    logits = router_logits.float()
    if softmax_after_topk:
        values, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Tiles(NamedTuple):
    """The (token, k) pairs sorted by expert and padded, and the GEMM tiles over them (what `align` returns).

    A tile is up to `block_m` consecutive rows of one expert; tile t covers rows starts[t] to starts[t + 1].
    Lengths are host-side bounds, so nothing waits for the device; entries past `count` are unused.
    """

    sorted_ids: torch.Tensor  # [rows] each row's pair index t * k + j, or T*k for padding
    experts: torch.Tensor  # [tiles] each tile's expert (E past the end)
    starts: torch.Tensor  # [tiles + 1] each tile's first row; from `count` on, the rows in use
    count: torch.Tensor  # [1] tiles in use


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, granule: int | None = None) -> Tiles:
    """Group the T*k (token, k) pairs by expert, pad each group to a multiple of `granule` rows (default
    `block_m`), and cut each group into tiles of `block_m` rows: only a group's last tile may be shorter.

    With granule = block_m / 2 an expert with 260 rows takes two full tiles and one of block_m / 2 rows (the
    GEMM runs it as a half-height tile) instead of a third full tile that is almost all padding.
    Every op is sync-free (a CUDA graph can capture it); lengths come from `max_tiles`.
    """
    granule = tile_granule(block_m, granule)
    flat = topk_ids.flatten().long()
    num_pairs, device = flat.numel(), flat.device
    num_tiles = max_tiles(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + granule - 1) // granule * granule
    ends = padded.cumsum(0)  # where each expert's padded group ends
    experts, order = torch.sort(flat, stable=True)  # pairs grouped by expert, in pair order within each
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[experts]
    sorted_ids = torch.full((num_tiles * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[(ends - padded)[experts] + rank] = order.to(torch.int32)
    tiles_per_expert = (padded + block_m - 1) // block_m
    tile_ends = tiles_per_expert.cumsum(0)
    t = torch.arange(num_tiles + 1, device=device)
    tile_experts = torch.searchsorted(tile_ends, t, right=True)
    e = tile_experts.clamp(max=num_experts - 1)
    first_row = (ends - padded)[e] + (t - (tile_ends - tiles_per_expert)[e]) * block_m
    starts = torch.where(t < tile_ends[-1], first_row, ends[-1])
    return Tiles(sorted_ids, tile_experts[:-1].to(torch.int32), starts.to(torch.int32), tile_ends[-1:].to(torch.int32))


def tile_granule(block_m: int, granule: int | None) -> int:
    """The multiple of rows each expert's group is padded to: `granule` (it must divide block_m), or block_m."""
    granule = granule or block_m
    if block_m % granule:
        raise ValueError(f"granule {granule} must divide block_m {block_m}")
    return granule


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Tiles `align` may fill: each expert that gets any of the pairs pads its group by < block_m rows."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m)


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x [T, H] through the experts each token picked: a loop over the experts that received tokens.

    Each expert's outputs are weighted, then summed into a float32 [T, H] in expert order, as transformers'
    own loop does; the result is rounded to x's dtype once.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        tokens, slots = torch.where(topk_ids == expert)
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slots, None].float())
    return out.to(x.dtype)
