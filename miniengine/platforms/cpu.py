"""The CPU platform: plain torch everywhere. It is the reference path and the one CI runs.

What pays on a CPU is chosen here, measured rather than assumed:
- the compute dtype: bfloat16 only where the CPU multiplies it natively (AVX-512 BF16 or AMX, per
  /proc/cpuinfo) and a bf16 matmul of a decode step's shape then beats float32 on this machine; float32
  elsewhere (an AVX2-only CPU converts bf16 in software: slower than float32, at lower precision).
  `dtype=` overrides it, and so does `MINIENGINE_CPU_DTYPE` (the test suite pins float32 with it).
- packed copies of the weights for steps of few rows (models/quantized.py; `packed_weights`): fp16 for
  fbgemm's GEMM (float32 weights; steps of at most `FP16_MAX_ROWS` rows) where one row through it beats
  float32 here, and a GGUF's own Q4_0 / Q4_1 / Q8_0 matrices for torch's int4 kernel where one row through
  them beats float32 (and fp16, if kept: then for steps of at most `INT4_BESIDE_FP16_ROWS` rows, since fp16
  wins from a few rows on; alone, `INT4_MAX_ROWS`, or `INT4_MAX_ROWS_BF16` beside bf16 weights).
  `load_format="dense"` (--load-format dense) keeps the dense weights only; `MINIENGINE_CPU_FP16` and
  `MINIENGINE_CPU_INT4` override the measurement: 0 off, N on for steps of <= N rows.
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
# ... and where the dense weights are bf16 (a CPU that multiplies bf16 natively), whose matmul costs half of
# float32's: on the 2-core Xeon (AMX, SmolLM2's 30 layers' shapes, 2 threads) int4 took 0.43x dense bf16's time
# at 4 rows, 0.84x at 8, 1.11x at 12 and 1.46x at 16 (against float32: 0.67x at 16, 0.90x at 24).
INT4_MAX_ROWS_BF16 = 8
# ... and beside an fp16 copy, which beats it from a few rows on (the kernel unpacks each weight once per row).
INT4_BESIDE_FP16_ROWS = 2
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


def packed_weights(dtype: torch.dtype, has_int4: bool) -> dict[str, int]:
    """The packed copies the linear layers keep, each for steps of up to how many rows, e.g. `{"fp16": 64,
    "int4": 2}` (models/quantized.py, `TieredWeight`: the fewest rows take the smallest copy that covers
    them); empty: the dense weights only. `has_int4`: the checkpoint has 4-bit matrices. fp16 needs float32
    weights (fbgemm takes float32 activations). A copy is kept where one row through it beats the dense
    weights in `dtype` (and, for int4 beside fp16, beats fp16) in `one_row_seconds`; `MINIENGINE_CPU_FP16`
    and `MINIENGINE_CPU_INT4` override the measurement (0: off, N: steps of up to N rows)."""
    forced = {"fp16": _forced("MINIENGINE_CPU_FP16"), "int4": _forced("MINIENGINE_CPU_INT4")}
    usable = {
        "fp16": dtype == torch.float32 and fp16_kernel_available(),
        "int4": has_int4 and int4_kernel_available(),
    }
    tiers = {kind: rows for kind, rows in forced.items() if rows and usable[kind]}
    measured = [kind for kind in ("fp16", "int4") if forced[kind] is None and usable[kind]]
    if measured:
        kinds = tuple(kind for kind in ("fp16", "int4") if usable[kind] and forced[kind] != 0)
        seconds = one_row_seconds(kinds, dtype, torch.get_num_threads())
        if "fp16" in measured and seconds["fp16"] < seconds["dense"]:
            tiers["fp16"] = FP16_MAX_ROWS
        if "int4" in measured and seconds["int4"] < seconds["dense"]:
            if "fp16" not in tiers:
                tiers["int4"] = INT4_MAX_ROWS if dtype == torch.float32 else INT4_MAX_ROWS_BF16
            elif seconds["int4"] < seconds["fp16"]:
                tiers["int4"] = INT4_BESIDE_FP16_ROWS
    return tiers


def _forced(flag: str) -> int | None:
    """A flag's number of rows (0: off), or None when it is not set."""
    value = os.environ.get(flag)
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{flag}={value!r} is not a number of rows (0: off, N: steps of up to N rows)")
    return int(value)


@functools.cache
def one_row_seconds(kinds: tuple[str, ...], dtype: torch.dtype, threads: int) -> dict[str, float]:
    """About 0.3 s (mostly packing), once per process, dtype and thread count (the kernels split their work
    over torch's threads, each its own way): the seconds one row of `dtype` takes through 12 weights of
    SmolLM2's MLP shape (1536 x 576; 42 MB in float32, so read from memory as a decode step reads them, not
    from the cache), dense in `dtype` ("dense", always measured) and through each packed copy in `kinds`
    ("fp16", "int4"). The candidates run in turns, best of 8 each, so a burst of load elsewhere hits all
    alike."""
    g = torch.Generator().manual_seed(0)
    dense = [(torch.randn(1536, 576, generator=g) * 0.05).to(dtype) for _ in range(12)]
    x = torch.randn(1, 576, generator=g).to(dtype)
    runs: dict[str, Callable[[], object]] = {"dense": lambda: [torch.nn.functional.linear(x, w) for w in dense]}
    if "fp16" in kinds:
        fp16 = [Fp16Weight.pack(w.float()) for w in dense]
        runs["fp16"] = lambda: [fp16_matmul(x, w) for w in fp16]
    if "int4" in kinds:
        q = torch.randint(0, 16, (1536, 576), dtype=torch.uint8, generator=g)
        int4 = [Int4Weight.pack(Int4Rows(q, torch.rand(1536, 18) * 0.01, torch.zeros(1536, 18))) for _ in dense]
        runs["int4"] = lambda: [int4_matmul(x, w) for w in int4]
    best = dict.fromkeys(runs, float("inf"))
    for turn in range(9):
        for kind, run in runs.items():
            start = time.perf_counter()
            run()
            if turn:  # the first turn warms up
                best[kind] = min(best[kind], time.perf_counter() - start)
    return best


def _fastest(run: Callable[[], object], times: int, warm_up: int) -> float:
    """The least seconds `run` took in `times` calls, the first `warm_up` not counted."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return min(seconds[warm_up:])
