"""Paged attention on the GPU: the Triton kernel beside torch SDPA on contiguous K/V and gather + SDPA.

Shapes (32 query / 8 KV heads, head_dim 128, bf16, block size 16, blocks scattered at random, random data):

    decode   batch x context 64 x 1024, 64 x 4096, 256 x 1024, 16 x 16384; and one sequence (what a chat
             user waits on) of 640 and 4096, also timed as 28 launches in a CUDA graph (`graph_us`: one launch
             per layer of a decode step, launch gaps as the engine's graphs see them); the batched decodes
             also one launch per layer, each layer its own K/V (`graph_us`, `graph_ratio_to_floor`)
    mixed    48 decodes (context 1024) + 2 prefill chunks of 512 (after 512 cached tokens)
    prefill  8 x 2048, causal

Each row: median time (triton.testing.do_bench), achieved GB/s (K and V bytes read once) and
`ratio_to_floor`, the floor being max(K+V bytes / copy bandwidth, attention FLOPs / bf16 matmul rate),
both measured in this run (bench/roofline.py); prefill rows add TFLOP/s and the ratio to SDPA's.
The peers: SDPA on contiguous K/V (the non-paged ideal; decode folds the query heads of a KV head into the
query length, which is exact for one query token) and `paged_attention_sdpa` (the CPU path: gather + SDPA).

    python bench/kernels/attention.py              # table + bench/results/attention-<device>-<date>.json
    python bench/kernels/attention.py --check      # first compare every output with the reference
    python bench/kernels/attention.py --sweep      # also time other tile configs and split counts per shape
    python bench/kernels/attention.py --only decode
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
from report import versions, write_result  # noqa: E402
from roofline import gpu_copy_bandwidth, gpu_matmul_rate  # noqa: E402

from miniengine.forward_context import AttentionMetadata  # noqa: E402
from miniengine.kernels import triton_paged_attention as tpa  # noqa: E402
from miniengine.kernels.paged_attention import paged_attention_ref, paged_attention_sdpa  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
SDPA_GQA: dict[str, str] = {}  # per prefill shape: how the contiguous SDPA peer took the grouped heads


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # decode | mixed | prefill
    seqs: tuple[tuple[int, int], ...]  # (cached context, new tokens) per sequence


SHAPES = [
    Shape("decode 64x1024", "decode", ((1023, 1),) * 64),
    Shape("decode 64x4096", "decode", ((4095, 1),) * 64),
    Shape("decode 256x1024", "decode", ((1023, 1),) * 256),
    Shape("decode 16x16384", "decode", ((16383, 1),) * 16),
    Shape("decode 1x640", "decode", ((639, 1),)),
    Shape("decode 1x4096", "decode", ((4095, 1),)),
    Shape("mixed 48x1024 + 2x512", "mixed", ((1023, 1),) * 48 + ((512, 512),) * 2),
    Shape("prefill 8x2048", "prefill", ((0, 2048),) * 8),
]


@dataclass
class Batch:
    query: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    kv_bytes: int  # K and V of every sequence, read once
    flops: int  # 4 * heads * head_dim per visible (query, key) pair


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> Batch:
    torch.manual_seed(seed)
    lens = [c + n for c, n in shape.seqs]
    tables_len = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(tables_len) + 64
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device=device, dtype=torch.int32)  # scattered blocks
    width = max(tables_len)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(tables_len):
        tables[i, :n] = order[used : used + n]
        used += n
    starts = [0]
    for _, n in shape.seqs:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device=device),
        block_tables=tables,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        max_query_len=max(n for _, n in shape.seqs),
        max_seq_len=max(lens),
        query_start_loc_host=starts,
        seq_lens_host=lens,
    )
    query = torch.randn(starts[-1], HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in shape.seqs)
    kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD_DIM * k_cache.element_size()
    return Batch(query, k_cache, v_cache, meta, kv_bytes, 4 * HEADS * HEAD_DIM * pairs)


def contiguous_sdpa(batch: Batch, shape: Shape):
    """SDPA on contiguous K/V, or None where the shape has no single contiguous form (mixed).

    Only fused backends (flash, cuDNN, memory-efficient) may run it; if none takes grouped K/V heads,
    K/V are expanded to one per query head before timing, which `SDPA_GQA` records.
    """
    lens, scale = batch.meta.seq_lens_host, HEAD_DIM**-0.5
    if shape.kind == "mixed" or len(set(lens)) != 1:
        return None
    b, length = len(lens), lens[0]
    k = batch.k_cache[batch.meta.block_tables.long()].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()
    v = batch.v_cache[batch.meta.block_tables.long()].flatten(1, 2)[:, :length].transpose(1, 2).contiguous()

    def fused(q, k, v, **kwargs):
        with sdpa_kernel(FUSED_SDPA):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)

    if shape.kind == "decode":  # [B, Hkv, group, D]: a KV head's query heads as its query rows, no mask
        q = batch.query.view(b, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        return lambda: fused(q, k, v).reshape(b, HEADS, HEAD_DIM)
    q = batch.query.view(b, length, HEADS, HEAD_DIM).transpose(1, 2)
    try:
        fused(q, k, v, is_causal=True, enable_gqa=True)
        SDPA_GQA[shape.name] = "enable_gqa"
    except RuntimeError:
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        SDPA_GQA[shape.name] = "K/V expanded to every query head"
        return lambda: fused(q, k, v, is_causal=True).transpose(1, 2).reshape(-1, HEADS, HEAD_DIM)
    return lambda: fused(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(-1, HEADS, HEAD_DIM)


def kernels_of(batch: Batch, shape: Shape, **options) -> dict:
    scale = HEAD_DIM**-0.5
    args = (batch.query, batch.k_cache, batch.v_cache, batch.meta, scale)
    return {
        "triton": lambda: tpa.paged_attention(*args, **options),
        "sdpa contiguous": contiguous_sdpa(batch, shape),
        "gather + sdpa": lambda: paged_attention_sdpa(*args),
    }


def check(batch: Batch, shape: Shape) -> dict:
    """Max |error| of every kernel against the reference; raises on a mismatch."""
    expected = paged_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.meta, HEAD_DIM**-0.5)
    errors = {}
    for name, fn in kernels_of(batch, shape).items():
        if fn is not None:
            out = fn()
            errors[name] = (out.float() - expected.float()).abs().max().item()
            torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")
    return errors


def timed_row(shape: Shape, kernel: str, seconds: float, batch: Batch, peaks: dict) -> dict:
    floor = max(batch.kv_bytes / peaks["copy_bandwidth"], batch.flops / peaks["matmul_rate"])
    return {
        "shape": shape.name,
        "kernel": kernel,
        "time_us": seconds * 1e6,
        "gb_per_s": batch.kv_bytes / seconds / 1e9,
        "tflop_per_s": batch.flops / seconds / 1e12,
        "floor_us": floor * 1e6,
        "ratio_to_floor": floor / seconds,
    }


def sweep_candidates(shape: Shape) -> list[dict]:
    """Tile configs (and split counts, for decode) to try beside the default."""
    if shape.kind == "decode":
        configs = [tpa.TileConfig(16, n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
        # the CUDA-core tile (no tl.dot): only a KV head's real query rows
        configs += [tpa.TileConfig(1, n, w, s, dot=False) for n in (16, 32, 64) for w in (2, 4) for s in (2, 3)]
        options = [{"config": c, "shared_offsets": o} for c in configs for o in (True, False)]
        return options + [{"num_splits": k} for k in (1, 2, 4, 8, 16)]
    rows = (64, 128) if shape.kind == "prefill" else (32, 64)
    configs = [tpa.TileConfig(m, n, w, s) for m in rows for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    return [{"config": c, "shared_offsets": o} for c in configs for o in (True, False)]


def seconds_of(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


GRAPH_LAUNCHES = 28  # a Qwen3-0.6B decode step's attention launches
LAYERS_BYTES = 8e9  # K/V the layered graph timing may hold at once (each layer its own cache)


def graph_seconds_of(fns: list) -> float:
    """One launch's share of a CUDA graph that launches `fns` in turn (median of replays)."""
    for fn in fns:  # compiled (and the split buffers settled) outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    seconds = do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / 1e3 / len(fns)
    del graph
    return seconds


