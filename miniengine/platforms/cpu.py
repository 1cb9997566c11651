"""The CPU platform: plain torch everywhere. It is the reference path and the one CI runs.

What pays on a CPU is chosen here, measured rather than assumed:
- the compute dtype: bfloat16 only where the CPU multiplies it natively (AVX-512 BF16 or AMX, per
  /proc/cpuinfo) and a bf16 matmul of a decode step's shape then beats float32 on this machine; float32
  elsewhere (an AVX2-only CPU converts bf16 in software: slower than float32, at lower precision).
  `dtype=` overrides it, and so does `MINIENGINE_CPU_DTYPE` (the test suite pins float32 with it).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch

from miniengine.config import EngineConfig
from miniengine.forward_context import Kernels
from miniengine.kernels import moe
from miniengine.kernels.paged_attention import paged_attention_sdpa, store_kv
from miniengine.platforms.interface import Platform

DEFAULT_KV_CACHE_GIB = 4.0


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def default_dtype(self) -> torch.dtype:
        forced = os.environ.get("MINIENGINE_CPU_DTYPE")
        if forced:
            if forced not in ("float32", "bfloat16"):
                raise ValueError(f"MINIENGINE_CPU_DTYPE={forced!r} is not one of float32, bfloat16")
            return getattr(torch, forced)
        return torch.bfloat16 if native_bf16() and bf16_matmul_pays() else torch.float32

    @classmethod
    def is_available(cls) -> bool:
        return True

    def kernels(self) -> Kernels:
        return Kernels("torch", store_kv, paged_attention_sdpa, fused_moe=moe.fused_moe)

    def memory_info(self) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def check_and_update_config(self, config: EngineConfig) -> None:
        config.enforce_eager = True  # no graph capture on the CPU

    def kv_cache_bytes(self, config: EngineConfig, model_bytes: int, profile: Callable[[], int]) -> int:
        """`MINIENGINE_CPU_KV_CACHE_GIB` (default 4 GiB), never more than half the memory still available."""
        wanted = float(os.environ.get("MINIENGINE_CPU_KV_CACHE_GIB", DEFAULT_KV_CACHE_GIB)) * 2**30
        try:
            available, _ = self.memory_info()
        except (ValueError, OSError):
            return int(wanted)
        return int(min(wanted, available * config.gpu_memory_utilization / 2))


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (torch's oneDNN matmuls use them)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


@functools.cache
def bf16_matmul_pays() -> bool:
    """A few milliseconds, once per process: is a bf16 matmul of a decode step's shape (32 tokens through a
    576 x 1536 weight, SmolLM2's MLP) faster than float32's here?"""

    def best(dtype: torch.dtype) -> float:
        x, w = torch.randn(32, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - start)
        return min(times[5:])

    return best(torch.bfloat16) < best(torch.float32)
