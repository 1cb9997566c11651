"""MoE kernels: routing against transformers' routers, the align step's invariants, and the Triton grouped
GEMM against the plain-torch loop over experts (under TRITON_INTERPRET=1 on the CPU; real shapes with -m gpu).
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from miniengine.kernels import moe

triton_moe = pytest.importorskip("miniengine.kernels.triton_moe")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_routing(num_tokens: int, num_experts: int, top_k: int, seed: int, skew: float = 0.0):
    """Random router logits; `skew` > 0 leaves the last experts (almost surely) without tokens."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g, device=DEVICE)
    logits -= skew * torch.arange(num_experts, device=DEVICE) / num_experts
    return moe.route(logits, top_k, renormalize=True)


def random_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(DEVICE).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, device=DEVICE) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, generator=g, device=DEVICE) / math.sqrt(inter)
    return w13.to(dtype), w2.to(dtype)


# ---- routing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_route_matches_qwen3_moe_router(norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = SimpleNamespace(num_experts_per_tok=4, num_experts=16, norm_topk_prob=norm_topk_prob, hidden_size=32)
    router = Qwen3MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(13, 32)
    _, hf_weights, hf_ids = router(x)
    weights, ids = moe.route(x @ router.weight.T, 4, renormalize=norm_topk_prob)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, hf_weights.float())


def test_route_matches_mixtral_router_and_softmax_after_topk():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    router = MixtralTopKRouter(SimpleNamespace(num_experts_per_tok=2, num_local_experts=8, hidden_size=32))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(11, 32)
    _, hf_weights, hf_ids = router(x)
    logits = x @ router.weight.T
    for weights, ids in (moe.route(logits, 2, True), moe.route(logits, 2, False, softmax_after_topk=True)):
        torch.testing.assert_close(ids, hf_ids, rtol=0, atol=0)
        torch.testing.assert_close(weights, hf_weights)
        torch.testing.assert_close(weights.sum(-1), torch.ones(11))


