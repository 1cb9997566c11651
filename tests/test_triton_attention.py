"""Triton paged attention and KV store equal the torch references (`kernels/paged_attention.py`).

On the CPU these run in Triton's interpreter on small shapes; `-m gpu` runs real shapes on a GPU. Batches
mix fresh prefills, later chunks after cached context (a prefix-cache hit), decodes and padded rows
(seq_len 0); blocks are scattered in random order; every output is poisoned with NaN before the kernel runs,
so an element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from miniengine.kernels import triton_paged_attention as tpa  # noqa: E402
from miniengine.kernels.paged_attention import paged_attention_ref  # noqa: E402
from miniengine.kernels.paged_attention import store_kv as store_kv_ref  # noqa: E402

# (context already cached, new tokens this step). (0, 1) with seq_len 0 is a padded CUDA-graph row.
MIXED = [(0, 7), (12, 1), (37, 1), (5, 9), (0, 1), (50, 20), (3, 1)]
PADDED = "padded"  # a row with one query token and seq_len 0


class _Poisoned:
    """Stands in for `torch` inside a kernel module: new float tensors come filled with NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(tpa, "torch", _Poisoned())


def make_batch(shapes, block_size, num_kv_heads, group, head_dim, dtype, device="cpu", seed=0, max_seq_len=None):
    """A random cache (every slot random, used or not), scattered block tables and queries for `shapes`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = [0 if s == PADDED else s[0] + s[1] for s in shapes]
    q_lens = [1 if s == PADDED else s[1] for s in shapes]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=g).to(device, dtype)
    v_cache = torch.randn(cache_shape, generator=g).to(device, dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    width = max(1, max(map(len, tables)))
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = SimpleNamespace(
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        max_query_len=max(q_lens),
        max_seq_len=max_seq_len or max(lens),
        query_start_loc_host=starts,
        seq_lens_host=lens,
        backend_state={},
    )
    query = torch.randn(starts[-1], num_kv_heads * group, head_dim, generator=g).to(device, dtype)
    return query, k_cache, v_cache, meta


def check(query, k_cache, v_cache, meta, scale=0.3, **kwargs):
    out = tpa.paged_attention(query, k_cache, v_cache, meta, scale, **kwargs)
    expected = paged_attention_ref(query, k_cache, v_cache, meta, scale)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[query.dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    return out


# dtype, GQA group, head_dim, block_size, forced splits (None: the heuristic), KV heads
CASES = [
    (torch.float32, 1, 64, 16, None, 2),
    (torch.float32, 2, 64, 1, 3, 1),
    (torch.float32, 3, 64, 5, None, 1),  # a group that is not a power of two
    (torch.float32, 4, 80, 7, 2, 1),  # head_dim padded to 128 with masks
    (torch.float16, 8, 128, 16, 4, 1),
    (torch.bfloat16, 4, 128, 3, None, 2),
    (torch.bfloat16, 2, 64, 8, 2, 1),
]


@pytest.mark.parametrize("dtype,group,head_dim,block_size,splits,kv_heads", CASES)
def test_mixed_batch_matches_reference(dtype, group, head_dim, block_size, splits, kv_heads):
    query, k_cache, v_cache, meta = make_batch([*MIXED, PADDED], block_size, kv_heads, group, head_dim, dtype)
    out = check(query, k_cache, v_cache, meta, num_splits=splits)
    assert out[meta.query_start_loc_host[-2] :].eq(0).all()  # the padded row attends to nothing: zeros


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_each_tile_config(kind):
    """The decode (16 rows) and prefill (128 rows) tile tables, picked by the batch's shape."""
    shapes = [(40, 1), (3, 1), (17, 1), PADDED] if kind == "decode" else [(0, 33), (21, 30)]
    query, k_cache, v_cache, meta = make_batch(shapes, 4, 2, 2, 64, torch.float16, seed=1)
    num_tokens, num_seqs = query.shape[0], len(shapes)
    assert tpa.batch_kind(num_tokens, num_seqs, meta.max_query_len) == kind
    plan = tpa.plan_launch(num_tokens, 4, 2, 64, meta, query.device)
    assert plan.decode == (kind == "decode") and (plan.num_tiles == num_seqs or kind != "decode")
    check(query, k_cache, v_cache, meta)


@pytest.mark.parametrize(
    "dtype,group,head_dim,block_size,splits,shared",
    [(torch.float32, 2, 64, 16, 3, True), (torch.float32, 3, 80, 5, None, False), (torch.bfloat16, 4, 128, 8, 2, True)],
)
def test_decode_without_dot(dtype, group, head_dim, block_size, splits, shared):
    """The CUDA-core decode tile (no tl.dot, only the real rows): the reference's results, masked tails, odd
    groups, padded head_dim, splits, K read either way; prefill batches refuse it."""
    shapes = [(40, 1), (3, 1), (17, 1), PADDED, (0, 1)]
    query, k_cache, v_cache, meta = make_batch(shapes, block_size, 2, group, head_dim, dtype, seed=7)
    config = tpa.TileConfig(1, 16, 4, 2, dot=False)
    out = check(query, k_cache, v_cache, meta, num_splits=splits, config=config, shared_offsets=shared)
    assert out[3].eq(0).all()  # the padded row
    query, k_cache, v_cache, meta = make_batch(MIXED, block_size, 2, group, head_dim, dtype)
    with pytest.raises(ValueError, match="decode"):
        tpa.paged_attention(query, k_cache, v_cache, meta, 0.3, config=config)