def layered_graph_seconds(batch: Batch, shape: Shape, kernel: str, device: torch.device) -> float:
    """A decode step's view of a kernel: one launch per layer, each layer reading its own K/V, in one graph.

    Up to GRAPH_LAUNCHES layers (fewer where their caches would pass LAYERS_BYTES; a layer's K/V is far larger
    than L2, so none is read from cache). Each launch follows another kernel, as in the model, not do_bench's
    L2 flush, which leaves L2 full of dirty lines that the timed kernel first writes back."""
    layers = max(2, min(GRAPH_LAUNCHES, int(LAYERS_BYTES // batch.kv_bytes)))
    batches = [batch] + [make_batch(shape, device, seed=i) for i in range(1, layers)]
    scale = HEAD_DIM**-0.5

    def triton_of(b: Batch):
        return lambda: tpa.paged_attention(b.query, b.k_cache, b.v_cache, b.meta, scale)

    fns = [triton_of(b) if kernel == "triton" else contiguous_sdpa(b, shape) for b in batches]
    seconds = graph_seconds_of(fns)
    del fns, batches
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare every output with the reference first")
    parser.add_argument("--sweep", action="store_true", help="time other tile configs and split counts too")
    parser.add_argument("--only", default="", help="run the shapes whose name contains this")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/...)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels/attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peaks = {"copy_bandwidth": gpu_copy_bandwidth(device), "matmul_rate": gpu_matmul_rate(device, DTYPE)}
    rows, checks, sweeps = [], {}, {}
    for shape in [s for s in SHAPES if args.only in s.name]:
        batch = make_batch(shape, device)
        if args.check:
            checks[shape.name] = check(batch, shape)
            print(
                f"check {shape.name}: max |error| " + ", ".join(f"{k} {v:.2e}" for k, v in checks[shape.name].items())
            )
        plan = tpa.plan_launch(batch.query.shape[0], HEADS, KV_HEADS, HEAD_DIM, batch.meta, device)
        for kernel, fn in kernels_of(batch, shape).items():
            if fn is not None:
                row = timed_row(shape, kernel, seconds_of(fn), batch, peaks)
                if kernel == "triton":
                    row.update(config=asdict(plan.config), num_splits=plan.num_splits)
                if len(shape.seqs) == 1:
                    try:
                        row["graph_us"] = graph_seconds_of([fn] * GRAPH_LAUNCHES) * 1e6
                    except RuntimeError as error:  # a peer that syncs with the host cannot be captured
                        print(f"  {shape.name} {kernel}: not timed in a graph ({type(error).__name__})")
                elif shape.kind == "decode" and kernel != "gather + sdpa":
                    row["graph_us"] = layered_graph_seconds(batch, shape, kernel, device) * 1e6
                    row["graph_ratio_to_floor"] = row["floor_us"] / row["graph_us"]
                rows.append(row)
        if args.sweep:
            sweeps[shape.name] = sweep(batch, shape, peaks)
        del batch
        torch.cuda.empty_cache()
    for row in rows:  # prefill and mixed: beside SDPA on the same shape
        peer = next((r for r in rows if r["shape"] == row["shape"] and r["kernel"] == "sdpa contiguous"), None)
        row["ratio_to_sdpa"] = peer["time_us"] / row["time_us"] if peer else None

    result = {
        "benchmark": "paged attention",
        "date": datetime.date.today().isoformat(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": {"name": name, "sms": torch.cuda.get_device_properties(device).multi_processor_count, **peaks},
        "versions": versions("torch", "triton"),
        "settings": {
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE,
            "dtype": str(DTYPE).removeprefix("torch."),
            "timing": "triton.testing.do_bench, median, L2 flushed between runs; graph_us: one launch's share "
            "of a CUDA graph of consecutive launches (decode batches: each launch its own layer's K/V)",
            "floor": "max(K+V bytes / copy bandwidth, attention FLOPs / bf16 matmul rate), measured in this run",
            "sdpa_contiguous": "fused backends only; decode folds a KV head's query heads into the query length",
            "sdpa_prefill_gqa": SDPA_GQA or None,
        },
        "rows": rows,
        "check_max_abs_error": checks or None,
        "sweep": sweeps or None,
    }
    print_table(result)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    out = args.out or BENCH / "results" / f"attention-{slug}-{result['date']}.json"
    write_result(result, out)


def sweep(batch: Batch, shape: Shape, peaks: dict) -> list[dict]:
    """Every candidate's time, fastest first; failures (a config that does not fit) are skipped."""
    scale = HEAD_DIM**-0.5
    results = []
    for options in sweep_candidates(shape):
        fn = lambda o=options: tpa.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, scale, **o)  # noqa: E731
        try:
            seconds = seconds_of(fn)
        except Exception as error:  # out of shared memory or registers: not a candidate on this GPU
            print(f"  sweep {shape.name} {options}: {type(error).__name__}")
            continue
        row = timed_row(shape, "triton", seconds, batch, peaks)
        if len(shape.seqs) == 1:
            row["graph_us"] = graph_seconds_of([fn] * GRAPH_LAUNCHES) * 1e6
        launch = {k: v for k, v in options.items() if k != "shared_offsets"}
        plan = tpa.plan_launch(
            batch.query.shape[0], HEADS, KV_HEADS, HEAD_DIM, batch.meta, batch.query.device, **launch
        )
        shared = options.get("shared_offsets", True)
        results.append({"config": asdict(plan.config), "num_splits": plan.num_splits, "shared_offsets": shared, **row})
    results.sort(key=lambda r: r.get("graph_us", r["time_us"]))
    for r in results[:8]:
        c = r["config"]
        print(
            f"  sweep {shape.name:24} m{c['block_m']} n{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
            f"{'' if c['dot'] else ' no-dot'} "
            f"splits {r['num_splits']:2} shared {int(r['shared_offsets'])}: {r['time_us']:8.1f} us  "
            f"ratio_to_floor {r['ratio_to_floor']:.2f}"
            + (f"  in a graph {r['graph_us']:.1f} us" if "graph_us" in r else "")
        )
    return results


def print_table(result: dict) -> None:
    d = result["device"]
    print(
        f"\n{d['name']}: copy {d['copy_bandwidth'] / 1e12:.2f} TB/s, bf16 matmul {d['matmul_rate'] / 1e12:.0f} TFLOP/s"
    )
    print(f"{'shape':24} {'kernel':16} {'time us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'floor':>6} {'vs sdpa':>8}  plan")
    for r in result["rows"]:
        vs = f"{r['ratio_to_sdpa']:.2f}" if r["ratio_to_sdpa"] else "-"
        plan = ""
        if "config" in r:
            c = r["config"]
            plan = f"m{c['block_m']} n{c['block_n']} w{c['num_warps']} s{c['num_stages']} splits {r['num_splits']}"
        if "graph_ratio_to_floor" in r:
            plan += f"  (a layer per launch, in a graph: {r['graph_us']:.1f} us, floor {r['graph_ratio_to_floor']:.2f})"
        elif "graph_us" in r:
            plan += f"  (in a graph: {r['graph_us']:.1f} us)"
        print(
            f"{r['shape']:24} {r['kernel']:16} {r['time_us']:9.1f} {r['gb_per_s']:7.0f} {r['tflop_per_s']:8.1f} "
            f"{r['ratio_to_floor']:6.2f} {vs:>8}  {plan}"
        )


if __name__ == "__main__":
    main()
