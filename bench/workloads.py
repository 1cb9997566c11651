"""Shared pieces of the GPU benchmarks: the standard offline workload, its roofline floor, and a profile
summary that says where a run's time goes.

The offline workload everyone quotes: N prompts of random token ids, prompt lengths uniform in [a, b],
output lengths uniform in [c, d], generated with ignore_eos, seed 0.

Its floor: every prompt token costs 2 x params FLOPs at the measured matmul rate; then, in the ideal
schedule where all sequences decode together, decode step j (j = 1 .. longest output - 1) reads all
weights plus the KV cache of every sequence still running, or does 2 x params FLOPs per running sequence,
whichever takes longer at the measured bandwidth / matmul rate.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def random_workload(num: int, vocab: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*input_len))] for _ in range(num)]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(num)])


def offline_floor(spec, bandwidth: float, matmul_rate: float, workload: Workload) -> dict:
    """Seconds the hardware needs at least (see the module docstring); `spec` is roofline.ModelSpec."""
    prompt_lens = np.array([len(p) for p in workload.prompts])
    outputs = np.array(workload.output_lens)
    prefill = (2 * spec.body_params * prompt_lens.sum() + 2 * spec.head_params * len(prompt_lens)) / matmul_rate
    decode = 0.0
    for j in range(1, int(outputs.max())):
        running = outputs > j
        kv_tokens = (prompt_lens[running] + j - 1).sum()
        read = spec.weight_bytes + kv_tokens * spec.kv_bytes_per_token
        decode += max(read / bandwidth, 2 * spec.num_params * running.sum() / matmul_rate)
    return {"prefill_s": float(prefill), "decode_s": float(decode), "total_s": float(prefill + decode)}


_CATEGORIES = [  # (category, substrings of kernel names), first match wins
    ("attention", ("paged_attention", "attention", "reduce_split", "store_kv", "flash", "sdpa", "fmha")),
    ("moe", ("moe", "grouped", "align")),
    ("matmul", ("gemm", "gemv", "cutlass", "sm90", "nvjet", "matmul", "cublas")),
    ("norm/rotary/act", ("rms_norm", "rotary", "silu", "norm")),
    ("sampling", ("argmax", "softmax", "exponential", "topk", "sort", "cumsum", "scatter", "gather", "distribution")),
    ("copies", ("memcpy", "memset", "copy", "fill")),
]


def profile_summary(prof, wall_s: float) -> dict:
    """GPU kernel time by category from a torch.profiler run, and how much of the wall time the GPU idled."""
    by_category: dict[str, float] = defaultdict(float)
    top: list[tuple[float, str]] = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if not device_us:
            continue
        name = event.key.lower()
        category = next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other")
        by_category[category] += device_us / 1e6
        top.append((device_us / 1e6, event.key[:80]))
    busy = sum(by_category.values())
    return {
        "wall_s": wall_s,
        "gpu_busy_s": busy,
        "gpu_idle_fraction": max(0.0, 1 - busy / wall_s) if wall_s else 0.0,
        "gpu_time_by_category_s": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels_s": [[round(t, 4), name] for t, name in sorted(top, reverse=True)[:12]],
    }
