"""The GPU's kernel set, run by Triton's interpreter on the CPU through a whole engine: tiny Qwen2 (q|k|v
bias, Llama's layers) and Qwen3 (q/k norms) models give the greedy tokens of the plain torch kernels, one-row
decode steps going through the fused GEMVs (norm into q|k|v and gate|up, SiLU into down) and the fused
rotary + KV store, and several-row steps through the separate kernels."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from miniengine import Engine, SamplingParams  # noqa: E402
from miniengine.forward_context import Kernels  # noqa: E402
from miniengine.kernels import triton_fused_ops as ops  # noqa: E402
from miniengine.kernels import triton_gemv, triton_moe  # noqa: E402
from miniengine.kernels.triton_paged_attention import paged_attention, store_kv  # noqa: E402
from miniengine.models.quantized import attach_gemv  # noqa: E402
from tests.tiny_models import make_tiny_model  # noqa: E402

PROMPTS = [[5, 9, 200, 31, 7], [100, 3, 3, 47, 250, 11, 60, 2, 99]]


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_triton_kernels_equal_torch(tmp_path, monkeypatch, name):
    monkeypatch.setenv("MINIENGINE_CUDA_FUSE", "1")
    directory = make_tiny_model(tmp_path, name)
    options = dict(device="cpu", dtype="float32", enforce_eager=True, num_kv_blocks=32, block_size=8,
                   max_num_seqs=4, stat_loggers=[])  # fmt: skip
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = Engine(str(directory), **options)
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, greedy, use_tqdm=False)]
    engine = Engine(str(directory), **options)
    assert attach_gemv(engine.runner.model) > 0
    calls = {"gemv_rms_norm": 0, "gemv_silu_and_mul": 0, "rotary_store": 0}

    def counted(module, name):
        original = getattr(module, name)

        def call(*args):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(module, name, call)

    counted(triton_gemv, "gemv_rms_norm")
    counted(triton_gemv, "gemv_silu_and_mul")
    counted(ops, "rotary_store")
    engine.runner.kernels = Kernels("triton", store_kv, paged_attention, ops.rms_norm, ops.rotary, ops.silu_and_mul,
                                    triton_moe.fused_moe, ops.qk_norm_rotary, ops.rotary_store)  # fmt: skip
    both = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, greedy, use_tqdm=False)]  # 2-row decodes
    alone = [engine.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]  # 1-row
    assert both == expected
    assert alone == expected
    layers = engine.runner.model.config.num_hidden_layers
    assert calls["gemv_rms_norm"] >= 2 * layers * 2 * 5  # two norms a layer, 5 one-row decode steps a prompt
    assert calls["gemv_silu_and_mul"] >= layers * 2 * 5 and calls["rotary_store"] > 0
