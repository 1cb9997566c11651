"""A second copy of each linear weight, packed for a CPU kernel that beats the dense matmul at few rows.

A decode step of a few sequences reads every weight to use it a few times: on a CPU its time is the bytes
read. So the linear layers (and the LM head) may keep a compact copy beside the dense weight, and each
step picks one by its number of rows (`packed_or_dense_linear`):

    rows <= max_rows   y = layer.packed_weight.matmul(x)    decode of a few sequences: the bytes read count
    more rows          y = x @ layer.weight.T (dense)       prefill, big batches: the GEMM's arithmetic does

Two kinds of copy, which the CPU platform chooses between by measuring (platforms/cpu.py):
- fp16 (`attach_fp16`, kernels/fp16_matmul.py): any float32 checkpoint, half the bytes, float32 arithmetic.
- 4-bit (`attach_int4`, kernels/int4_matmul.py): a GGUF's own Q4_0 / Q4_1 / Q8_0 values, packed for torch's
  int4 kernel (about a sixth of the bytes). Checkpoint names map to layers as in `load_weights` (q|k|v and
  gate|up stacked; a tied LM head is the embedding).
On a GPU the slot holds no copy (`attach_gemv`): the layer's own weight, through a Triton GEMV for one-row
steps (kernels/triton_gemv.py), which streams a weight faster than cuBLAS's kernels for one row do.
The loader attaches them after the dense weights are in. Only at tensor parallel size 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Union

import torch
from torch import nn

from miniengine.kernels.fp16_matmul import Fp16Weight
from miniengine.kernels.int4_matmul import Int4Rows, Int4Weight

if TYPE_CHECKING:  # triton is imported by GPU code only
    from miniengine.kernels.triton_gemv import GemvWeight

PackedWeight = Union[Fp16Weight, Int4Weight, "GemvWeight"]


def packed_or_dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """A linear layer holding both copies: the packed one for steps of at most `packed.max_rows` rows, the
    dense one above."""
    if packed is None or x.dim() != 2 or x.shape[0] > packed.max_rows:
        return torch.nn.functional.linear(x, weight, bias)
    y = packed.matmul(x)
    return y if bias is None else y + bias


def _slotted(model: nn.Module) -> list[nn.Module]:
    """The layers that take a packed copy (linear layers, the LM head)."""
    return [layer for layer in model.modules() if hasattr(layer, "packed_weight") and layer.weight.dim() == 2]


def attach_fp16(model: nn.Module, max_rows: int) -> int:
    """Give each layer that takes a packed copy an fp16 one of its float32 weight; returns the bytes the
    copies take."""
    total = 0
    for layer in _slotted(model):
        if layer.weight.dtype == torch.float32:
            layer.packed_weight = Fp16Weight.pack(layer.weight, max_rows)
            total += layer.packed_weight.nbytes
    return total


def attach_gemv(model: nn.Module) -> int:
    """Give each layer that takes a packed copy a GEMV view of its own weight for one-row steps (the GPU's
    choice); returns how many layers took one."""
    from miniengine.kernels.triton_gemv import GemvWeight

    layers = _slotted(model)
    for layer in layers:
        layer.packed_weight = GemvWeight(layer.weight)
    return len(layers)


def attach_int4(model: nn.Module, weights: Iterable[tuple[str, Int4Rows]], max_rows: int) -> int:
    """Give each linear layer (and the LM head) whose checkpoint matrices are all 4-bit a 4-bit copy;
    returns the bytes the copies take."""
    stacked = getattr(model, "stacked_params", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    parts: dict[str, dict[int, Int4Rows]] = {}
    for name, rows in weights:
        module_name, _, leaf = name.rpartition(".")
        parent, _, proj = module_name.rpartition(".")
        if leaf != "weight":
            continue
        if proj in stacked:
            module_name, shard = f"{parent}.{stacked[proj][0]}", stacked[proj][1]
        else:
            shard = 0
        if module_name == "model.embed_tokens" and tied:
            module_name = "lm_head"
        parts.setdefault(module_name, {})[shard] = rows
    modules = dict(model.named_modules())
    total = 0
    for module_name, shards in parts.items():
        layer = modules.get(module_name)
        wanted = list(range(len(getattr(layer, "output_sizes", [layer]))))
        if (
            not hasattr(layer, "packed_weight")
            or sorted(shards) != wanted
            or len({r.repeat for r in shards.values()}) > 1
        ):
            continue  # not a layer that takes a 4-bit copy, or not all its projections are 4-bit alike
        rows = Int4Rows.cat([shards[i] for i in wanted])
        if rows.q.shape[0] != layer.weight.shape[0] or rows.q.shape[1] != rows.repeat * layer.weight.shape[1]:
            continue
        layer.packed_weight = Int4Weight.pack(rows, max_rows)
        total += layer.packed_weight.nbytes
    return total
