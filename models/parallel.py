"""Tensor parallel layers: each rank holds a slice of every large weight; one all-reduce per block joins them.

    x (the same on every rank)
      -> ColumnParallelLinear   W split by output rows:   rank r computes y[:, slice r]         (no talk)
      -> RowParallelLinear      W split by input columns: rank r computes a partial sum of y -> ALL-REDUCE
    attention   qkv column parallel (each rank whole heads; fewer KV heads than ranks: copies), o_proj row
                parallel: one all-reduce, in RowParallelLinear.forward
    MLP         gate_up column parallel, down row parallel: one all-reduce, the same place
    MoE         experts split along their intermediate dimension (or whole experts per rank): one
                all-reduce at the end of the block (models/moe.py)
    embedding   vocabulary rows split; a rank embeds the ids it holds, zeros for the rest -> ALL-REDUCE
    LM head     vocabulary rows split; each rank's slice of the logits -> GATHER to rank 0, which samples

A layer takes the `TensorParallel` in force while the model is built (`building(tp)` around its
construction: loader.py), so model classes keep their one-argument constructor. At size 1 every layer is
the plain layer it extends and no collective ever runs.

On the CPU a linear layer may also hold a second copy of its weight packed for a faster kernel (fp16, or
the checkpoint's own 4 bits: `packed_weight`, models/quantized.py), which steps of few rows multiply by.

Loading: each split parameter carries `full_shape` and `weight_loader(param, tensor, shard=None)`, which
takes the *full* checkpoint tensor, or a lazy one (loader.py: narrowing it reads only the rank's bytes), and
copies in this rank's part. Random dummy weights are drawn full-size and loaded the same way, so every
tensor parallel size builds the same model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from miniengine.models.quantized import PackedWeight, packed_or_dense_linear


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place among the ranks: `rank` of `size`, and the process group they share."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group (which holds every rank)
    expert_parallel: bool = False  # MoE: whole experts per rank instead of a slice of each

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's `x` joined along the last dimension; the other ranks: None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dst = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.gather(x, parts, dst=dst, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None


SINGLE = TensorParallel()
_building = SINGLE


@contextmanager
def building(tp: TensorParallel) -> Iterator[None]:
    """Layers built inside take `tp` as theirs."""
    global _building
    previous, _building = _building, tp
    try:
        yield
    finally:
        _building = previous


def current_tp() -> TensorParallel:
    return _building


def divide(n: int, size: int, what: str) -> int:
    if n % size:
        divisors = [str(d) for d in range(1, n + 1) if n % d == 0]
        listed = ", ".join(divisors[:8]) + (", ..." if len(divisors) > 8 else "")
        raise ValueError(
            f"tensor_parallel_size {size} does not divide {what} ({n}): choose a size that divides it ({listed})"
        )
    return n // size


def check_divisible(config: SimpleNamespace, size: int, expert_parallel: bool) -> None:
    """Raise a ValueError naming the number `size` must divide, before any process starts."""
    if size == 1:
        return
    divide(config.num_attention_heads, size, "num_attention_heads")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv >= size:
        divide(kv, size, "num_key_value_heads")
    elif size % kv:
        raise ValueError(
            f"tensor_parallel_size {size} is above num_key_value_heads ({kv}) but not a multiple of it: KV heads "
            f"are copied to whole groups of ranks; choose a multiple of {kv} or a divisor of it"
        )
    if getattr(config, "intermediate_size", None):
        divide(config.intermediate_size, size, "intermediate_size")
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts and expert_parallel:
        divide(experts, size, "the number of experts (with enable_expert_parallel)")
    elif experts and getattr(config, "moe_intermediate_size", None):
        divide(config.moe_intermediate_size, size, "moe_intermediate_size")


def materialize(tensor: Any) -> torch.Tensor:
    """A checkpoint tensor read at last (a lazy slice from loader.py), or the tensor itself."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.materialize()


def copy_into(target: torch.Tensor, loaded: Any, name: str = "") -> None:
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)} != model {tuple(target.shape)}")
    target.copy_(materialize(loaded))


def default_weight_loader(param: nn.Parameter, loaded: Any, shard: int | None = None) -> None:
    """A replicated parameter (norms, routers, biases after a reduce): every rank holds the whole tensor."""
    copy_into(param.data, loaded)


def load_param(param: nn.Parameter, loaded: Any, name: str = "") -> None:
    try:
        getattr(param, "weight_loader", default_weight_loader)(param, loaded)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


