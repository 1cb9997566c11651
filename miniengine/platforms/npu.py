"""The NPU platform: Huawei Ascend NPUs through `torch_npu`. Written against torch_npu's public API and
UNVERIFIED ON HARDWARE: nobody has run it on an NPU. Its detection, selection and configuration are tested
against a stand-in `torch_npu` module (tests/test_platforms.py); the first run on a real device may not work.

torch_npu mirrors torch.cuda as `torch.npu` (devices, memory queries, seeding, synchronize) and brings
`hccl` for torch.distributed. Attention is the plain-torch paged attention of the CPU path, except that
decode steps use torch_npu's fused `npu_incre_flash_attention` with a block table (PageAttention) where
torch_npu has it. That kernel reads one layer's cache as `[blocks, block_size, kv_heads * head_dim]` (our
`[blocks, block_size, kv_heads, head_dim]` viewed flat) and wants `block_size` a multiple of 16 for
float16/bfloat16 caches. Graph capture is off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from miniengine.config import EngineConfig
from miniengine.forward_context import Kernels
from miniengine.kernels import moe
from miniengine.kernels.paged_attention import paged_attention_sdpa, store_kv
from miniengine.platforms.interface import Platform

logger = logging.getLogger("miniengine")


def _torch_npu():
    import torch_npu  # noqa: F401  (registers torch.npu and the "npu" device type)

    return torch_npu


def fused_decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata, scale: float
) -> torch.Tensor:
    """`attend` for the NPU: torch_npu's fused PageAttention on half-precision decode steps (one query token
    per sequence), the plain-torch paged attention on everything else."""
    if metadata.max_query_len != 1 or query.dtype not in (torch.float16, torch.bfloat16):
        return paged_attention_sdpa(query, k_cache, v_cache, metadata, scale)
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    state = metadata.backend_state
    if "npu_block_tables" not in state:  # once per step, shared by every layer
        state["npu_block_tables"] = metadata.block_tables.to(torch.int32)
    out = _torch_npu().npu_incre_flash_attention(
        query.reshape(num_tokens, 1, num_heads * head_dim),
        k_cache.view(num_blocks, block_size, num_kv_heads * head_dim),
        v_cache.view(num_blocks, block_size, num_kv_heads * head_dim),
        num_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        scale_value=scale,
        input_layout="BSH",
        block_table=state["npu_block_tables"],
        block_size=block_size,
        actual_seq_lengths=metadata.seq_lens_host,
    )
    return out.view(num_tokens, num_heads, head_dim)


class NpuPlatform(Platform):
    name = "npu"
    device_type = "npu"
    dist_backend = "hccl"
    supports_graphs = False

    @classmethod
    def is_available(cls) -> bool:
        try:
            _torch_npu()
        except ImportError:
            return False
        return bool(torch.npu.is_available())

    @staticmethod
    def has_fused_attention() -> bool:
        return hasattr(_torch_npu(), "npu_incre_flash_attention")

    def device(self) -> torch.device:
        return torch.device("npu", torch.npu.current_device())

    def set_device(self, local_rank: int) -> None:
        torch.npu.set_device(local_rank)

    def default_dtype(self) -> torch.dtype:
        # Atlas A2 (910B) computes in bfloat16; the older inference cards only in float16.
        bf16 = getattr(torch.npu, "is_bf16_supported", lambda: False)()
        return torch.bfloat16 if bf16 else torch.float16

    def kernels(self) -> Kernels:
        attend = fused_decode_attention if self.has_fused_attention() else paged_attention_sdpa
        name = "npu" if attend is fused_decode_attention else "torch"
        return Kernels(name, store_kv, attend, fused_moe=moe.fused_moe)  # the rest: the plain-torch references

    def memory_info(self) -> tuple[int, int]:
        return torch.npu.mem_get_info()

    def reset_peak_memory(self) -> None:
        torch.npu.empty_cache()
        torch.npu.reset_peak_memory_stats()

    def peak_memory(self) -> int:
        return torch.npu.max_memory_allocated()

    def kv_cache_bytes(self, config: EngineConfig, model_bytes: int, profile: Callable[[], int]) -> int:
        """As on CUDA: what is left of `gpu_memory_utilization` x total after the weights, a full step's
        activations and what other users of the device hold."""
        peak = profile()
        torch.npu.empty_cache()
        free, total = torch.npu.mem_get_info()
        held_elsewhere = total - free - torch.npu.memory_reserved()
        return max(int(total * config.gpu_memory_utilization - peak - held_elsewhere), 0)

    def check_and_update_config(self, config: EngineConfig) -> None:
        if not config.enforce_eager:
            logger.info("npu: graph capture is not implemented for the NPU; running eagerly")
            config.enforce_eager = True
        if self.has_fused_attention() and config.block_size % 16:
            aligned = -(-config.block_size // 16) * 16
            logger.warning(
                "npu: block_size %d raised to %d: torch_npu's fused paged attention needs a multiple of 16",
                config.block_size, aligned,
            )  # fmt: skip
            config.block_size = aligned

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.npu.manual_seed_all(seed)

    def synchronize(self) -> None:
        torch.npu.synchronize()
