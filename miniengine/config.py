"""Engine settings: what a user may set, checked once, with the defaults a vLLM user would expect."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # HF-style directory or .gguf file; None: the bundled SmolLM2-135M-Instruct
    device: str = "auto"
    dtype: str = "auto"
    # "auto" reads the checkpoint's weights (on the CPU a GGUF's 4-bit ones are also kept for decode steps,
    # where that pays), "dense" reads them dequantized only, "dummy" makes random ones
    load_format: str = "auto"
    max_model_len: int | None = None  # prompt + output tokens of one sequence; None: the model's own limit
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the scheduler's token budget per step (chunked prefill)
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # fix the KV cache size instead of measuring memory
    enforce_eager: bool = False  # never replay captured graphs (CUDA graphs for decode steps)
    # Launch each step before reading the last one's tokens (async_scheduling.py); None: where the device runs
    # asynchronously (CUDA) and tensor_parallel_size is 1
    async_scheduling: bool | None = None
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks the model is split over: this process and N-1 workers (distributed.py)
    enable_expert_parallel: bool = False  # MoE: whole experts per rank instead of a slice of every expert
    distributed_init_method: str | None = None  # tcp://HOST:PORT for several hosts; None: a free loopback port
    nnodes: int = 1  # hosts the ranks are spread over; the others run `miniengine worker --node-rank K`

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs={self.max_num_seqs}: "
                "every running sequence needs a token each step; raise the budget or lower max_num_seqs"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be at least 2")
        if self.tensor_parallel_size < 1 or self.nnodes < 1:
            raise ValueError("tensor_parallel_size and nnodes must be at least 1")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} is not a multiple of nnodes {self.nnodes}: "
                "every host runs the same number of ranks"
            )
        if self.nnodes > 1 and not self.distributed_init_method:
            raise ValueError(
                "nnodes > 1 needs distributed_init_method (--distributed-init-method tcp://HOST:PORT, an address "
                "of this host that the other hosts reach)"
            )
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError(
                "async_scheduling needs the whole model in this process: it does not work with "
                f"tensor_parallel_size {self.tensor_parallel_size}; leave it unset"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be at least 1")

    def resolve_max_model_len(self, hf_config: SimpleNamespace, kv_capacity: int) -> int:
        """The user's max_model_len, or the model's limit capped to what the KV cache can hold."""
        model_limit = getattr(hf_config, "max_position_embeddings", None) or kv_capacity
        if self.max_model_len is None:
            return min(model_limit, kv_capacity)
        if self.max_model_len > model_limit:
            raise ValueError(
                f"max_model_len {self.max_model_len} is larger than the model's limit "
                f"(max_position_embeddings = {model_limit}); lower it"
            )
        if self.max_model_len > kv_capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} is larger than the KV cache can hold ({kv_capacity:,} tokens); "
                "lower it, or give the cache more memory (gpu_memory_utilization, MINIENGINE_CPU_KV_CACHE_GIB, "
                "num_kv_blocks)"
            )
        return self.max_model_len