# ---- align -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, block_m",
    [(1, 8, 2, 16), (3, 16, 8, 16), (37, 6, 3, 4), (64, 128, 8, 16), (200, 8, 2, 64), (5, 4, 4, 1), (700, 3, 2, 16)],
)
@pytest.mark.parametrize("short", [False, True], ids=["full", "short"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_align_invariants(impl, short, num_tokens, num_experts, top_k, block_m):
    _, ids = random_routing(num_tokens, num_experts, top_k, seed=num_tokens, skew=4.0)
    align = moe.align if impl == "torch" else triton_moe.triton_align
    granule = max(1, block_m // 2) if short else block_m
    tiles = align(ids, num_experts, block_m, granule)
    num_pairs = num_tokens * top_k
    counts = torch.bincount(ids.flatten().cpu(), minlength=num_experts)
    rows, experts, starts = (t.cpu().long() for t in (tiles.sorted_ids, tiles.experts, tiles.starts))
    count = int(tiles.count)
    used = int(starts[count])
    assert count == sum(-(-int(c) // block_m) for c in counts)
    assert used == sum(-(-int(c) // granule) * granule for c in counts)
    assert count <= experts.numel() == starts.numel() - 1 and rows.numel() == experts.numel() * block_m
    assert rows.numel() <= num_pairs + min(num_experts, num_pairs) * (block_m - 1) + block_m - 1
    real = rows[:used][rows[:used] < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs)), "every (token, k) pair appears exactly once"
    assert (
        (rows[used:] == num_pairs).all() and (experts[count:] == num_experts).all() and (starts[count:] == used).all()
    )
    assert starts[0] == 0
    flat = ids.flatten().cpu()
    for t in range(count):
        tile = rows[starts[t] : starts[t + 1]]
        assert 0 < len(tile) <= block_m and len(tile) % granule == 0
        last_of_expert = t + 1 == count or experts[t + 1] != experts[t]
        assert len(tile) == block_m or last_of_expert, "only a group's last tile is shorter"
        pairs = tile[tile < num_pairs]
        assert len(pairs) > 0, "no tile is all padding"
        assert (flat[pairs] == experts[t]).all(), "each tile's pairs belong to its expert"
        assert (tile[: len(pairs)] == pairs).all(), "padding last"
        # The torch version keeps pair order within an expert; the kernel's atomics may not (on a GPU).
        assert impl == "triton" or (pairs.diff() > 0).all()
    assert (experts[:count].diff() >= 0).all(), "experts in order"


def test_align_rejects_a_granule_that_does_not_divide_the_tile():
    _, ids = random_routing(4, 4, 2, seed=0)
    for align in (moe.align, triton_moe.triton_align):
        with pytest.raises(ValueError, match="must divide"):
            align(ids, 4, 16, 12)


# ---- the grouped GEMM ------------------------------------------------------------------------------------


def poison_empty(monkeypatch):
    """Make torch.empty return NaN-filled float tensors: a row the kernel forgets to write shows up."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def check_fused_moe(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0, skew=0.0, config=None):
    weights, ids = random_routing(num_tokens, num_experts, top_k, seed, skew)
    w13, w2 = random_experts(num_experts, hidden, inter, dtype, seed + 1)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator(DEVICE).manual_seed(seed + 2), device=DEVICE)
    x = x.to(dtype)
    out = triton_moe.fused_moe(x, w13, w2, weights, ids, config)
    expected = moe.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    assert not out.isnan().any()
    # Half types round h and each pair's output once more than the float32 reference.
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    err = (out.float() - expected).abs().max().item()
    assert err <= tol * expected.abs().max().item(), f"max error {err}"
    return ids


TILE = triton_moe.GemmTile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, hidden, inter",
    [
        (5, 4, 2, 32, 48),  # a few tokens per expert
        (3, 8, 8, 40, 24),  # top-k larger than the number of tokens; odd sizes
        (37, 6, 3, 64, 80),  # several tiles per expert
    ],
)
def test_fused_moe_matches_reference(monkeypatch, dtype, num_tokens, num_experts, top_k, hidden, inter):
    poison_empty(monkeypatch)
    check_fused_moe(num_tokens, num_experts, top_k, hidden, inter, dtype)


def test_experts_without_tokens(monkeypatch):
    poison_empty(monkeypatch)
    ids = check_fused_moe(6, 32, 2, 48, 32, torch.float16, skew=40.0)
    assert ids.unique().numel() < 16, "most experts should receive no tokens"


@pytest.mark.parametrize(
    "config",
    [
        triton_moe.MoeConfig(16, TILE(16, 16, 4, 2), TILE(32, 32, 4, 2), group_m=2),  # K in several chunks
        triton_moe.MoeConfig(32, TILE(64, 64, 4, 2), TILE(16, 64, 4, 2), group_m=1),
        triton_moe.MoeConfig(64, TILE(32, 128, 4, 2), TILE(64, 16, 4, 2), group_m=8),
        # TMA loads: slabs running past an expert's rows (40 = 2.5 x 16) and past K (72 = 2 x 32 + 8)
        triton_moe.MoeConfig(16, TILE(16, 32, 4, 2, tma=True), TILE(32, 32, 4, 2, tma=True), group_m=2),
        # gate and up slabs in one box of w13 viewed [E, 2, I, H], one dot, the halves split after
        triton_moe.MoeConfig(32, TILE(16, 32, 4, 2, tma=True, paired=True), TILE(32, 32, 4, 2, tma=True)),
        # persistent: a few programs, each looping over many (tile, slab) items; with TMA; with short tiles
        triton_moe.MoeConfig(16, TILE(16, 32, 4, 2, persistent=True), TILE(32, 32, 4, 2, persistent=True)),
        triton_moe.MoeConfig(
            32, TILE(16, 32, 4, 2, True, True, persistent=True), TILE(16, 32, 4, 2, True, persistent=True), 2, True
        ),
    ],
)
def test_fused_moe_tile_configs(monkeypatch, config):
    """Tiles narrower than the matrices (several column slabs, a K loop with a remainder, GROUP_M ordering)."""
    poison_empty(monkeypatch)
    check_fused_moe(29, 5, 2, 72, 40, torch.float16, seed=3, config=config)


@pytest.mark.parametrize("tma", [False, True])
def test_short_tiles_end_groups_at_half_height(monkeypatch, tma):
    """With short tiles an expert's last tile may be BLOCK_M / 2 rows; those programs run a half-height tile
    (down's h rows by plain loads even where full tiles take TMA boxes)."""
    poison_empty(monkeypatch)
    config = triton_moe.MoeConfig(
        32, TILE(16, 32, 4, 2, tma=tma, paired=tma), TILE(32, 32, 4, 2, tma=tma), short_tiles=True
    )
    ids = check_fused_moe(70, 4, 2, 72, 40, torch.float16, seed=4, config=config)
    tiles = moe.align(ids, 4, 32, config.granule)
    sizes = tiles.starts[1 : int(tiles.count) + 1] - tiles.starts[: int(tiles.count)]
    assert (sizes == 16).any() and (sizes == 32).any(), "both heights of tile ran"
    with pytest.raises(ValueError, match="short tiles"):
        triton_moe.MoeConfig(16, TILE(16, 32, 4, 2), TILE(16, 32, 4, 2), short_tiles=True)


def test_tma_tiles_fall_back_to_plain_loads_where_rows_are_not_16_byte_multiples(monkeypatch):
    poison_empty(monkeypatch)
    x = torch.empty(1, 36, dtype=torch.float16)
    assert not triton_moe.uses_tma(x, 36) and triton_moe.uses_tma(x, 40)
    config = triton_moe.MoeConfig(16, TILE(16, 32, 4, 2, tma=True), TILE(16, 32, 4, 2, tma=True))
    check_fused_moe(9, 4, 2, 36, 20, torch.float16, seed=5, config=config)


@pytest.mark.parametrize("top_k, hidden", [(1, 24), (2, 1500), (8, 40)])
def test_combine_sums_each_tokens_pairs(monkeypatch, top_k, hidden):
    poison_empty(monkeypatch)
    y = torch.randn(7 * top_k, hidden, generator=torch.Generator(DEVICE).manual_seed(top_k), device=DEVICE)
    y = y.to(torch.bfloat16)
    expected = y.float().view(7, top_k, hidden).sum(dim=1)
    torch.testing.assert_close(triton_moe.combine(y, top_k).float(), expected, rtol=1e-2, atol=1e-2)


def test_fused_moe_rejects_mismatched_inputs_with_clear_errors():
    weights, ids = random_routing(4, 4, 2, seed=0)
    w13, w2 = random_experts(4, 32, 16, torch.float16, seed=1)
    x = torch.randn(4, 32, device=DEVICE, dtype=torch.float16)
    with pytest.raises(TypeError, match="share one float dtype"):
        triton_moe.fused_moe(x.float(), w13, w2, weights, ids)
    with pytest.raises(TypeError, match="int32 or int64"):
        triton_moe.fused_moe(x, w13, w2, weights, ids.float())
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        triton_moe.fused_moe(x, w13, w2, weights[:3], ids[:3])
    with pytest.raises(ValueError, match="do not fit"):
        triton_moe.fused_moe(x, w13, w2[:, :, :8], weights, ids)


def test_pick_config_covers_decode_and_prefill():
    decode = triton_moe.pick_config(16, 2048, 768, 128, 8)
    prefill = triton_moe.pick_config(4096, 4096, 14336, 8, 2)
    assert decode.block_m == 16 and prefill.block_m > decode.block_m
    tiny = triton_moe.pick_config(4, 40, 24, 8, 2)
    assert tiny.gate_up.block_n <= 32 and tiny.down.block_k <= 32, "tiles are capped at the matrix size"


# ---- real shapes on the GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_experts, top_k, hidden, inter", [(128, 8, 2048, 768), (8, 2, 4096, 14336)])
@pytest.mark.parametrize("num_tokens", [1, 16, 256, 4096])
@pytest.mark.parametrize("tma", [False, True])
def test_fused_moe_real_shapes(num_experts, top_k, hidden, inter, num_tokens, tma):
    """The table's tiles, with and without TMA loads (with: gate_up's slabs paired too)."""
    config = triton_moe.pick_config(num_tokens, hidden, inter, num_experts, top_k)
    gate_up = replace(config.gate_up, tma=tma, paired=tma)
    config = replace(config, gate_up=gate_up, down=replace(config.down, tma=tma))
    check_fused_moe(num_tokens, num_experts, top_k, hidden, inter, torch.bfloat16, seed=num_tokens, config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tma_tiles_replay_in_a_cuda_graph():
    """Mixtral-sized decode batches (64 rows per expert at 256 tokens) take TMA tiles inside decode graphs:
    the descriptors are captured by value with their launches, so a replay on new inputs must match eager."""
    num_tokens, num_experts, top_k, hidden, inter = 256, 8, 2, 512, 1024
    config = triton_moe.pick_config(num_tokens, hidden, inter, num_experts, top_k)
    config = replace(config, gate_up=replace(config.gate_up, tma=True), down=replace(config.down, tma=True))
    w13, w2 = random_experts(num_experts, hidden, inter, torch.bfloat16, seed=7)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    weights, ids = random_routing(num_tokens, num_experts, top_k, seed=8)
    triton_moe.fused_moe(x, w13, w2, weights, ids, config)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_moe.fused_moe(x, w13, w2, weights, ids, config)
    new_weights, new_ids = random_routing(num_tokens, num_experts, top_k, seed=9)
    x.copy_(torch.randn_like(x))
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    torch.testing.assert_close(out, triton_moe.fused_moe(x, w13, w2, weights, ids, config), rtol=0, atol=0)
