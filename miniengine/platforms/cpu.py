"""The CPU platform: plain torch everywhere. It is the reference path and the one CI runs."""

from __future__ import annotations

import os
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
        return torch.float32  # bf16 matmuls are slow on CPUs without AMX

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
