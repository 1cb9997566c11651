"""Half-precision weights times float32 activations on the CPU: fbgemm's fp16 GEMM, beside its plain-torch reference.

A decode step of a few rows reads every weight to use it a few times, so on a CPU its time is the bytes
read. fbgemm (torch's x86 quantized backend) packs a weight as fp16 (2 bytes per weight, half of float32)
into panels its GEMM streams, widens each panel to float32 in registers and multiplies in float32:

    x float32 [T, K]  @  W fp16 [N, K]^T (packed)  ->  y float32 [T, N]     products and sums in float32

so the only rounding is each weight's to fp16 (11 significant bits; a GGUF's Q4 / Q8 values are a 16-bit
scale times a few-bit integer, and keep almost all their bits). On the 2-core AVX2 EPYC it beats float32
at every row count up to ~128 (fewer bytes at few rows; at 32 its panels also feed the FMA units better)
and torch's int4 kernel from 8 rows on (bench/README.md); at hundreds of rows the two float GEMMs tie.

The packed weight is fbgemm's opaque blob held in a uint8 tensor (torch's `fbgemm_pack_gemm_matrix_fp16`),
not the `quantized::linear_prepack_fp16` object: a tensor can enter a `torch.compile`d decode step
(compiled_decode.py), where the GEMM is the op `miniengine::fp16_linear`, opaque to the compiler.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Fp16Weight:
    """One [N, K] weight packed by fbgemm as fp16, and `max_rows`: steps of more rows than this use the
    layer's dense weight instead (models/quantized.py, `packed_or_dense_linear`)."""

    packed: torch.Tensor  # fbgemm's PackedGemmMatrixFP16, held by a uint8 tensor
    out_features: int
    nbytes: int
    max_rows: int = 1 << 30

    @staticmethod
    def pack(weight: torch.Tensor, max_rows: int = 1 << 30) -> Fp16Weight:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks these entry points deprecated; both tested versions have them
            packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.detach().float().contiguous())
        return Fp16Weight(packed, weight.shape[0], 2 * weight.numel(), max_rows)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return fp16_matmul(x, self)


def fp16_matmul(x: torch.Tensor, w: Fp16Weight) -> torch.Tensor:
    """x [T, K] @ W.T -> [T, N] in x's dtype; fbgemm takes float32 activations."""
    if torch.compiler.is_compiling():
        return torch.ops.miniengine.fp16_linear(x.float(), w.packed, w.out_features).to(x.dtype)
    return torch.fbgemm_linear_fp16_weight_fp32_activation(x.float(), w.packed, None).to(x.dtype)


# The GEMM as an op of its own, for compiled graphs: the compiler cannot look inside fbgemm's blob, so it is told
# the output's shape (`register_fake`) and calls the kernel as it is. A plain `Library` op, not `custom_op`: its
# call costs a few microseconds less, and a decode step makes 121 of them.
_library = torch.library.Library("miniengine", "FRAGMENT")
_library.define("fp16_linear(Tensor x, Tensor packed, int out_features) -> Tensor")
_library.impl("fp16_linear", lambda x, w, n: torch.fbgemm_linear_fp16_weight_fp32_activation(x, w, None), "CPU")


@torch.library.register_fake("miniengine::fp16_linear")
def _fp16_linear_shape(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def fp16_matmul_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same function in plain torch: the weight rounded to fp16, everything else float32."""
    return (x.float() @ weight.half().float().t()).to(x.dtype)


@functools.cache
def fp16_kernel_available() -> bool:
    """True when this torch was built with fbgemm (x86) and its fp16 GEMM runs here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first call warns of the deprecation (once per process)
            fp16_matmul(torch.ones(1, 64), Fp16Weight.pack(torch.ones(8, 64)))
    except (RuntimeError, AttributeError):
        return False
    return True
