"""The CPU platform: plain torch everywhere. It is the reference path and the one CI runs."""

from __future__ import annotations

import os

import torch

from miniengine.forward_context import AttentionBackend
from miniengine.kernels.paged_attention import paged_attention_sdpa, store_kv
from miniengine.platforms.interface import Platform

DEFAULT_KV_CACHE_GIB = 4.0


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def default_dtype(self) -> torch.dtype:
        return torch.float32  # bf16 matmuls are slow on CPUs without AMX

    def attention_backend(self) -> AttentionBackend:
        return AttentionBackend("torch-sdpa", store_kv, paged_attention_sdpa)

    def kv_cache_bytes(self, memory_utilization: float, model_bytes: int) -> int:
        """`MINIENGINE_CPU_KV_CACHE_GIB` (default 4 GiB), never more than half the memory still available."""
        wanted = float(os.environ.get("MINIENGINE_CPU_KV_CACHE_GIB", DEFAULT_KV_CACHE_GIB)) * 2**30
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return int(wanted)
        return int(min(wanted, available * memory_utilization / 2))
