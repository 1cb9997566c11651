"""What differs from one device to another, in one place: the Platform interface.

The engine never asks "is this CUDA?": it asks the platform for its torch device, its default dtype,
its attention backend, how much memory the KV cache may take, and how processes talk to each other.
"""

from __future__ import annotations

import torch

from miniengine.forward_context import AttentionBackend


class Platform:
    name: str = "base"
    device_type: str = "cpu"  # torch device type
    dist_backend: str = "gloo"  # torch.distributed backend for tensor parallel workers
    supports_graphs: bool = False

    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def default_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def attention_backend(self) -> AttentionBackend:
        raise NotImplementedError

    def kv_cache_bytes(self, memory_utilization: float, model_bytes: int) -> int:
        """Bytes the KV cache may take, given the loaded model's own size."""
        raise NotImplementedError

    def synchronize(self) -> None:
        pass
