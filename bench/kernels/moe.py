"""The experts of a MoE layer on the GPU: our Triton grouped GEMM against torch._grouped_mm and a per-expert loop.

For Qwen3-30B-A3B (E=128, top-8, hidden 2048, expert intermediate 768) and Mixtral-8x7B (E=8, top-2, hidden
4096, intermediate 14336) at 16, 256 and 4096 tokens, with random router logits (routing is given, not timed):
gate_up -> SiLU * up -> down -> routing weights -> sum over k, bf16. The floor of a row is

    max(bytes of the experts the batch hits, read once / copy bandwidth,  2 * T * k * 3 * H * I / matmul rate)

with bandwidth and matmul rate measured in the same run (bench/roofline.py). `ratio_to_floor` is floor time /
measured time (1.0 is the hardware limit); `speedup_vs_grouped_mm` is torch._grouped_mm's time / ours.

    python bench/kernels/moe.py          # checks outputs, then the table; writes bench/results/moe-<device>-<date>.json
    python bench/kernels/moe.py --sweep  # times tile configs per shape and prints the best of each
    python bench/kernels/moe.py --sweep --models Mixtral-8x7B --tokens 4096   # one shape
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import replace
from functools import partial
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from miniengine.kernels import moe
from miniengine.kernels import triton_moe as tm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import versions, write_result  # noqa: E402
from roofline import gpu_copy_bandwidth, gpu_matmul_rate  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
MODELS = {  # name: (experts, top_k, hidden, intermediate)
    "Qwen3-30B-A3B": (128, 8, 2048, 768),
    "Mixtral-8x7B": (8, 2, 4096, 14336),
}
TOKENS = (16, 256, 4096)
DEVICE = "cuda"


def bench_us(fn) -> float:
    """Median microseconds, L2 flushed before each run (triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3


def graph_us(fn) -> float | None:
    """`bench_us` of `fn` captured in a CUDA graph and replayed: the device time without the host's launch
    overhead (how the engine's decode step runs a MoE layer). None if `fn` cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles and allocates outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        print(f"not captured in a CUDA graph: {error}")
        return None
    return bench_us(graph.replay)


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids):
    """The same computation through torch._grouped_mm: sort pairs by expert, two grouped GEMMs, un-sort, sum."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)  # where each expert's rows end
    gate_up = torch._grouped_mm(x[order // top_k], w13.transpose(1, 2), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    out = torch.empty_like(y)
    out[order] = y * topk_weights.flatten()[order, None].to(y.dtype)
    return out.view(num_tokens, top_k, -1).sum(dim=1)


def make_inputs(model: str, num_tokens: int, seed: int = 0):
    num_experts, top_k, hidden, inter = MODELS[model]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, generator=g, dtype=torch.bfloat16) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, device=DEVICE, generator=g, dtype=torch.bfloat16) * inter**-0.5
    x = torch.randn(num_tokens, hidden, device=DEVICE, generator=g, dtype=torch.bfloat16)
    logits = torch.randn(num_tokens, num_experts, device=DEVICE, generator=g)
    weights, ids = moe.route(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def floor_us(row: dict, bandwidth: float, rate: float) -> tuple[float, str]:
    """The row's floor: the experts it hits read once, or its FLOPs at the matmul rate, whichever is longer."""
    weight_s = row["experts_hit"] * 3 * row["hidden"] * row["intermediate"] * 2 / bandwidth
    flops_s = 2 * row["tokens"] * row["top_k"] * 3 * row["hidden"] * row["intermediate"] / rate
    return 1e6 * max(weight_s, flops_s), "memory" if weight_s >= flops_s else "compute"


def shapes(args) -> list[tuple[str, int]]:
    return [(m, t) for m, t in product(MODELS, TOKENS) if m in args.models and t in args.tokens]


def check(args) -> None:
    """Both fast paths against the per-expert loop in float32, every shape."""
    for model, num_tokens in shapes(args):
        x, w13, w2, weights, ids = make_inputs(model, num_tokens)
        expected = moe.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
        scale = expected.abs().max().item()
        for name, fn in (("ours", tm.fused_moe), ("grouped_mm", grouped_mm_moe)):
            err = (fn(x, w13, w2, weights, ids).float() - expected).abs().max().item() / scale
            print(f"check {model:14} T={num_tokens:5} {name:10} max error / max |out| = {err:.2e}")
            if err > 3e-2:
                raise SystemExit(f"{name} is wrong at {model} T={num_tokens}: relative error {err:.2e}")


def sweep_tiles(block_m: int, tma_only: bool = False) -> list:
    """Candidates: deep K chunks and narrow columns for the memory-bound small tiles; for the compute-bound
    large ones, wgmma-sized tiles with and without TMA loads, gate_up's gate and up slabs paired in one box
    and one dot (gate_up's BLOCK_N counts half its columns), and persistent programs (one per SM).
    `tma_only`: just the wide TMA tiles (the prefill shapes' fastest, a quicker sweep)."""
    if block_m <= 32:
        return [tm.GemmTile(n, k, 4, s) for n, k, s in product((32, 64, 128), (128, 256), (3, 4))]
    tiles = [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3)]
    tiles += [(256, 64, 8, 3), (256, 64, 8, 4), (256, 128, 8, 2)]
    # 8 warps: two warpgroups, one wgmma each; 64-row tiles also one warpgroup with the whole width
    big = [t for t in tiles if t[2] == 8 or (block_m <= 64 and t[0] >= 128)]
    tma = [tm.GemmTile(*t, tma=True, paired=paired) for t, paired in product(big, (False, True))]  # paired: gate_up
    persistent = [replace(t, persistent=True) for t in tma]
    if tma_only:
        return tma + persistent
    return [tm.GemmTile(*t) for t in tiles] + [tm.GemmTile(*t, tma=True) for t in tiles if t[2] == 4] + tma + persistent


def sweep(args) -> None:
    """For each shape and BLOCK_M, the fastest tile of each GEMM alone; prints the best MoeConfig per shape."""
    for model, num_tokens in shapes(args):
        num_experts, top_k, hidden, inter = MODELS[model]
        inputs = make_inputs(model, num_tokens)
        x, w13, w2, weights, ids = inputs
        rows = num_tokens * top_k / num_experts  # per expert, on average
        best = None
        fits = [bm for bm in (16, 32, 64, 128, 256) if min(64, rows / 4) <= bm <= max(16, 2 * rows)]
        block_ms = [bm for bm in fits if not args.block_m or bm in args.block_m]
        for block_m, short in product(block_ms, (False, True)):
            if short and block_m < 64:  # half of a small tile is below the tensor cores' 64-row step
                continue
            granule = block_m // 2 if short else block_m
            aligned = tm.triton_align(ids, num_experts, block_m, granule)
            h = torch.empty(aligned.sorted_ids.numel(), inter, dtype=x.dtype, device=DEVICE)
            out = torch.empty(ids.numel(), hidden, dtype=x.dtype, device=DEVICE)
            gemms = {"gate_up": (x, w13, h), "down": (h, w2, out)}
            times: dict[str, list] = {"gate_up": [], "down": []}
            for tile, stage in product(sweep_tiles(block_m, args.tma_only), gemms):
                if stage == "gate_up" and tile.block_n > 128:  # two accumulators that wide spill registers
                    continue
                if stage == "down" and tile.paired:  # the same kernel as without: pairing is gate_up's
                    continue
                config = tm.MoeConfig(block_m, tile, tile, short_tiles=short)
                launch = (*gemms[stage], weights.flatten().float(), aligned, top_k, stage == "gate_up", tile, config)
                try:
                    times[stage].append((bench_us(partial(tm._launch_gemm, *launch)), repr(tile), tile))
                except triton.runtime.errors.OutOfResources:
                    continue
            for stage in gemms:
                for t, name, _ in sorted(times[stage])[:4]:
                    print(f"    {stage:7} {t:8.1f} us  {name}")
            (t1, _, tile1), (t2, _, tile2) = min(times["gate_up"]), min(times["down"])
            candidate = tm.MoeConfig(block_m, tile1, tile2, short_tiles=short)
            total = bench_us(partial(tm.fused_moe, *inputs, candidate))
            print(
                f"  {model} T={num_tokens} BLOCK_M={block_m} short={short}: gate_up {t1:.1f} + down {t2:.1f}, "
                f"all {total:.1f} us"
            )
            if best is None or total < best[0]:
                best = (total, candidate)
        table = bench_us(partial(tm.fused_moe, *inputs))
        print(f"best {model} T={num_tokens} ({rows:g} rows/expert): {best[0]:.1f} us (table {table:.1f}) {best[1]}")


def stages(inputs, config: tm.MoeConfig) -> dict:
    """Where the time goes: each stage of `tm.fused_moe` timed alone, and the share of its GEMM rows that are
    tile padding (each expert's group is rounded up to the tile granule; those rows are multiplied too)."""
    x, w13, w2, weights, ids = inputs
    num_experts, top_k = w13.shape[0], ids.shape[1]
    inter, hidden = w2.shape[2], w2.shape[1]
    flat_weights = weights.flatten().float()
    aligned = tm.triton_align(ids, num_experts, config.block_m, config.granule)
    h = torch.empty(aligned.sorted_ids.numel(), inter, dtype=x.dtype, device=DEVICE)
    out = torch.empty(ids.numel(), hidden, dtype=x.dtype, device=DEVICE)
    padded = int(aligned.starts[int(aligned.count)])
    gemm = partial(tm._launch_gemm, weights=flat_weights, tiles=aligned, top_k=top_k, config=config)
    return dict(
        align_us=bench_us(partial(tm.triton_align, ids, num_experts, config.block_m, config.granule)),
        gate_up_us=bench_us(partial(gemm, x, w13, h, gate_up=True, tile=config.gate_up)),
        down_us=bench_us(partial(gemm, h, w2, out, gate_up=False, tile=config.down)),
        combine_us=bench_us(partial(tm.combine, out, top_k)),
        padding_share=1 - ids.numel() / padded,
    )


def parse_config(text: str) -> tm.MoeConfig:
    """A MoeConfig as its repr prints (what `--sweep` reports as best), e.g. for a before/after in one run."""
    config = eval(text, {"__builtins__": {}}, {"MoeConfig": tm.MoeConfig, "GemmTile": tm.GemmTile})
    if not isinstance(config, tm.MoeConfig):
        raise argparse.ArgumentTypeError(f"not a MoeConfig: {text!r}")
    return config


def device_tag(name: str) -> str:
    for tag in ("h200", "h100", "a100", "l40s"):
        if tag in name.lower():
            return tag
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time tile configs per shape, print the best")
    parser.add_argument("--block-m", nargs="+", type=int, default=None, help="sweep only these BLOCK_M")
    parser.add_argument("--tma-only", action="store_true", help="sweep only the wide TMA tiles (prefill shapes)")
    parser.add_argument("--skip-check", action="store_true", help="skip comparing outputs first")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, choices=TOKENS, default=list(TOKENS))
    parser.add_argument(
        "--config",
        type=parse_config,
        default=None,
        help="time this MoeConfig (as the sweep prints it), not the table's",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    if not args.skip_check:
        check(args)
    if args.sweep:
        sweep(args)
        return
    peaks = [(gpu_copy_bandwidth(device), gpu_matmul_rate(device, torch.bfloat16))]
    rows = []
    for model, num_tokens in shapes(args):
        inputs = make_inputs(model, num_tokens)
        ids = inputs[-1]
        num_experts, top_k, hidden, inter = MODELS[model]
        config = args.config or tm.pick_config(num_tokens, hidden, inter, num_experts, top_k)
        ours = bench_us(partial(tm.fused_moe, *inputs, config))
        grouped = bench_us(partial(grouped_mm_moe, *inputs))
        loop = bench_us(partial(moe.fused_moe, *inputs))
        ours_graph, grouped_graph = (
            graph_us(partial(tm.fused_moe, *inputs, config)),
            graph_us(partial(grouped_mm_moe, *inputs)),
        )
        rows.append(
            dict(
                model=model, tokens=num_tokens, experts=num_experts, top_k=top_k, hidden=hidden, intermediate=inter,
                experts_hit=ids.unique().numel(), ours_us=ours, grouped_mm_us=grouped, loop_us=loop,
                speedup_vs_grouped_mm=grouped / ours, ours_graph_us=ours_graph, grouped_mm_graph_us=grouped_graph,
                config=repr(config), stages=stages(inputs, config),
            )
        )  # fmt: skip
    # Measured again after the timings: a floor uses the best rate reached.
    peaks.append((gpu_copy_bandwidth(device), gpu_matmul_rate(device, torch.bfloat16)))
    bandwidth, rate = max(p[0] for p in peaks), max(p[1] for p in peaks)
    for row in rows:
        row["floor_us"], row["floor_bound"] = floor_us(row, bandwidth, rate)
        row["ratio_to_floor"] = row["floor_us"] / row["ours_us"]
        row["grouped_mm_ratio_to_floor"] = row["floor_us"] / row["grouped_mm_us"]
        if row["ours_graph_us"] and row["grouped_mm_graph_us"]:
            row["graph_ratio_to_floor"] = row["floor_us"] / row["ours_graph_us"]
            row["graph_speedup_vs_grouped_mm"] = row["grouped_mm_graph_us"] / row["ours_graph_us"]

    name = torch.cuda.get_device_name(device)
    print(f"\n{name}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    print(f"{'model':14} {'T':>5} {'hit':>4} {'floor us':>9} {'bound':>7} {'ours us':>8} {'grp_mm us':>9} "
          f"{'loop us':>9} {'ours/floor':>10} {'grp/floor':>9} {'speedup':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['model']:14} {r['tokens']:5} {r['experts_hit']:4} {r['floor_us']:9.1f} {r['floor_bound']:>7} "
            f"{r['ours_us']:8.1f} {r['grouped_mm_us']:9.1f} {r['loop_us']:9.1f} {r['ratio_to_floor']:10.2f} "
            f"{r['grouped_mm_ratio_to_floor']:9.2f} {r['speedup_vs_grouped_mm']:8.2f}"
        )
    print("\nreplayed in a CUDA graph (no host launch overhead; the engine's decode step runs MoE layers so)")
    for r in rows:
        if "graph_ratio_to_floor" in r:
            print(
                f"{r['model']:14} {r['tokens']:5} ours {r['ours_graph_us']:8.1f} us, grouped_mm "
                f"{r['grouped_mm_graph_us']:8.1f} us, ours/floor {r['graph_ratio_to_floor']:.2f}, "
                f"speedup {r['graph_speedup_vs_grouped_mm']:.2f}"
            )
    print("\nwhere the time goes (each stage alone, us; padding: share of GEMM rows that are tile padding)")
    for r in rows:
        print(f"{r['model']:14} {r['tokens']:5} " + " ".join(f"{k} {v:.3g}" for k, v in r["stages"].items()))
    result = {
        "benchmark": "MoE experts (gate_up, SiLU*up, down, routing weights, sum over k), bf16",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": name,
        "versions": versions("torch", "triton") | {"cuda": torch.version.cuda},
        "roofline": {
            "copy_bandwidth_bytes_per_s": bandwidth,
            "bf16_matmul_flops": rate,
            "measured": [{"copy_bandwidth_bytes_per_s": b, "bf16_matmul_flops": f} for b, f in peaks],
            "floor": "max(bytes of the experts hit / bandwidth, 2*T*k*3*H*I / matmul rate)",
            "ratio_to_floor": "floor time / measured time (1.0 is the hardware limit)",
        },
        "timing": "triton.testing.do_bench median, L2 flushed before each run; ours includes the align step; "
        "*_graph_us: the same, one call captured in a CUDA graph and replayed (no host launch overhead)",
        "rows": rows,
    }
    out = args.out or RESULTS / f"moe-{device_tag(name)}-{result['date']}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
