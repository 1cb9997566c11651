"""The world-model benchmark: miniengine against the plain-torch reference loop, same weights, same inputs.

A Llama-1B-shaped action-conditioned video model (examples/action_model: 576 image tokens and 6 action
tokens of 3 numbers per frame) with random weights generates 8 videos of 4 frames each after a given first
frame, all videos at once. miniengine runs frame by frame through its prefix cache (video.py); the
reference is the transformers-style loop (reference.py): all videos in one batch, a KV cache that grows by
torch.cat, one forward per token. Both are greedy; the JSON records how many frames agree token for token
(in bfloat16, near-ties can flip a token and everything after it). The floor (bench/roofline.py) is the
least time the hardware allows for the work either must do: each frame's new tokens, then one decode step
per image token, reading every weight and the cached K/V each step; peaks are measured in this run.

    python bench/action_model.py              # Llama-1B shape, bfloat16, on the GPU (the goal: >= 10x the reference)
    python bench/action_model.py --small      # a small shape that runs on a CPU in about a minute
    python bench/action_model.py --small --threads 1    # less sensitive to other processes on a shared CPU

Writes bench/results/action_model-<device>-<date>.json (or --out). Never asserts timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples" / "action_model"))  # works installed or not
from roofline import (  # noqa: E402, I001
    DevicePeak,
    ModelSpec,
    best_peak,
    decode_step_floor,
    gpu_peak,
    measure_cpu_peak,
    measure_gpu_peak,
    step_floor,
)
from report import versions, write_result  # noqa: E402

from miniengine import Engine  # noqa: E402
from miniengine_action_model import register  # noqa: E402
from miniengine_action_model.checkpoint import LLAMA_1B, action_config, make_checkpoint  # noqa: E402
from miniengine_action_model.reference import ReferenceWorldModel  # noqa: E402
from miniengine_action_model.video import generate_videos  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SMALL = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
    image_vocab_size=1024, tokens_per_frame=64, actions_per_frame=6, action_dim=3, max_frames=8,
)  # fmt: skip


def workload_floor(spec: ModelSpec, peak: DevicePeak, config: dict, videos: int, frames: int) -> float:
    """Least seconds for the work: frame t's new tokens (the whole first prompt, then the previous frame's
    last token and the new actions) in one step, then tokens_per_frame - 1 decode steps."""
    per_frame, frame_len = config["tokens_per_frame"], config["tokens_per_frame"] + config["actions_per_frame"]
    total = 0.0
    for t in range(frames):
        prompt = (t + 1) * frame_len
        new = frame_len if t == 0 else config["actions_per_frame"] + 1
        total += step_floor(spec, peak, videos * new, videos, videos * (prompt - new))
        for j in range(1, per_frame):
            total += decode_step_floor(spec, peak, [prompt + j - 1] * videos)
    return total


class Counter:
    """A stat logger: prompt tokens computed and prompt tokens the prefix cache supplied."""

    def __init__(self) -> None:
        self.computed = self.cached = 0

    def record(self, stats) -> None:
        self.computed += stats.num_prompt_tokens
        self.cached += stats.prefix_cache_hits


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small shape for the CPU")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4, help="frames generated per video, after the first")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the fastest is reported")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    register()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = action_config(**(SMALL if args.small else LLAMA_1B))
    if args.frames + 1 > config["max_frames"]:
        raise SystemExit(f"--frames {args.frames}: the model has room for {config['max_frames'] - 1} after the first")
    peak_before = measure_gpu_peak() if device.type == "cuda" else measure_cpu_peak()

    frame_len = config["tokens_per_frame"] + config["actions_per_frame"]
    max_model_len = (args.frames + 1) * frame_len
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, config["image_vocab_size"], (args.videos, config["tokens_per_frame"]), generator=generator)
    shape = (args.videos, args.frames, config["actions_per_frame"], config["action_dim"])
    actions = torch.randn(shape, generator=generator)

    with tempfile.TemporaryDirectory() as directory:
        t0 = time.perf_counter()
        make_checkpoint(directory, config, seed=0, dtype=dtype)
        make_s = time.perf_counter() - t0
        counter = Counter()
        num_blocks = 2 * args.videos * -(-max_model_len // 16)
        t0 = time.perf_counter()
        engine = Engine(directory, dtype=dtype, max_model_len=max_model_len, num_kv_blocks=num_blocks,
                        max_num_seqs=args.videos, stat_loggers=[counter])  # fmt: skip
        engine_load_s = time.perf_counter() - t0
        from safetensors.torch import load_file

        reference = ReferenceWorldModel(config, load_file(f"{directory}/model.safetensors"), device, dtype)

    spec = ModelSpec.from_model(engine.runner.model, engine.hf_config, dtype)
    # Warm-up, untimed: two other videos, one frame each.
    generate_videos(engine, first[:2].flip(1), actions[:2, :1])
    reference.generate(first[:2].flip(1), actions[:2, :1])

    engine_s, reference_s = [], []
    for _ in range(args.repeats):
        engine.reset_prefix_cache()  # no head start from the last run: the reference has none
        counter.computed = counter.cached = 0
        elapsed, ours = timed(lambda: generate_videos(engine, first, actions), device)
        engine_s.append(elapsed)
        elapsed, theirs = timed(lambda: reference.generate(first, actions).cpu(), device)
        reference_s.append(elapsed)

    peak_after = measure_gpu_peak() if device.type == "cuda" else measure_cpu_peak()
    peak = best_peak(peak_before, peak_after)
    floor_s = workload_floor(spec, peak, config, args.videos, args.frames)
    frames, tokens = args.videos * args.frames, args.videos * args.frames * config["tokens_per_frame"]

    def row(seconds: list[float]) -> dict:
        best = min(seconds)
        return {"seconds": best, "all_seconds": seconds, "frames_per_s": frames / best, "tokens_per_s": tokens / best,
                "ratio_to_floor": best / floor_s}  # fmt: skip

    same_frames = (ours == theirs).all(dim=-1)
    result = {
        "benchmark": "action-conditioned world model: miniengine vs the plain-torch reference loop",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else peak.name,
        "versions": versions("torch", "triton", "miniengine"),
        "settings": {
            "shape": "small" if args.small else "Llama-1B",
            "config": config,
            "dtype": str(dtype).removeprefix("torch."),
            "videos": args.videos,
            "frames_generated_per_video": args.frames,
            "tokens_generated": tokens,
            "params": spec.num_params,
            "weights": "random (seeded), the same tensors in both",
            "kv_blocks": num_blocks,
            "checkpoint_write_s": make_s,
            "engine_load_s": engine_load_s,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": [[round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]],
        },
        "peak": {
            "flops": peak.flops,
            "bandwidth_bytes_per_s": peak.bandwidth,
            "source": peak.source,
            "spec_sheet": (gpu_peak(peak.name).__dict__ if device.type == "cuda" and gpu_peak(peak.name) else None),
        },  # fmt: skip
        "floor_s": floor_s,
        "miniengine": dict(
            row(engine_s), prompt_tokens_computed=counter.computed, prompt_tokens_from_prefix_cache=counter.cached
        ),  # fmt: skip
        "reference": row(reference_s),
        "miniengine_over_reference": min(reference_s) / min(engine_s),
        "agreement": {
            "frames_identical": int(same_frames.sum()),
            "frames": frames,
            "tokens_identical": int((ours == theirs).sum()),
            "tokens": tokens,
        },
    }
    print(f"\n{args.videos} videos x {args.frames} frames of {config['tokens_per_frame']} tokens, "
          f"{result['settings']['shape']} ({spec.num_params / 1e6:.0f}M params), {result['settings']['dtype']}, "
          f"{result['device']}; floor {floor_s:.3f} s")  # fmt: skip
    print(f"{'':12} {'seconds':>8} {'frames/s':>9} {'tokens/s':>9} {'x floor':>8}")
    for name in ("miniengine", "reference"):
        r = result[name]
        print(f"{name:12} {r['seconds']:8.2f} {r['frames_per_s']:9.2f} {r['tokens_per_s']:9.1f} "
              f"{r['ratio_to_floor']:8.1f}")  # fmt: skip
    a = result["agreement"]
    print(f"miniengine / reference: {result['miniengine_over_reference']:.2f}x; identical frames "
          f"{a['frames_identical']}/{a['frames']}, tokens {a['tokens_identical']}/{a['tokens']}; prompt tokens "
          f"computed {counter.computed}, from the prefix cache {counter.cached}")  # fmt: skip
    out = args.out or RESULTS / f"action_model-{device.type}-{result['date']}.json"
    write_result(json.loads(json.dumps(result, default=str)), out)


if __name__ == "__main__":
    main()
