"""The CUDA platform: NVIDIA GPUs, with miniengine's own Triton kernels and CUDA graphs for decode steps.

Memory: the KV cache gets what is left of `gpu_memory_utilization` x total memory after the weights and a
profiling forward pass of a full step (activations, logits, sampling scratch), less what other users of the
GPU hold (the CUDA context, NCCL, other processes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from miniengine.config import EngineConfig
from miniengine.forward_context import Kernels
from miniengine.platforms.interface import Platform

if TYPE_CHECKING:
    from miniengine.model_runner import ModelRunner


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    supports_graphs = True
    runs_asynchronously = True
    compiles_kernels = True

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def set_device(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def decode_runner(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int, capture: bool) -> object:
        from miniengine.cuda_graph import CudaGraphRunner

        # The LM head goes into the graph, except where its logits are gathered across ranks.
        logits = runner.config.tensor_parallel_size == 1
        return CudaGraphRunner(runner, max_num_seqs, max_model_len, capture, logits)

    def kernels(self) -> Kernels:
        from miniengine.kernels import triton_fused_ops as ops
        from miniengine.kernels import triton_moe
        from miniengine.kernels.triton_paged_attention import paged_attention, store_kv

        rotary_store = ops.rotary_store if ops.fusing() else None  # MINIENGINE_CUDA_FUSE=0: rotary, then store_kv
        return Kernels("triton", store_kv, paged_attention, ops.rms_norm, ops.rotary, ops.silu_and_mul,
                       triton_moe.fused_moe, ops.qk_norm_rotary, rotary_store)  # fmt: skip

    def memory_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info()

    def reset_peak_memory(self) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated()

    def kv_cache_bytes(self, config: EngineConfig, model_bytes: int, profile: Callable[[], int]) -> int:
        peak = profile()  # weights + a full step's activations
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        held_elsewhere = total - free - torch.cuda.memory_reserved()
        return max(int(total * config.gpu_memory_utilization - peak - held_elsewhere), 0)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds every CUDA device too

    def synchronize(self) -> None:
        torch.cuda.synchronize()
