"""4-bit weights times activations on the CPU: torch's int4 kernel, beside its plain-torch reference.

A llama.cpp Q4 tensor stores each row in blocks of 32 weights, each block with its own fp16 scale (and,
for Q4_1, its own offset); torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, the "tinygemm"
convention) holds groups of 32 along K with a bf16 scale and zero each:

    Q4_0    w = d * (q - 8)              q in 0..15
    Q4_1    w = d * q + m
    kernel  w = (q - 8) * scale + zero   ->  Q4_0: scale d, zero 0     Q4_1: scale d, zero m + 8 d

so the file's own 4-bit values are used as they are, never requantized. What rounds: scale and zero to bf16
(8 significant bits; fp16 has 11), and the activations to bf16 (the kernel's fast path takes bf16; fp16 or
fp32 activations take a path 10x slower). A Q8_0 tensor (w = d * q, q in -128..127: llama.cpp's usual
embedding) is two such 4-bit tensors: q = 16 hi + lo, so W = W_hi + W_lo, each exact in this convention,
laid side by side along K and multiplied by the input repeated twice: one kernel call.

A dense fp32 matmul reads 4 bytes per weight; this one about 0.6: at a decode step's few rows (which read
every weight to use it once) that is what counts. At many rows the dense GEMM's arithmetic wins, so callers
keep both and choose by the number of rows (models/quantized.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP = 32  # weights per scale: llama.cpp's block, and one of the kernel's group sizes


@dataclass(frozen=True, slots=True)
class Int4Rows:
    """A weight's rows unpacked, in the kernel's convention: q uint8 [N, K'] in 0..15, scale and zero float32
    [N, K'/32]. K' is `repeat` times the layer's input size: a Q8_0 weight is its high and low halves side
    by side, multiplied by the input twice over (so one kernel call sums both)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    repeat: int = 1

    @staticmethod
    def from_q4_0(q: torch.Tensor, d: torch.Tensor) -> Int4Rows:
        return Int4Rows(q, d, torch.zeros_like(d))

    @staticmethod
    def from_q4_1(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Int4Rows:
        return Int4Rows(q, d, m + 8 * d)

    @staticmethod
    def from_q8_0(q: torch.Tensor, d: torch.Tensor) -> Int4Rows:
        """q int8 [N, K] (or [N, K/32, 32]) = 16 hi + lo, hi in -8..7, lo in 0..15:
        d q = 16d ((hi + 8) - 8)  +  d (lo - 8) + 8d.  In q's bytes, lo is the low nibble, hi + 8 the high ^ 8."""
        b, n = q.view(torch.uint8), q.shape[0]
        out = torch.empty(n, 2, b[0].numel(), dtype=torch.uint8)  # [hi + 8 | lo] along K
        torch.bitwise_right_shift(b, 4, out=out[:, 0].view(b.shape)).bitwise_xor_(8)
        torch.bitwise_and(b, 15, out=out[:, 1].view(b.shape))
        scale, zero = torch.cat((16 * d, d), 1), torch.cat((torch.zeros_like(d), 8 * d), 1)
        return Int4Rows(out.view(n, -1), scale, zero, repeat=2)

    def permute_rows(self, order: torch.Tensor) -> Int4Rows:
        return Int4Rows(self.q[order], self.scale[order], self.zero[order], self.repeat)

    @staticmethod
    def cat(parts: list[Int4Rows]) -> Int4Rows:
        """Stacked projections (q|k|v, gate|up): their rows one after the other."""
        if len(parts) == 1:
            return parts[0]
        if len({p.repeat for p in parts}) != 1:
            raise ValueError("stacked 4-bit projections must all be Q4 or all Q8_0")
        fields = (torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero"))
        return Int4Rows(*fields, parts[0].repeat)


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """One [N, K'] weight for the kernel: `packed` (uint8 [N, K'/2], the kernel's layout), `scales_zeros`
    (bf16 [K'/32, N, 2]), the input's `repeat` (Int4Rows), and `max_rows`: steps of more rows than this
    use the layer's dense weight instead (models/quantized.py, `packed_or_dense_linear`)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    repeat: int = 1
    max_rows: int = 1 << 30

    @staticmethod
    def pack(rows: Int4Rows, max_rows: int = 1 << 30) -> Int4Weight:
        scales_zeros = torch.stack((rows.scale, rows.zero), dim=-1).transpose(0, 1).to(torch.bfloat16)
        return Int4Weight(_pack_nibbles(rows.q), scales_zeros.contiguous(), rows.repeat, max_rows)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self)


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [T, K] @ W.T -> [T, N] in x's dtype: x rounded to bf16, products summed in float32 by the kernel,
    which rounds its output to bf16."""
    if torch.compiler.is_compiling():
        return torch.ops.miniengine.int4_linear(x, w.packed, w.scales_zeros, w.repeat)
    return _int4_linear(x, w.packed, w.scales_zeros, w.repeat)  # the same, without the op's dispatch


def _int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, repeat: int) -> torch.Tensor:
    xb = x.to(torch.bfloat16)
    if repeat > 1:
        xb = xb.repeat(1, repeat)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, scales_zeros).to(x.dtype)


# The casts, the repeat and the kernel as one op, opaque to `torch.compile` (compiled_decode.py): one call in the
# graph instead of four, and the compiler neither fuses the casts into other loops nor lowers the kernel itself.
_library = torch.library.Library("miniengine", "FRAGMENT")
_library.define("int4_linear(Tensor x, Tensor packed, Tensor scales_zeros, int repeat) -> Tensor")
_library.impl("int4_linear", _int4_linear, "CPU")


@torch.library.register_fake("miniengine::int4_linear")
def _int4_linear_shape(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, repeat: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales_zeros.shape[1])


def int4_matmul_reference(x: torch.Tensor, rows: Int4Rows) -> torch.Tensor:
    """The same function in plain torch from the unpacked rows, rounding where the kernel rounds."""
    scale, zero = (v.to(torch.bfloat16).float().repeat_interleave(GROUP, dim=1) for v in (rows.scale, rows.zero))
    w = (rows.q.float() - 8) * scale + zero
    xb = x.to(torch.bfloat16).float().repeat(1, rows.repeat)
    return (xb @ w.t()).to(torch.bfloat16).to(x.dtype)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 -> the kernel's packed layout. `_convert_weight_to_int4pack_for_cpu` makes it
    from int32 with a strided loop (about a second for SmolLM2 on two cores); the same bytes come from two
    vectorised torch ops here, in the layout `_layout()` found the kernel using."""
    layout = _layout()
    if layout is None or q.shape[0] % layout[1]:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    return _pack_with(layout, q)


@functools.cache
def _layout() -> tuple[str, int] | None:
    """Which packed layout this build's kernel uses (it differs by the CPU's vector unit): pack a random
    probe with torch's own converter and compare; None when none of the known layouts matches."""
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    for layout in (("halves", 32), ("halves", 64), ("pairs", 32)):
        got = _pack_with(layout, probe)
        if got.shape == want.shape and torch.equal(got, want):
            return layout
    return None


def _pack_with(layout: tuple[str, int], q: torch.Tensor) -> torch.Tensor:
    """Each byte holds two rows' values at one k, low nibble first; `layout` says which two rows."""
    n, k = q.shape
    pairing, block = layout
    if pairing == "halves":  # row j of each block with row j + block/2 (AVX2: 32-row blocks, AVX-512: 64)
        q = q.view(n // block, 2, block // 2, k)
        low, high = q[:, 0], q[:, 1]
    else:  # row 2j with row 2j + 1 (no vector unit)
        q = q.view(n // block, block // 2, 2, k)
        low, high = q[:, :, 0], q[:, :, 1]
    return (low | (high << 4)).transpose(1, 2).reshape(n, k // 2).contiguous()  # one block: reshape is a view


@functools.cache
def int4_kernel_available() -> bool:
    """True when this torch has the CPU int4 kernel and it runs here (bf16 activations)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    try:
        ones = torch.ones(64, 2)
        int4_matmul(torch.ones(1, 64), Int4Weight.pack(Int4Rows(torch.zeros(64, 64, dtype=torch.uint8), ones, ones)))
    except (RuntimeError, AttributeError):
        return False
    return True
