"""What one all-reduce costs tensor parallelism: NCCL all-reduce of a [rows, hidden] bf16 tensor over N GPUs.

    python bench/allreduce.py                         # 2 GPUs, hidden 4096, rows 1..4096
    python bench/allreduce.py --world-size 2 --hidden 1024 --rows 1 256

A tensor parallel layer sums its row-parallel products twice (after attention's o_proj, after the MLP's down
projection), so a decode step of L layers pays 2L all-reduces of [batch, hidden]. Each size is timed two
ways, as the engine runs it: eagerly (prefill and mixed steps) and replayed from a CUDA graph that holds 64
of them back to back (decode steps); the figure is the mean over many. `bus_GB_per_s` is NCCL's bus bandwidth
(2 (N-1)/N x bytes / time), the number nccl-tests prints. Writes bench/results/allreduce-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import versions, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IN_GRAPH = 64  # all-reduces captured back to back in one graph


def _time(fn, repeats: int) -> float:
    """Mean seconds per call of `fn` (after a warm-up), by the host clock around synchronised runs."""
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _rank(rank: int, world: int, init_method: str, hidden: int, rows: list[int], results) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init_method, world_size=world, rank=rank,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    out = []
    for n in rows:
        x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
        eager = _time(lambda x=x: dist.all_reduce(x), 200)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dist.all_reduce(x)  # NCCL sets up its communicator outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(IN_GRAPH):
                dist.all_reduce(x)
        replayed = _time(graph.replay, 20) / IN_GRAPH
        size = x.numel() * x.element_size()
        out.append({"rows": n, "hidden": hidden, "bytes": size, "eager_us": 1e6 * eager, "in_graph_us": 1e6 * replayed,
                    "bus_GB_per_s": 2 * (world - 1) / world * size / replayed / 1e9})  # fmt: skip
    if rank == 0:
        results.extend(out)
    del graph  # a graph holding NCCL work keeps the communicator: destroying the group first hangs
    gc.collect()
    dist.destroy_process_group()


def measure(world: int, hidden: int, rows: list[int]) -> list[dict]:
    """Per size: microseconds of one all-reduce over `world` GPUs, eager and in a CUDA graph."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(_rank, args=(world, init_method, hidden, rows, results), nprocs=world)
        return sorted(results, key=lambda r: r["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256, 1024, 4096])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if torch.cuda.device_count() < args.world_size:
        sys.exit(f"needs {args.world_size} CUDA GPUs, found {torch.cuda.device_count()}")
    rows = measure(args.world_size, args.hidden, args.rows)
    result = {
        "benchmark": "NCCL all-reduce of a [rows, hidden] bf16 tensor",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"{args.world_size} x {torch.cuda.get_device_name()}",
        "versions": versions("torch", "miniengine") | {"nccl": ".".join(map(str, torch.cuda.nccl.version()))},
        "settings": {"world_size": args.world_size, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")},
        "rows": rows,
    }
    print(f"{'rows':>6} {'bytes':>10} {'eager us':>9} {'graph us':>9} {'bus GB/s':>9}")
    for r in rows:
        print(f"{r['rows']:6} {r['bytes']:10} {r['eager_us']:9.1f} {r['in_graph_us']:9.1f} {r['bus_GB_per_s']:9.1f}")
    gpu = torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0].lower()
    write_result(result, args.out or RESULTS / f"allreduce-{gpu}-x{args.world_size}-{result['date']}.json")


if __name__ == "__main__":
    main()