class ColumnParallelLinear(nn.Linear):
    """y = x W^T with W's output rows split across ranks. Several stacked projections (`output_sizes`:
    gate|up) are split one by one, so each rank holds its part of each, stacked the same way."""

    packed_weight: PackedWeight | None = None  # a CPU kernel's copy of `weight` (models/quantized.py)

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        self.tp = current_tp()
        self.output_sizes = output_sizes
        self.shards = [self.shard_rows(i, size) for i, size in enumerate(output_sizes)]  # (start, rows) in full
        super().__init__(in_features, sum(rows for _, rows in self.shards), bias=bias)
        for param in self.parameters():
            param.weight_loader = self.weight_loader
            param.full_shape = (sum(output_sizes), *param.shape[1:])

    def shard_rows(self, index: int, size: int) -> tuple[int, int]:
        rows = divide(size, self.tp.size, "a projection's output size")
        return self.tp.rank * rows, rows

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard: int | None = None) -> None:
        """`shard` None: the whole stack (every projection), as dummy weights and fused checkpoints hold it."""
        if shard is None:
            if loaded.shape[0] != sum(self.output_sizes):
                raise ValueError(f"checkpoint shape {tuple(loaded.shape)}, expected {sum(self.output_sizes)} rows")
            for i in range(len(self.output_sizes)):
                self.weight_loader(param, loaded.narrow(0, sum(self.output_sizes[:i]), self.output_sizes[i]), i)
            return
        if loaded.shape[0] != self.output_sizes[shard]:
            raise ValueError(
                f"shard {shard} of a stacked projection has {self.output_sizes[shard]} rows, "
                f"the checkpoint tensor {tuple(loaded.shape)}"
            )
        start, rows = self.shards[shard]
        offset = sum(r for _, r in self.shards[:shard])
        copy_into(param.data.narrow(0, offset, rows), loaded.narrow(0, start, rows))

    def load_shard(self, param: nn.Parameter, shard: int, loaded: Any) -> None:
        self.weight_loader(param, loaded, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_or_dense_linear(x, self.weight, self.bias, self.packed_weight)


class QKVParallelLinear(ColumnParallelLinear):
    """q|k|v stacked, split by heads: rank r holds query heads r*Hq/N.., and KV heads r*Hkv/N.. or, with
    fewer KV heads than ranks, a copy of the one KV head its query heads attend to."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        tp = current_tp()
        self.local_heads = divide(num_heads, tp.size, "num_attention_heads")
        self.local_kv_heads = divide(num_kv_heads, tp.size, "num_key_value_heads") if num_kv_heads >= tp.size else 1
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias)

    def shard_rows(self, index: int, size: int) -> tuple[int, int]:
        if index == 0:
            return self.tp.rank * self.local_heads * self.head_dim, self.local_heads * self.head_dim
        first = self.tp.rank * self.local_kv_heads if self.num_kv_heads >= self.tp.size else (
            self.tp.rank * self.num_kv_heads // self.tp.size
        )  # fmt: skip
        return first * self.head_dim, self.local_kv_heads * self.head_dim


class RowParallelLinear(nn.Linear):
    """y = x W^T + b with W's input columns split: x arrives split the same way (a column parallel layer's
    output), each rank's product is a partial sum, and the all-reduce here adds them. The bias is added
    once, after the reduce."""

    packed_weight: PackedWeight | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        self.tp = current_tp()
        self.full_in = in_features
        super().__init__(divide(in_features, self.tp.size, "a projection's input size"), out_features, bias=bias)
        self.weight.weight_loader = self.weight_loader
        self.weight.full_shape = (out_features, in_features)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard: int | None = None) -> None:
        if loaded.shape[-1] != self.full_in:
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)}, expected {self.full_in} columns")
        columns = self.in_features
        copy_into(param.data, loaded.narrow(1, self.tp.rank * columns, columns))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return packed_or_dense_linear(x, self.weight, self.bias, self.packed_weight)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows of the vocabulary split in ceil(V / N) blocks (the last padded with zeros)."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        self.tp = current_tp()
        self.vocab_size = vocab_size
        self.rows = math.ceil(vocab_size / self.tp.size)
        self.first = self.tp.rank * self.rows
        super().__init__(self.rows, hidden)
        self.weight.weight_loader = self.weight_loader
        self.weight.full_shape = (vocab_size, hidden)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard: int | None = None) -> None:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)}, expected {self.vocab_size} vocabulary rows")
        rows = max(0, min(self.rows, self.vocab_size - self.first))
        param.data[rows:].zero_()
        copy_into(param.data[:rows], loaded.narrow(0, self.first, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection over the vocabulary, split as the embedding is (so the two may be tied):
    `forward` returns the full logits on rank 0, None on the other ranks."""

    packed_weight: PackedWeight | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.tp.gather_last_dim(packed_or_dense_linear(hidden, self.weight, None, self.packed_weight))
        return logits if logits is None or self.tp.size == 1 else logits[..., : self.vocab_size]
