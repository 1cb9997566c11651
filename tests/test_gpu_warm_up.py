"""On the GPU: after start-up, serving compiles no kernel.

Triton compiles a kernel variant per tile configuration the first time a step needs it, seconds each on a
fresh machine: without the warm-up at start-up (`ModelRunner.warm_up`) the first mixed batch, the first long
context (more flash-decoding splits) or the first large MoE step of a live server stalled every running request
that long. Here a varied workload (chunked prefill beside decodes, prefix hits, long and short contexts, n > 1,
sampling) runs after start-up, and no Triton kernel of ours gains a compiled variant.

Run with `pytest -m gpu` on a CUDA machine.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from miniengine import Engine, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from presets import model_dir  # noqa: E402


def compiled_variants() -> dict[str, set]:
    """The keys of the compiled variants (all devices) of each Triton kernel in miniengine's kernel modules."""
    from triton.runtime.jit import JITFunction

    from miniengine.kernels import triton_fused_ops, triton_gemv, triton_moe, triton_paged_attention

    counts = {}
    for module in (triton_fused_ops, triton_gemv, triton_moe, triton_paged_attention):
        for name, fn in vars(module).items():
            if isinstance(fn, JITFunction):
                counts[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = {
                    key for cache in fn.device_caches.values() for key in cache[0]
                }
    return counts


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-30b-a3b"])
def test_serving_compiles_nothing_after_start_up(preset, tmp_path):
    directory = model_dir(preset, tmp_path, num_hidden_layers=2)
    engine = Engine(str(directory), load_format="dummy", max_model_len=8192, num_kv_blocks=2048, max_num_seqs=64,
                    stat_loggers=[])  # fmt: skip
    before = compiled_variants()
    assert any(before.values()), "start-up compiled the kernels it warmed up"
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(rng.choice([3, 40, 700, 2500, 6000]))] for _ in range(40)]
    longest = max(prompts, key=len)
    prompts += [longest[:1024] + [5, 6, 7], longest[:512] + [9]]  # prefix hits
    greedy = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, n=2, seed=1, max_tokens=24)
    engine.generate(prompts[:30], greedy, use_tqdm=False)
    engine.generate(prompts[30:], sampled, use_tqdm=False)
    engine.generate(prompts[0], greedy, use_tqdm=False)  # alone: the one-row decode
    after = compiled_variants()
    new = {name: [str(key)[:300] for key in after[name] - before.get(name, set())] for name in after}
    new = {name: keys for name, keys in new.items() if keys}
    assert not new, f"kernels compiled while serving, after start-up: {new}"
