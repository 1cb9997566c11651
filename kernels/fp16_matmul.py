"""Half-precision weights times float32 activations on the CPU: fbgemm's fp16 GEMM, beside its plain-torch reference.

A decode step of a few rows reads every weight to use it a few times, so on a CPU its time is the bytes
read. fbgemm (torch's x86 quantized backend) packs a weight as fp16 (2 bytes per weight, half of float32)
into panels its GEMM streams, widens each panel to float32 in registers and multiplies in float32:

    x float32 [T, K]  @  W fp16 [N, K]^T (packed)  ->  y float32 [T, N]     products and sums in float32

so the only rounding is each weight's to fp16 (11 significant bits; a GGUF's Q4 / Q8 values are a 16-bit
scale times a few-bit integer, and keep almost all their bits). On the 2-core AVX2 EPYC it beats float32
at every row count up to ~128 (fewer bytes at few rows; at 32 its panels also feed the FMA units better)
and torch's int4 kernel from 8 rows on (bench/README.md); at hundreds of rows the two float GEMMs tie.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Fp16Weight:
    """One [N, K] weight packed by fbgemm as fp16, and `max_rows`: steps of more rows than this use the
    layer's dense weight instead (models/quantized.py, `packed_or_dense_linear`)."""

    packed: torch.ScriptObject  # fbgemm's PackedLinearWeightFp16
    nbytes: int
    max_rows: int = 1 << 30

    @staticmethod
    def pack(weight: torch.Tensor, max_rows: int = 1 << 30) -> Fp16Weight:
        packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)
        return Fp16Weight(packed, 2 * weight.numel(), max_rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return fp16_matmul(x, self)


def fp16_matmul(x: torch.Tensor, w: Fp16Weight) -> torch.Tensor:
    """x [T, K] @ W.T -> [T, N] in x's dtype; fbgemm takes float32 activations."""
    if x.dtype == torch.float32:
        return torch.ops.quantized.linear_dynamic_fp16(x, w.packed)
    return torch.ops.quantized.linear_dynamic_fp16(x.float(), w.packed).to(x.dtype)


def fp16_matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same function in plain torch: the weight rounded to fp16, everything else float32."""
    return (x.float() @ weight.half().float().t()).to(x.dtype)


@functools.cache
def fp16_kernel_available() -> bool:
    """True when this torch was built with fbgemm (x86) and its fp16 GEMM runs here."""
    try:
        fp16_matmul(torch.ones(1, 64), Fp16Weight.pack(torch.ones(8, 64)))
    except (RuntimeError, AttributeError):
        return False
    return True
