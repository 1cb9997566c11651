"""Single-sequence latency on the GPU: ms per output token, beside the weight-read floor and transformers.

    python bench/latency.py                          # Qwen3-0.6B and Llama-3-8B shapes, random weights
    python bench/latency.py --presets qwen3-0.6b --tensor-parallel-size 2
    python bench/latency.py --skip-hf --compare-sync  # also synchronous steps (async scheduling off), same run
    python bench/latency.py --compare-fused           # also with the fused decode kernels on, same run
    python bench/latency.py --compare-env MINIENGINE_CUDA_PDL=0 "MINIENGINE_CUDA_FUSE=0 MINIENGINE_CUDA_PDL=0"
                                                      # also each of these settings, same run

One request: a 512-token prompt of random ids, 128 tokens out (greedy, ignore_eos). ms/token counts the decode
steps only (first token to last), so prefill is not in it. The floor of a decode step is reading every weight
and the KV cache so far once, at the copy bandwidth measured in this run; `ratio_to_floor` = floor / measured.
transformers' eager `generate` on the same config (its own random weights) is timed the same way: (time for
128 tokens - time for 1 token) / 127. With `--tensor-parallel-size N` the same run also times one all-reduce
of a [1, hidden] row over the N GPUs in a CUDA graph (bench/allreduce.py): `allreduce_ms_per_step` is the
2 x layers of them a decode step makes. Writes bench/results/latency-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allreduce  # noqa: E402
from presets import hf_config, model_dir  # noqa: E402
from report import versions, write_result  # noqa: E402
from roofline import ModelSpec, gpu_copy_bandwidth  # noqa: E402

from miniengine import Engine, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def ours(name: str, prompt: list[int], out_len: int, tp: int, **engine_options) -> tuple[float, float, Engine]:
    directory = model_dir(name, Path(tempfile.mkdtemp()))
    options = dict(load_format="dummy", max_num_seqs=8, max_model_len=4096, stat_loggers=[], **engine_options)
    if tp > 1:
        options["tensor_parallel_size"] = tp
    engine = Engine(str(directory), **options)
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    engine.generate(prompt, params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(3):
        times = []
        engine.reset_prefix_cache()
        for _ in engine.stream(prompt, params):
            times.append(time.perf_counter())
        best = min(best, (times[-1] - times[0]) / (len(times) - 1))
    return best, times[0], engine


@contextlib.contextmanager
def environment(setting: str):
    """Set 'VAR=VALUE VAR2=VALUE2' for the block, then restore what was there."""
    pairs = dict(item.split("=", 1) for item in setting.split())
    previous = {name: os.environ.get(name) for name in pairs}
    os.environ.update(pairs)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def release(engine: Engine) -> None:
    engine.shutdown()  # stops the tensor parallel workers
    del engine
    gc.collect()  # the engine's runner and graphs hold each other: free the KV cache before the next model loads
    torch.cuda.empty_cache()


@torch.inference_mode()
def transformers_ms(name: str, prompt: list[int], out_len: int) -> float:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):  # random init on the GPU: minutes on the host for 8B parameters
        model = AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt], device="cuda")

    def run(n: int, model=model) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)
    per_token = min(run(out_len) - run(1) for _ in range(2)) / (out_len - 1)
    del model
    torch.cuda.empty_cache()
    return per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["qwen3-0.6b", "llama-3-8b"])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--compare-sync", action="store_true", help="also time synchronous steps (async off)")
    parser.add_argument(
        "--compare-fused", action="store_true", help="also time the decode with fused kernels (MINIENGINE_CUDA_FUSE=1)"
    )
    parser.add_argument(
        "--compare-env", nargs="+", default=[], metavar="'VAR=VALUE ...'",
        help="also time the decode under each of these environment settings (space-separated within one)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bandwidth = gpu_copy_bandwidth(torch.device("cuda"))
    rows = []
    for name in args.presets:
        prompt = [random.Random(0).randrange(1000, 30000) for _ in range(args.prompt_len)]
        per_token, _, engine = ours(name, prompt, args.output_len, args.tensor_parallel_size)
        spec = ModelSpec.from_model(engine.runner.model, engine.hf_config, engine.dtype)
        overlapped = engine.async_scheduling is not None
        engine_hidden = engine.hf_config.hidden_size
        release(engine)
        sync_ms = None
        if args.compare_sync and overlapped:  # the same run with synchronous steps, for the overlap's gain
            sync_per_token, _, engine = ours(name, prompt, args.output_len, 1, async_scheduling=False)
            sync_ms = 1e3 * sync_per_token
            release(engine)
        variants = {}  # the same run under other kernel settings (fusion, dependent launches)
        for setting in args.compare_env + (["MINIENGINE_CUDA_FUSE=1"] if args.compare_fused else []):
            with environment(setting):
                variant_per_token, _, engine = ours(name, prompt, args.output_len, args.tensor_parallel_size)
            variants[setting] = 1e3 * variant_per_token
            release(engine)
        mean_context = args.prompt_len + args.output_len / 2
        # With tensor parallelism each GPU reads its shard at once: engine.runner.model is rank 0's shard, so
        # the spec's bytes (weights and KV per token) are already one GPU's share.
        floor = (spec.weight_bytes + mean_context * spec.kv_bytes_per_token) / bandwidth
        row = {"preset": name, "ms_per_token": 1e3 * per_token, "floor_ms": 1e3 * floor,
               "ratio_to_floor": floor / per_token, "tensor_parallel_size": args.tensor_parallel_size,
               "async_scheduling": overlapped}  # fmt: skip
        if variants:
            row["variants"] = [{"env": setting, "ms_per_token": ms, "ratio_to_floor": 1e3 * floor / ms}
                               for setting, ms in variants.items()]  # fmt: skip
        if sync_ms is not None:
            row["sync_ms_per_token"] = sync_ms
            row["sync_ratio_to_floor"] = 1e3 * floor / sync_ms
        if args.tensor_parallel_size > 1:  # what the step's 2 x layers all-reduces of one row cost, same run
            one_row = allreduce.measure(args.tensor_parallel_size, engine_hidden, [1])[0]["in_graph_us"]
            row["allreduce_us"] = one_row
            row["allreduce_ms_per_step"] = 2 * spec.num_layers * one_row / 1e3
        if not args.skip_hf:
            row["transformers_ms_per_token"] = 1e3 * transformers_ms(name, prompt, args.output_len)
        rows.append(row)
        print(row)
    result = {
        "benchmark": "single-sequence decode latency",
        "date": datetime.date.today().isoformat(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "versions": versions("torch", "triton", "miniengine"),
        "settings": {
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "dtype": "bfloat16",
            "weights": "random (load_format=dummy)",
        },  # fmt: skip
        "measured_copy_bandwidth_bytes_per_s": bandwidth,
        "rows": rows,
    }
    print(f"{'preset':14} {'ms/token':>9} {'floor ms':>9} {'ratio':>6} {'sync ms':>8} {'transformers ms':>16}")
    for r in rows:
        hf, sync = r.get("transformers_ms_per_token"), r.get("sync_ms_per_token")
        print(f"{r['preset']:14} {r['ms_per_token']:9.3f} {r['floor_ms']:9.3f} {r['ratio_to_floor']:6.2f} "
              f"{'' if sync is None else f'{sync:8.3f}':>8} {'' if hf is None else f'{hf:16.2f}'}")  # fmt: skip
        for v in r.get("variants", []):
            print(f"  {v['env']:40} {v['ms_per_token']:9.3f} ms/token  ratio {v['ratio_to_floor']:.2f}")
    gpu = result["device"].replace("NVIDIA ", "").split()[0].lower()
    tp = f"-tp{args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    out = args.out or RESULTS / f"latency{tp}-{gpu}-{result['date']}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
