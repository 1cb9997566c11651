"""On the GPU: real model shapes (Qwen3-0.6B, Llama-3-8B) with random weights, against transformers.

transformers builds each model with random weights (rounded to bf16, so the fp32 and bf16 models hold the
same numbers); our engine loads the very same tensors through its `load_weights` (the loader's name mapping,
stacked qkv / gate_up). A mixed batch of prompts runs with chunked prefill and prefix-cache hits.

- fp32: our greedy tokens equal transformers' exactly.
- bf16: any two bf16 implementations round differently, and a deep random model amplifies that, so greedy
  paths may part. A divergence is accepted only at a step where transformers' own top-two bf16 logits are
  closer than transformers' own bf16 rounding error there (its bf16 logits against its fp32 logits on the same
  tokens): measured at every divergence, never assumed.
- CUDA graphs on and off give identical tokens.

Run with `pytest -m gpu` on a CUDA machine.
"""

from __future__ import annotations

import gc
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
from presets import hf_config, model_dir  # noqa: E402

MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def make_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (5, 17, 33, 64, 100, 129, 200, 257, 300, 513)]
    prompts += [prompts[9][:320] + [7, 8, 9], prompts[7][:160] + [1, 2]]  # share full blocks: prefix hits
    return prompts


@pytest.fixture(scope="module", params=["qwen3-0.6b", "llama-3-8b"])
def reference(request, tmp_path_factory):
    """transformers' model in fp32 whose weights are exactly representable in bf16, and a config directory."""
    from transformers import AutoModelForCausalLM

    name = request.param
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.float32).cuda().eval()
    with torch.no_grad():  # larger than the default init, so greedy outputs vary from token to token
        for param_name, param in hf.named_parameters():
            if "norm" not in param_name:
                param.normal_(0, 0.05)
            param.copy_(param.to(torch.bfloat16).float())
    yield name, hf, model_dir(name, tmp_path_factory.mktemp(name))
    del hf
    gc.collect()
    torch.cuda.empty_cache()


def make_engine(reference, dtype: str, **options) -> Engine:
    _, hf, directory = reference
    engine = Engine(
        str(directory), load_format="dummy", dtype=dtype, num_kv_blocks=1024, max_num_batched_tokens=256,
        max_num_seqs=32, stat_loggers=[], **options,
    )  # fmt: skip
    loaded = engine.runner.model.load_weights(hf.state_dict().items())
    assert loaded == {n for n, _ in engine.runner.model.named_parameters()}
    return engine


def ours(reference, dtype: str, **options) -> list[list[int]]:
    _, hf, _ = reference
    engine = make_engine(reference, dtype, **options)
    outs = engine.generate(make_prompts(hf.config.vocab_size), GREEDY, use_tqdm=False)
    assert outs[-2].num_cached_tokens > 0 and outs[-1].num_cached_tokens > 0, "the last prompts share blocks"
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


@torch.no_grad()
def hf_greedy(hf, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt], device="cuda")
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), torch.stack(out.logits)[:, 0].float()


def test_fp32_tokens_equal_transformers(reference):
    name, hf, _ = reference
    if name == "llama-3-8b":
        pytest.skip("two fp32 copies of 8B parameters do not fit beside each other; fp32 is shown on Qwen3-0.6B")
    prompts = make_prompts(hf.config.vocab_size)
    expected = [hf_greedy(hf, p)[0] for p in prompts]
    assert all(len(set(t)) > 8 for t in expected), "random weights must not make the model repeat itself"
    assert ours(reference, "float32") == expected


def test_bf16_tokens_equal_transformers_up_to_rounding(reference):
    name, hf, _ = reference
    prompts = make_prompts(hf.config.vocab_size)
    tokens = ours(reference, "bfloat16")
    hf.to(torch.bfloat16)
    try:
        runs = [hf_greedy(hf, p) for p in prompts]
    finally:
        hf.to(torch.float32)  # exact: the weights are bf16 numbers
    exact, report = 0, []
    for prompt, mine, (theirs, logits) in zip(prompts, tokens, runs):
        step = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if step is None:
            exact += 1
            continue
        with torch.no_grad():  # transformers' fp32 logits along its own bf16 path, up to the divergence
            fp32 = hf(torch.tensor([prompt + theirs[:step]], device="cuda")).logits[0, -1].float()
        top2 = logits[step].topk(2).values
        margin, rounding = (top2[0] - top2[1]).item(), (logits[step] - fp32).abs().max().item()
        report.append(f"len {len(prompt)}: step {step}, top-2 margin {margin:.4f} < bf16 error {rounding:.4f}")
        assert margin < rounding, f"{name}: a divergence with a clear top-2 margin: {report[-1]}"
    print(f"\n{name} bf16: {exact}/{len(prompts)} identical; " + "; ".join(report))


def test_cuda_graphs_on_and_off_give_identical_tokens(reference):
    assert ours(reference, "bfloat16") == ours(reference, "bfloat16", enforce_eager=True)


def test_sampling_on_the_gpu_is_seeded_and_complete(reference):
    _, hf, _ = reference
    engine = make_engine(reference, "bfloat16")
    prompts = make_prompts(hf.config.vocab_size)
    params = SamplingParams(
        temperature=0.8, top_p=0.9, top_k=40, min_p=0.01, seed=7, max_tokens=16, logprobs=3, min_tokens=4,
        repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2,
    )  # fmt: skip
    alone = engine.generate(prompts[3], params, use_tqdm=False)[0].outputs[0]
    batch = engine.generate(prompts[:4], params, use_tqdm=False)[3].outputs[0]
    assert batch.token_ids == alone.token_ids and len(alone.token_ids) == 16
    assert all(len(lp) in (3, 4) and tok in lp for tok, lp in zip(alone.token_ids, alone.logprobs))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
