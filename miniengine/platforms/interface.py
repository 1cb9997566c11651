"""What differs from one device to another, in one place: the Platform interface.

The engine never asks "is this CUDA?": it asks the platform for its torch device, its default dtype, the
kernels the layers call (`Kernels`: attention, KV store, norms, rotary, activation, MoE), how much memory
the KV cache may take, whether decode steps may be captured as graphs, and how processes talk to each
other. A new device (built in, or from a platform plugin) is one subclass of `Platform`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from miniengine.forward_context import Kernels

if TYPE_CHECKING:
    from miniengine.config import EngineConfig
    from miniengine.model_runner import ModelRunner


class Platform:
    name: str = "base"
    device_type: str = "cpu"  # torch device type
    dist_backend: str = "gloo"  # torch.distributed backend for tensor parallel workers
    # Does the platform prepare decode steps at start-up (`decode_runner`: CUDA graphs, a compiled CPU step)?
    supports_graphs: bool = False
    # Does queued device work run while the host goes on? Then async scheduling hides the host's step.
    runs_asynchronously: bool = False
    # Do its kernels compile on first use, per shape (Triton's JIT)? Then the runner warms them up at start-up
    # (`ModelRunner.warm_up`), so that no live request's step waits seconds for a compiler.
    compiles_kernels: bool = False

    @classmethod
    def is_available(cls) -> bool:
        """True when this platform's hardware is present (auto-detection asks every platform)."""
        return False

    def device(self) -> torch.device:
        """This process's device (after `set_device`, for a tensor parallel worker)."""
        return torch.device(self.device_type)

    def set_device(self, local_rank: int) -> None:
        """Make device `local_rank` this process's current one (each tensor parallel worker has its own)."""

    def default_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def kernels(self) -> Kernels:
        raise NotImplementedError

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        raise NotImplementedError

    def decode_runner(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int, capture: bool) -> object | None:
        """What runs the decode steps it can (`can_run(step)`, `run(step, fed_ids)`, `logits`), prepared at start-up
        when `supports_graphs`; None: the eager model runs them. `capture` is False under `enforce_eager`."""
        return None

    def kv_cache_bytes(self, config: EngineConfig, model_bytes: int, profile: Callable[[], int]) -> int:
        """Bytes the KV cache may take. `profile()` runs a forward pass of a full step's batch and returns
        the peak bytes the device held meanwhile (weights included); platforms that measure memory call it."""
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        """Start counting the peak of device memory held by torch (for `profile`)."""

    def peak_memory(self) -> int:
        """Peak bytes torch held on the device since `reset_peak_memory` (0 where not measured)."""
        return 0

    def check_and_update_config(self, config: EngineConfig) -> None:
        """Adjust settings this device cannot honour (block size, graphs), saying why; called early."""

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def synchronize(self) -> None:
        pass
