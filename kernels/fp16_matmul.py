"""Half-precision weights times float32 activations on the CPU: fbgemm's fp16 GEMM, beside its plain-torch reference.

A decode step of a few rows reads every weight to use it a few times, so on a CPU its time is the bytes
read. fbgemm (torch's x86 quantized backend) packs a weight as fp16 (2 bytes per weight, half of float32)
into panels its GEMM streams, widens each panel to float32 in registers and multiplies in float32:

    x float32 [T, K]  @  W fp16 [N, K]^T (packed)  ->  y float32 [T, N]     products and sums in float32

so the only rounding is each weight's to fp16 (11 significant bits; a GGUF's Q4 / Q8 values are a 16-bit
scale times a few-bit integer, and keep almost all their bits).

The GEMM is torch's `quantized::linear_dynamic_fp16`, which splits the output's columns over torch's threads
(`torch.fbgemm_linear_fp16_weight_fp32_activation` runs on one thread). Its packed weight is a script object
(`quantized::linear_prepack_fp16`), which no op of a `torch.compile`d graph can take as an argument: so each
packed weight is kept in a table here, and the graph carries a one-element `handle` tensor holding its key.
In a compiled decode step (compiled_decode.py) the GEMM is the op `miniengine::fp16_linear(x, handle)`,
opaque to the compiler, which looks the weight up and calls the kernel:

    Fp16Weight(handle=tensor([7]))  --graph-->  miniengine::fp16_linear(x, handle)  ->  _PACKED[7]  ->  fbgemm
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import torch

_PACKED: dict[int, torch.ScriptObject] = {}  # handle value -> fbgemm's packed weight; dropped with the handle
_KEYS = itertools.count()


@dataclass(frozen=True, slots=True)
class Fp16Weight:
    """One [N, K] weight packed by fbgemm as fp16, named by `handle`; and `max_rows`: steps of more rows
    than this use another copy (models/quantized.py, `packed_or_dense_linear`)."""

    handle: torch.Tensor  # int64 [1]: the key of the packed weight in _PACKED
    packed: torch.ScriptObject  # the same packed weight, for eager calls (no table lookup)
    out_features: int
    nbytes: int
    max_rows: int = 1 << 30

    @staticmethod
    def pack(weight: torch.Tensor, max_rows: int = 1 << 30) -> Fp16Weight:
        packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)
        key = next(_KEYS)
        handle = torch.tensor([key])
        _PACKED[key] = packed
        weakref.finalize(handle, _PACKED.pop, key, None)  # the packed weight lives as long as its handle
        return Fp16Weight(handle, packed, weight.shape[0], 2 * weight.numel(), max_rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return fp16_matmul(x, self)


def fp16_matmul(x: torch.Tensor, w: Fp16Weight) -> torch.Tensor:
    """x [T, K] @ W.T -> [T, N] in x's dtype; fbgemm takes float32 activations."""
    if torch.compiler.is_compiling():
        return torch.ops.miniengine.fp16_linear(x.float(), w.handle, w.out_features).to(x.dtype)
    return torch.ops.quantized.linear_dynamic_fp16(x.float(), w.packed).to(x.dtype)


def _fp16_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x, _PACKED[int(handle)])


# The GEMM as an op of its own: the compiler cannot look inside the packed weight, so it is told the output's
# shape (`register_fake`) and calls the kernel as it is. A plain `Library` op, not `custom_op`: its call costs
# a few microseconds less, and a decode step makes 121 of them.
_library = torch.library.Library("miniengine", "FRAGMENT")
_library.define("fp16_linear(Tensor x, Tensor handle, int out_features) -> Tensor")
_library.impl("fp16_linear", _fp16_linear, "CPU")


@torch.library.register_fake("miniengine::fp16_linear")
def _fp16_linear_shape(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def fp16_matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same function in plain torch: the weight rounded to fp16, everything else float32."""
    return (x.float() @ weight.half().float().t()).to(x.dtype)


@functools.cache
def fp16_kernel_available() -> bool:
    """True when this torch was built with fbgemm (x86) and its fp16 GEMM runs here."""
    try:
        fp16_matmul(torch.ones(1, 64), Fp16Weight.pack(torch.ones(8, 64)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True
