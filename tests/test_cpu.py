"""The CPU platform's choices: the compute dtype (bf16 only where native and measured faster), GGUF
dequantization equal to the `gguf` package's, and bf16 SmolLM2 against float32 where bf16 is native."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from miniengine.gguf_loader import dequantize_tensor
from miniengine.gguf_reader import GGUFTensor
from miniengine.platforms import cpu
from miniengine.platforms.cpu import CpuPlatform


@pytest.mark.parametrize(
    ("flags", "pays", "expected"),
    [
        ({"avx2", "fma"}, True, torch.float32),  # AVX2 only: bf16 is emulated, never chosen
        ({"avx512f", "avx512_bf16"}, True, torch.bfloat16),
        ({"amx_bf16", "amx_tile"}, True, torch.bfloat16),
        ({"avx512f", "avx512_bf16"}, False, torch.float32),  # native, but measured slower here
    ],
)
def test_dtype_choice(monkeypatch, flags, pays, expected):
    monkeypatch.delenv("MINIENGINE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu, "bf16_matmul_pays", lambda: pays)
    assert CpuPlatform().default_dtype() == expected


def test_dtype_override(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setenv("MINIENGINE_CPU_DTYPE", "bfloat16")
    assert CpuPlatform().default_dtype() == torch.bfloat16
    monkeypatch.setenv("MINIENGINE_CPU_DTYPE", "fp8")
    with pytest.raises(ValueError, match="MINIENGINE_CPU_DTYPE"):
        CpuPlatform().default_dtype()


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_dequantize_equals_gguf_reference(kind):
    kind = GGMLQuantizationType[kind]
    weights = np.random.default_rng(0).standard_normal((6, 128), dtype=np.float32) * 0.1
    raw = weights if kind == GGMLQuantizationType.F32 else quantize(weights, kind)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(6, -1)
    assert raw.shape[1] == 128 // GGML_QUANT_SIZES[kind][0] * GGML_QUANT_SIZES[kind][1]
    ours = dequantize_tensor(GGUFTensor("w", kind, (128, 6), raw))
    reference = torch.from_numpy(np.asarray(dequantize(raw, kind), dtype=np.float32))
    assert ours.dtype == torch.float32 and torch.equal(ours.view(6, 128), reference.view(6, 128))


@pytest.mark.slow
@pytest.mark.skipif(not cpu.native_bf16(), reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
def test_bf16_smollm2_agrees_with_float32(smollm2_path):
    """Where bf16 is native (and so may be the default), its next-token choice equals float32's wherever
    float32's top-2 margin is clear of bf16's rounding."""
    from miniengine import Engine, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(smollm2_path, dtype=dtype, max_model_len=256, num_kv_blocks=64, stat_loggers=[])
        runs[dtype] = engine.generate(prompts, params, use_tqdm=False)
    for fp32, bf16 in zip(runs["float32"], runs["bfloat16"]):
        for step, (token, top) in enumerate(zip(fp32.outputs[0].token_ids, fp32.outputs[0].logprobs)):
            first, second = sorted(top.values(), reverse=True)[:2]
            if first - second < 0.1:
                break  # from here the two runs may follow different, equally good, continuations
            assert bf16.outputs[0].token_ids[step] == token, (fp32.prompt, step)
