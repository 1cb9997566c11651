"""On the GPU: real model shapes (Qwen3-0.6B, Llama-3-8B) with random weights, bf16, against transformers.

transformers builds each model with its own random init; our engine loads the very same tensors through its
`load_weights` (the loader's name mapping, stacked qkv / gate_up). A mixed batch of prompts with chunked
prefill and prefix-cache hits must give transformers' greedy tokens. bf16 arithmetic differs between any two
implementations in its last bits, so a divergence is accepted only after a step where transformers' own top
two logits are within bf16 rounding of each other (checked, not assumed). CUDA graphs on and off must give
identical tokens. Run with `pytest -m gpu` on a CUDA machine.
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
from presets import hf_config, model_dir  # noqa: E402

MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def bf16_ulp(x: float) -> float:
    """The gap between neighbouring bf16 values near x (8 significant bits)."""
    return 2.0 ** (torch.tensor(abs(x) or 1e-30).log2().floor().item() - 7)


def make_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (5, 17, 33, 64, 100, 129, 200, 257, 300, 513)]
    prompts += [prompts[9][:320] + [7, 8, 9], prompts[7][:160] + [1, 2]]  # share full blocks: prefix hits
    return prompts


@pytest.fixture(scope="module", params=["qwen3-0.6b", "llama-3-8b"])
def pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    name = request.param
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config(name), dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():  # larger than the default init, so greedy outputs vary from token to token
        for param_name, param in hf.named_parameters():
            if "norm" not in param_name:
                param.normal_(0, 0.05)
    directory = model_dir(name, tmp_path_factory.mktemp(name))
    engine = Engine(
        str(directory), load_format="dummy", num_kv_blocks=2048, max_num_batched_tokens=256, max_num_seqs=32,
        stat_loggers=[],
    )  # fmt: skip
    loaded = engine.runner.model.load_weights(hf.state_dict().items())
    assert loaded == {n for n, _ in engine.runner.model.named_parameters()}
    yield name, hf, engine
    del hf, engine
    torch.cuda.empty_cache()


def hf_greedy(hf, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([prompt], device="cuda")
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), torch.stack(out.logits)[:, 0].float()


def test_greedy_tokens_equal_transformers(pair):
    name, hf, engine = pair
    prompts = make_prompts(hf.config.vocab_size)
    outs = engine.generate(prompts, GREEDY, use_tqdm=False)
    assert any(o.num_cached_tokens > 0 for o in outs), "the last prompts should hit the prefix cache"
    exact, report = 0, []
    for prompt, out in zip(prompts, outs):
        ours = out.outputs[0].token_ids
        theirs, logits = hf_greedy(hf, prompt)
        assert len(set(theirs)) > 4, "random weights must not make the model repeat one token"
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if first is None:
            exact += 1
            continue
        top2 = logits[first].topk(2).values.tolist()
        margin, tolerance = top2[0] - top2[1], 2 * bf16_ulp(top2[0])
        report.append(f"prompt of {len(prompt)}: diverges at token {first}, top-2 margin {margin:.4g} ({tolerance=})")
        assert margin <= tolerance, f"{name}: {report[-1]}"
    print(f"{name}: {exact}/{len(prompts)} identical; " + "; ".join(report))
    assert exact >= len(prompts) // 2


def test_cuda_graphs_on_and_off_give_identical_tokens(pair):
    name, hf, engine = pair
    prompts = make_prompts(hf.config.vocab_size)
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs, "decode steps should replay graphs"
    engine.reset_prefix_cache()
    with_graphs = [o.outputs[0].token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
    engine.runner.capture_graphs(engine.config.max_num_seqs, engine.max_model_len, capture=False)
    try:
        engine.reset_prefix_cache()
        eager = [o.outputs[0].token_ids for o in engine.generate(prompts, GREEDY, use_tqdm=False)]
    finally:
        engine.runner.capture_graphs(engine.config.max_num_seqs, engine.max_model_len)
    assert eager == with_graphs


def test_sampling_on_the_gpu_is_seeded_and_bounded(pair):
    _, hf, engine = pair
    prompt = make_prompts(hf.config.vocab_size)[3]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.01, seed=7, max_tokens=16, logprobs=3,
                            repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2)  # fmt: skip
    alone = engine.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    batch = engine.generate(make_prompts(hf.config.vocab_size)[:4], params, use_tqdm=False)[3].outputs[0]
    assert batch.token_ids == alone.token_ids
    assert all(len(lp) in (3, 4) and tok in lp for tok, lp in zip(alone.token_ids, alone.logprobs))
