"""The CPU platform: plain torch everywhere. It is the reference path and the one CI runs.

What pays on a CPU is chosen here, measured rather than assumed:
- the compute dtype: bfloat16 only where the CPU multiplies it natively (AVX-512 BF16 or AMX, per
  /proc/cpuinfo) and a bf16 matmul of a decode step's shape then beats float32 on this machine; float32
  elsewhere (an AVX2-only CPU converts bf16 in software: slower than float32, at lower precision).
  `dtype=` overrides it, and so does `MINIENGINE_CPU_DTYPE` (the test suite pins float32 with it).
- a packed copy of the weights for steps of few rows (models/quantized.py, `packed_weights`): fp16 for
  fbgemm's GEMM (steps of at most `FP16_MAX_ROWS` rows) where it exists and one row through it beats
  float32 here; else a GGUF's own Q4_0 / Q4_1 / Q8_0 matrices for torch's int4 kernel (`INT4_MAX_ROWS`),
  where that beats float32. fp16 goes first: on the AVX2 EPYC it ties int4 at one row and beats it from 8
  rows on (bench/README.md). `load_format="dense"` (--load-format dense) keeps the float32 weights only;
  `MINIENGINE_CPU_FP16` and `MINIENGINE_CPU_INT4` override the choice: 0 off, N on for steps of <= N rows.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import torch

from miniengine.config import EngineConfig
from miniengine.forward_context import Kernels
from miniengine.kernels import moe
from miniengine.kernels.fp16_matmul import Fp16Weight, fp16_kernel_available, fp16_matmul
from miniengine.kernels.int4_matmul import Int4Rows, Int4Weight, int4_kernel_available, int4_matmul
from miniengine.kernels.paged_attention import paged_attention_sdpa, store_kv
from miniengine.platforms.interface import Platform

DEFAULT_KV_CACHE_GIB = 4.0
# Steps of at most this many rows multiply by the 4-bit copy. On the 2-core AVX2 EPYC (SmolLM2's 30 layers,
# weights from DRAM, bench/README.md) int4 takes 0.3x float32's time at 1 row, about 0.6x at 8, ~1x at 24.
INT4_MAX_ROWS = 16
# fp16 through fbgemm, float32 weights: at 1 thread 0.54x float32's time at 1 row, 0.65x at 32, 0.75x at 64,
# ~0.9x at 128 (the LM head's 49152 rows already lose there), ~1x at 512.
FP16_MAX_ROWS = 64


logger = logging.getLogger("miniengine")


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    supports_graphs = True  # a compiled one-sequence decode step

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
        flag = os.environ.get("MINIENGINE_CPU_COMPILE", "1")
        if flag not in ("0", "1"):
            raise ValueError(f"MINIENGINE_CPU_COMPILE={flag!r} is not 0 (eager decode steps) or 1 (compiled)")
        if flag == "0" or config.tensor_parallel_size > 1:  # collectives stay out of compiled graphs
            config.enforce_eager = True

    def decode_runner(self, runner, max_num_seqs: int, max_model_len: int, capture: bool) -> object | None:
        """A compiled one-sequence decode step, unless `enforce_eager`; if torch cannot compile here (no C++
        compiler, say), decode steps stay eager and the log says why."""
        from miniengine.compiled_decode import CompiledDecode
        from miniengine.models.moe import SparseMoeBlock

        if not capture or any(isinstance(m, SparseMoeBlock) for m in runner.model.modules()):
            return None  # MoE layers (routing by data-dependent shapes) are not measured compiled: eager

        try:
            return CompiledDecode(runner)
        except Exception as error:  # noqa: BLE001 (inductor raises many kinds; any of them means: run eagerly)
            logger.warning("decode steps run eagerly: torch.compile failed (%s: %s)", type(error).__name__, error)
            return None

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

    def matmul(dtype: torch.dtype) -> Callable[[], object]:
        x, w = torch.randn(32, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        return lambda: torch.nn.functional.linear(x, w)

    return _fastest(matmul(torch.bfloat16), 20, 5) < _fastest(matmul(torch.float32), 20, 5)


def packed_weights(dtype: torch.dtype, has_int4: bool) -> tuple[str, int] | None:
    """Which packed copy the linear layers keep ("fp16" or "int4"; `has_int4`: the checkpoint has 4-bit
    matrices), and for steps of up to how many rows; None: the dense weights only. A flag that forces one
    on wins over the measured choice."""
    fp16 = fp16_max_rows() if dtype == torch.float32 else 0
    int4_first = has_int4 and _forced("MINIENGINE_CPU_INT4") and not _forced("MINIENGINE_CPU_FP16")
    if fp16 and not int4_first:
        return "fp16", fp16  # int4's probe (~50 ms of start-up) need not run
    int4 = int4_max_rows() if has_int4 else 0
    if int4:
        return "int4", int4
    return ("fp16", fp16) if fp16 else None


def fp16_max_rows() -> int:
    """Steps of at most this many rows multiply by fp16 copies of the float32 weights; 0: keep none."""
    forced = _forced("MINIENGINE_CPU_FP16")
    if forced is not None:
        return forced if fp16_kernel_available() else 0
    return FP16_MAX_ROWS if fp16_matmul_pays() else 0


def int4_max_rows() -> int:
    """Steps of at most this many rows multiply by a GGUF's 4-bit weights; 0: keep no 4-bit copy."""
    forced = _forced("MINIENGINE_CPU_INT4")
    if forced is not None:
        return forced if int4_kernel_available() else 0
    return INT4_MAX_ROWS if int4_matmul_pays() else 0


def _forced(flag: str) -> int | None:
    """A flag's number of rows (0: off), or None when it is not set."""
    value = os.environ.get(flag)
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{flag}={value!r} is not a number of rows (0: off)")
    return int(value)


@functools.cache
def fp16_matmul_pays() -> bool:
    """About 0.3 s (mostly packing), once per process: torch has fbgemm's fp16 GEMM, and one row through 12
    weights of SmolLM2's MLP shape (1536 x 576, read from memory as a decode step reads them) is faster
    through their fp16 copies than through float32 here."""
    if not fp16_kernel_available():
        return False
    dense = [torch.ones(1536, 576) for _ in range(12)]
    copies = [Fp16Weight.pack(w) for w in dense]
    x = torch.ones(1, 576)

    fp16 = _fastest(lambda: [fp16_matmul(x, w) for w in copies], 4, 1)
    return fp16 < _fastest(lambda: [torch.nn.functional.linear(x, w) for w in dense], 4, 1)


@functools.cache
def int4_matmul_pays() -> bool:
    """Some 50 ms, once per process: torch has the int4 kernel, and one row through 12 weights of SmolLM2's
    MLP shape (1536 x 576; 42 MB in float32, so read from memory as a decode step reads them, not from the
    cache) is faster through their 4-bit copies than through float32 here."""
    if not int4_kernel_available():
        return False
    q = torch.zeros(1536, 576, dtype=torch.uint8)
    copies = [Int4Weight.pack(Int4Rows(q, torch.ones(1536, 18), torch.zeros(1536, 18))) for _ in range(12)]
    dense = [torch.ones(1536, 576) for _ in range(12)]
    x = torch.ones(1, 576)

    int4 = _fastest(lambda: [int4_matmul(x, w) for w in copies], 4, 1)
    return int4 < _fastest(lambda: [torch.nn.functional.linear(x, w) for w in dense], 4, 1)


def _fastest(run: Callable[[], object], times: int, warm_up: int) -> float:
    """The least seconds `run` took in `times` calls, the first `warm_up` not counted."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return min(seconds[warm_up:])
