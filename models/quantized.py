"""Packed copies of each linear weight, for CPU kernels that beat the dense matmul at few rows.

A decode step of a few sequences reads every weight to use it a few times: on a CPU its time is the bytes
read. So the linear layers (and the LM head) may keep compact copies beside the dense weight, and each
step picks one by its number of rows (`packed_or_dense_linear`, `TieredWeight`), e.g. with both copies:

    rows 1-2     y = int4 copy   (a GGUF's own 4 bits: ~1/6 of float32's bytes; the kernel unpacks per row)
    rows 3-64    y = fp16 copy   (half the bytes, float32 arithmetic; its GEMM reuses each weight across rows)
    more rows    y = x @ layer.weight.T (dense: prefill, big batches, where the GEMM's arithmetic counts)

The CPU platform measures which copies pay and up to how many rows (platforms/cpu.py, `packed_weights`):
- fp16 (kernels/fp16_matmul.py): any float32 checkpoint.
- int4 (kernels/int4_matmul.py): a GGUF's own Q4_0 / Q4_1 / Q8_0 values, packed for torch's int4 kernel.
  Checkpoint names map to layers as in `load_weights` (q|k|v and gate|up stacked; a tied LM head is the
  embedding). Beside fp16 the loader leaves out Q8_0 matrices (the LM head): their 4-bit split rounds the
  activations to bf16 across 49152 logits, while fp16 keeps the logits float32.
On a GPU the slot holds no copy (`attach_gemv`): the layer's own weight, through a Triton GEMV for one-row
steps (kernels/triton_gemv.py), which streams a weight faster than cuBLAS's kernels for one row do.
The loader attaches them after the dense weights are in. Only at tensor parallel size 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import nn

from miniengine.kernels.fp16_matmul import Fp16Weight
from miniengine.kernels.int4_matmul import Int4Rows, Int4Weight

if TYPE_CHECKING:  # triton is imported by GPU code only
    from miniengine.kernels.triton_gemv import GemvWeight

PackedWeight = Union[Fp16Weight, Int4Weight, "GemvWeight", "TieredWeight"]


@dataclass(frozen=True, slots=True)
class TieredWeight:
    """Several packed copies of one weight, by ascending `max_rows`: a step takes the first that covers its
    rows (in a compiled step the rows are fixed, so the choice is made once, when it is traced)."""

    tiers: tuple[Fp16Weight | Int4Weight, ...]

    @property
    def max_rows(self) -> int:
        return self.tiers[-1].max_rows

    @property
    def nbytes(self) -> int:
        return sum(tier.nbytes for tier in self.tiers)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        for tier in self.tiers:
            if rows <= tier.max_rows:
                return tier.matmul(x)
        raise ValueError(f"a step of {rows} rows is past every packed copy's ({self.max_rows}): use the dense weight")


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


def attach_gemv(model: nn.Module) -> int:
    """Give each layer that takes a packed copy a GEMV view of its own weight for one-row steps (the GPU's
    choice); returns how many layers took one."""
    from miniengine.kernels.triton_gemv import GemvWeight

    layers = _slotted(model)
    for layer in layers:
        layer.packed_weight = GemvWeight(layer.weight)
    return len(layers)


def attach_packed(model: nn.Module, tiers: dict[str, int], int4_weights: Iterable[tuple[str, Int4Rows]] = ()) -> int:
    """Give each layer that takes a packed copy the copies in `tiers` (kind -> steps of up to how many rows:
    "fp16" of its float32 weight, "int4" of its matrices among `int4_weights`); a layer with two holds a
    `TieredWeight`. Returns the bytes the copies take."""
    int4 = _int4_copies(model, int4_weights, tiers["int4"]) if "int4" in tiers else {}
    total = 0
    for layer in _slotted(model):
        copies = [int4[layer]] if layer in int4 else []
        if "fp16" in tiers and layer.weight.dtype == torch.float32:
            copies.append(Fp16Weight.pack(layer.weight, tiers["fp16"]))
        if not copies:
            continue
        copies.sort(key=lambda copy: copy.max_rows)
        layer.packed_weight = copies[0] if len(copies) == 1 else TieredWeight(tuple(copies))
        total += layer.packed_weight.nbytes
    return total


def _int4_copies(
    model: nn.Module, weights: Iterable[tuple[str, Int4Rows]], max_rows: int
) -> dict[nn.Module, Int4Weight]:
    """A 4-bit copy for each linear layer (and the LM head) whose checkpoint matrices are all 4-bit alike."""
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
    copies = {}
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
        if rows.q.shape[0] % 16:
            continue  # torch's int4 packing takes rows 16 at a time (an odd vocabulary's LM head stays dense)
        copies[layer] = Int4Weight.pack(rows, max_rows)
    return copies
