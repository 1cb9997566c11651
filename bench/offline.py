"""Offline throughput of a real model shape (random weights) on the standard random workload, on the GPU.

    python bench/throughput.py --preset qwen3-0.6b                  # 256 prompts, 100..1024 in, 100..1024 out
    python bench/throughput.py --preset qwen3-0.6b --hf-prompts 64  # and transformers' continuous batching
    python bench/throughput.py --preset qwen3-0.6b --profile        # where the time goes (torch.profiler)

miniengine loads the preset's config with `load_format="dummy"`; transformers (the peer) builds the same
config with its own random weights. Both generate exactly each request's output length (ignore_eos). The
floor (workloads.offline_floor) uses the bandwidth and matmul rate measured in this run; `ratio_to_floor`
is floor time / measured time (1.0 is the hardware limit). The workload runs twice and the second run is
timed: the first compiles the Triton kernel variants it meets (reported as `cold_run_s`). With
`--tensor-parallel-size N` the floor is one GPU's: the model spec is rank 0's shard, which each GPU reads in
parallel with the others.
Writes bench/results/throughput-<preset>-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import hf_config, model_dir  # noqa: E402
from report import versions, write_result  # noqa: E402
from roofline import ModelSpec, gpu_copy_bandwidth, gpu_matmul_rate  # noqa: E402
from workloads import offline_floor, profile_summary, random_workload  # noqa: E402

from miniengine import Engine, SamplingParams  # noqa: E402
from miniengine.sampler import Sampled  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class PhaseTimer:
    """Host time of each phase of a step: preparation + launch of the forward and LM head (forward), sampling
    queued (sample), waiting for the sampled ids (the one sync of a step; with async scheduling the next step
    runs meanwhile), and the engine's own work (scheduling, detokenising, outputs)."""

    def __init__(self, engine: Engine) -> None:
        self.totals = {"step": 0.0, "forward": 0.0, "launch": 0.0, "wait for ids": 0.0}
        self.steps = 0
        step, forward = engine._step, engine.runner.execute  # generate() loops on _step
        launch = getattr(engine.runner, "launch", None)  # none with tensor parallel: execute returns the logits

        def timed(key, fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.totals[key] += time.perf_counter() - start

            return wrapper

        def timed_step(*args):
            self.steps += 1
            return timed("step", step)(*args)

        engine._step, engine.runner.execute = timed_step, timed("forward", forward)
        if launch is not None:  # runner.run (no async scheduling) calls launch too
            engine.runner.launch = timed("launch", launch)
        Sampled.results = timed("wait for ids", Sampled.results)  # for the whole process: one timer per run

    def summary(self) -> dict:
        t = dict(self.totals)
        launched = t.pop("launch")
        t["sample"] = launched - t["forward"] if launched else 0.0  # launch() includes execute()
        t["engine (schedule, detokenize, outputs)"] = t.pop("step") - t["forward"] - t["sample"] - t["wait for ids"]
        return {"steps": self.steps, "host_seconds": t}


def run_hf(name: str, workload, dtype) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    with torch.device("cuda"):  # random init on the GPU: minutes on the host for 8B parameters
        model = AutoModelForCausalLM.from_config(hf_config(name), dtype=dtype).eval()
    longest = max(workload.output_lens)
    config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=longest)
    hints = WorkloadHints(
        max_prompt_length=max(len(p) for p in workload.prompts),
        max_generated_length=max(workload.output_lens),
        num_requests=len(workload.prompts),
    )
    manager = model.continuous_batching_context_manager(
        generation_config=config, block=True, timeout=5, workload_hints=hints
    )
    with manager as m:
        start = time.perf_counter()
        ids = [m.add_request(p, max_new_tokens=o) for p, o in zip(workload.prompts, workload.output_lens)]
        done, tokens = set(), 0
        while len(done) < len(ids):
            result = m.get_result(timeout=1)
            if result is not None and result.is_finished() and result.request_id not in done:
                done.add(result.request_id)
                tokens += len(result.generated_tokens)
            elif result is None and not m.is_running():
                raise RuntimeError("transformers' continuous batching loop stopped")
        elapsed = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return {"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, nargs=2, default=(100, 1024))
    parser.add_argument("--output-len", type=int, nargs=2, default=(100, 1024))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-async-scheduling", action="store_true", help="synchronous steps (for a before/after)")
    parser.add_argument("--hf-prompts", type=int, default=0, help="run transformers on the first N prompts (0: skip)")
    parser.add_argument("--profile", action="store_true", help="also profile a short run and say where time goes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda")
    bandwidth, rate = gpu_copy_bandwidth(device), gpu_matmul_rate(device)
    directory = model_dir(args.preset, Path(tempfile.mkdtemp()))
    start = time.perf_counter()
    options = dict(load_format="dummy", max_num_seqs=args.max_num_seqs, stat_loggers=[],
                   max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager)  # fmt: skip
    if args.no_async_scheduling:
        options["async_scheduling"] = False
    if args.tensor_parallel_size > 1:
        options["tensor_parallel_size"] = args.tensor_parallel_size
    engine = Engine(str(directory), **options)
    load_s = time.perf_counter() - start
    vocab = engine.hf_config.vocab_size
    workload = random_workload(args.num_prompts, vocab, tuple(args.input_len), tuple(args.output_len), args.seed)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in workload.output_lens]
    # A first pass over the whole workload compiles every Triton kernel variant it needs (tile plans and
    # split counts depend on the batch's shape): it is timed apart, as the cold run.
    start = time.perf_counter()
    engine.generate(workload.prompts, params, use_tqdm=False)
    cold_s = time.perf_counter() - start

    timer = PhaseTimer(engine)
    engine.reset_prefix_cache()
    start = time.perf_counter()
    outs = engine.generate(workload.prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == workload.num_output_tokens, "every request must produce exactly its output length"
    spec = ModelSpec.from_model(engine.runner.model, engine.hf_config, engine.dtype)
    floor = offline_floor(spec, bandwidth, rate, workload)
    ours = {
        "seconds": elapsed,
        "output_tokens": produced,
        "output_tokens_per_s": produced / elapsed,
        "ratio_to_floor": floor["total_s"] / elapsed,
        "load_s": load_s,
        "cold_run_s": cold_s,
        **timer.summary(),
    }
    result: dict = {
        "benchmark": "offline throughput, random workload",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(),
        "versions": versions("torch", "triton", "transformers", "miniengine"),
        "settings": {
            "preset": args.preset,
            "dtype": str(engine.dtype),
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "tensor_parallel_size": args.tensor_parallel_size,
            "cuda_graphs": not args.enforce_eager,
            "async_scheduling": engine.async_scheduling is not None,
            "num_kv_blocks": engine.block_manager.num_blocks,
            "prompt_tokens": sum(len(p) for p in workload.prompts),
        },  # fmt: skip
        "measured_peaks": {"copy_bandwidth_bytes_per_s": bandwidth, "bf16_matmul_flops": rate},
        "floor": floor,
        "miniengine": ours,
    }
    print(f"{args.preset} on {result['device']}: {produced} tokens in {elapsed:.1f} s = "
          f"{ours['output_tokens_per_s']:.0f} tok/s, floor {floor['total_s']:.1f} s, ratio_to_floor "
          f"{ours['ratio_to_floor']:.2f}; host: {ours['host_seconds']}")  # fmt: skip
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        sub = random_workload(64, vocab, tuple(args.input_len), (128, 128), args.seed + 1)
        sub_params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in sub.output_lens]
        engine.reset_prefix_cache()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            engine.generate(sub.prompts, sub_params, use_tqdm=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        result["profile"] = {"workload": "64 prompts, 128 tokens out", **profile_summary(prof, wall)}
        print(json.dumps(result["profile"], indent=1))
    engine.shutdown()  # stops the tensor parallel workers
    if args.hf_prompts:
        del engine
        torch.cuda.empty_cache()
        from workloads import Workload

        sub = Workload(workload.prompts[: args.hf_prompts], workload.output_lens[: args.hf_prompts])
        try:
            result["transformers"] = {"num_prompts": args.hf_prompts, **run_hf(args.preset, sub, torch.bfloat16)}
            print(f"transformers continuous batching ({args.hf_prompts} prompts): "
                  f"{result['transformers']['output_tokens_per_s']:.0f} tok/s")  # fmt: skip
        except Exception as error:  # the peer is reported, not fatal: our figures stand on their own
            result["transformers"] = {"error": repr(error)}
            print(f"transformers failed: {error!r}")
    gpu = result["device"].replace("NVIDIA ", "").split()[0].lower()
    out = args.out or RESULTS / f"throughput-{args.preset}-{gpu}-{result['date']}.json"
    write_result(result, out)


if __name__ == "__main__":
    main()