def test_small_key_tiles_cross_many_blocks():
    """16-key tiles over 6-token blocks: tiles and blocks cross each other's edges; the diagonal falls one
    key short of a tile's end (14, 30), so a tile wrongly left unmasked would show a query its next key."""
    shapes = [(45, 3), (70, 1), (9, 16), (14, 5), (30, 9)]
    query, k_cache, v_cache, meta = make_batch(shapes, 6, 1, 4, 64, torch.float32, seed=2)
    check(query, k_cache, v_cache, meta, config=tpa.TileConfig(16, 16, 4, 1))
    check(query, k_cache, v_cache, meta, config=tpa.TileConfig(32, 16, 4, 1), num_splits=3)


def test_differently_laid_out_k_and_v():
    """K and V caches with different strides take the kernel's path with separate K and V offsets."""
    query, k_cache, v_cache, meta = make_batch(MIXED, 8, 2, 2, 64, torch.float32, seed=4)
    k_wide = torch.randn(*k_cache.shape[:3], 2 * k_cache.shape[3])[..., : k_cache.shape[3]]
    k_wide.copy_(k_cache)  # the same keys, every block and slot strided differently from V
    check(query, k_wide, v_cache, meta)
    check(query, k_cache, v_cache, meta, shared_offsets=False, num_splits=2)


def test_64_bit_offsets(monkeypatch):
    """Caches too large for 32-bit offsets take 64-bit address arithmetic: the same results."""
    monkeypatch.setattr(tpa, "MAX_INT32_SPAN", 0)
    query, k_cache, v_cache, meta = make_batch(MIXED, 8, 2, 2, 64, torch.float32, seed=5)
    check(query, k_cache, v_cache, meta)
    check(query, k_cache, v_cache, meta, shared_offsets=False, num_splits=3)


def test_graph_friendly_splits_past_the_end():
    """A batch planned for long sequences (as a captured graph is) stays right for short ones: splits past a
    sequence's end add nothing, and the grid ignores the actual lengths."""
    query, k_cache, v_cache, meta = make_batch([(5, 1), (0, 1), PADDED, (30, 1)], 8, 1, 4, 64, torch.float32, seed=3)
    meta.max_seq_len = 4096
    check(query, k_cache, v_cache, meta, num_splits=8)
    query, k_cache, v_cache, meta = make_batch([*MIXED, PADDED], 4, 2, 2, 64, torch.float32)  # mixed tiles split
    check(query, k_cache, v_cache, meta, num_splits=3)


def test_split_heuristic():
    sms = 132
    assert tpa.choose_num_splits(256, 8, 1024, sms) == 1  # enough programs already
    assert tpa.choose_num_splits(16, 8, 16384, sms) == 3  # 128 programs -> 384
    assert tpa.choose_num_splits(1, 8, 16384, sms) == tpa.MAX_SPLITS
    assert tpa.choose_num_splits(1, 8, 600, sms) == 2  # at least MIN_KEYS_PER_SPLIT keys each


def test_bad_inputs_raise():
    query, k_cache, v_cache, meta = make_batch([(3, 1)], 4, 2, 2, 64, torch.float32)
    with pytest.raises(TypeError, match="one dtype"):
        tpa.paged_attention(query.half(), k_cache, v_cache, meta, 1.0)
    with pytest.raises(ValueError, match="evenly"):
        tpa.paged_attention(query[:, :3], k_cache, v_cache, meta, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        tpa.paged_attention(query, k_cache, v_cache, meta, 1.0, num_splits=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_negative_slots(dtype):
    g = torch.Generator().manual_seed(4)
    k_cache = torch.randn(5, 3, 2, 64, generator=g).to(dtype)
    v_cache = torch.randn(5, 3, 2, 64, generator=g).to(dtype)
    kv = torch.randn(6, 3, 2, 64, generator=g).to(dtype)  # like a fused qkv output: K and V are strided views
    key, value = kv[:, 1], kv[:, 2]
    slots = torch.tensor([13, -1, 2, 7, -1, 0])
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    store_kv_ref(key[keep], value[keep], expect_k, expect_v, slots[keep])
    tpa.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


# ---- real shapes on a GPU (pytest -m gpu) --------------------------------------------------------------


def gpu_only(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@gpu_only
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("splits", [None, 1, 5])
@pytest.mark.parametrize("batch", ["decode", "mixed", "prefill"])
def test_gpu_real_shapes(head_dim, splits, batch):
    shapes = {
        "decode": [(1023, 1), (4095, 1), (16383, 1), (1, 1), PADDED, (777, 1)] * 4,
        "mixed": [(1000 + 37 * i, 1) for i in range(48)] + [(0, 512), (1536, 512), PADDED],
        "prefill": [(0, 2048), (0, 1500), (3000, 900)],
    }[batch]
    query, k_cache, v_cache, meta = make_batch(shapes, 16, 8, 4, head_dim, torch.bfloat16, device="cuda")
    check(query, k_cache, v_cache, meta, scale=head_dim**-0.5, num_splits=splits)


@gpu_only
def test_gpu_cuda_graph_replay():
    """Capture a decode step planned for 8192 keys, replay it for other lengths: same as the reference."""
    query, k_cache, v_cache, meta = make_batch([(8191, 1)] * 8, 16, 8, 4, 128, torch.bfloat16, device="cuda")
    meta.max_seq_len = 8192
    tpa.paged_attention(query, k_cache, v_cache, meta, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tpa.paged_attention(query, k_cache, v_cache, meta, 0.1)
    for lens in ([5, 100, 8192, 0, 17, 4000, 1, 2], [8192] * 8):
        meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        meta.seq_lens_host = lens
        graph.replay()
        torch.testing.assert_close(out, paged_attention_ref(query, k_cache, v_cache, meta, 0.1), atol=2e-2, rtol=2e-2)
