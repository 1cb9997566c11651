"""MoE models: tiny random Qwen3-MoE, Mixtral and Qwen2-MoE equal transformers' greedy tokens through the
whole engine (a mixed batch of decodes and prefill chunks, then prefix-cache hits); checkpoints with experts
stored per expert or fused load the same; a broken checkpoint names what is wrong.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity import GREEDY, MAX_TOKENS, make_prompts, record_steps, token_ids
from tiny_models import CONFIGS, hf_greedy, make_tiny_model

from miniengine import Engine, SamplingParams
from miniengine.loader import load_model, open_checkpoint
from miniengine.models.llama import LlamaMLP
from miniengine.models.moe import SparseMoeBlock
from miniengine.models.qwen3_moe import Qwen3MoeForCausalLM

MOE_MODELS = ["qwen3_moe", "mixtral", "qwen2_moe"]


@pytest.fixture(scope="module", params=MOE_MODELS)
def tiny(request, tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    prompts = make_prompts(2)
    follow_ups = [p + [11, 12] for p in prompts[4:]]
    expected = hf_greedy(directory, prompts + follow_ups, MAX_TOKENS)
    return directory, prompts, follow_ups, expected


def test_mixed_batches_and_prefix_hits_match_transformers(tiny):
    directory, prompts, follow_ups, expected = tiny
    assert all(len(set(ids)) > MAX_TOKENS // 2 for ids in expected), "the random model must not repeat one token"
    engine = Engine(str(directory), max_num_batched_tokens=48, max_num_seqs=16, block_size=16, num_kv_blocks=128)
    steps = record_steps(engine)
    assert token_ids(engine.generate(prompts, GREEDY, use_tqdm=False)) == expected[: len(prompts)]
    assert any(decodes and chunks for decodes, chunks in steps), "some step should mix decodes with a prompt chunk"
    second = engine.generate(follow_ups, GREEDY, use_tqdm=False)
    assert token_ids(second) == expected[len(prompts) :]
    assert all(o.num_cached_tokens > 0 for o in second), "follow-ups should hit the prefix cache"


def params(directory: Path) -> dict[str, torch.Tensor]:
    model = load_model(open_checkpoint(str(directory)), torch.device("cpu"), torch.float32, "auto", 0)
    return dict(model.named_parameters())


def copy_checkpoint(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    save_file(tensors, target / "model.safetensors")
    return target


def test_fused_and_per_expert_layouts_load_the_same(tiny, tmp_path):
    """transformers saves per-expert tensors (hub names); with save_original_format=False, its own fused ones."""
    from transformers import AutoModelForCausalLM

    directory = tiny[0]
    names = set(load_file(directory / "model.safetensors"))
    assert any(".experts.0." in n for n in names), "the default save is one tensor per expert"
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    fused_names = set(load_file(tmp_path / "fused" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused_names
    assert not any(".experts.0." in n for n in fused_names)
    per_expert, fused = params(directory), params(tmp_path / "fused")
    assert per_expert.keys() == fused.keys()
    for name, value in per_expert.items():
        torch.testing.assert_close(fused[name], value, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def mixtral_tensors(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=1)
    return directory, load_file(directory / "model.safetensors")


def test_missing_expert_weight_is_named(mixtral_tensors, tmp_path):
    directory, tensors = mixtral_tensors
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    broken = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(ValueError, match=rf"lacks expert weights {name}$"):
        params(copy_checkpoint(directory, tmp_path / "a", broken))
    no_experts = {k: v for k, v in tensors.items() if ".experts." not in k}
    first = "model.layers.0.block_sparse_moe.experts.0.w1.weight, model.layers.0.block_sparse_moe.experts.0.w3.weight"
    with pytest.raises(ValueError, match=rf"lacks expert weights {first}, .* and 19 more"):
        params(copy_checkpoint(directory, tmp_path / "b", no_experts))


def test_misshapen_expert_weight_is_named(mixtral_tensors, tmp_path):
    directory, tensors = mixtral_tensors
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    broken = dict(tensors, **{name: tensors[name][:, :-1].contiguous()})
    with pytest.raises(ValueError, match=rf"{name}: checkpoint shape \(64, 127\) != model \(64, 128\)"):
        params(copy_checkpoint(directory, tmp_path / "broken", broken))


def test_expert_beyond_the_config_and_unknown_names_are_named(mixtral_tensors, tmp_path):
    directory, tensors = mixtral_tensors
    extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"  # the config has 4 experts
    with pytest.raises(ValueError, match=rf"{extra}: expert 4, but the model has 4"):
        params(copy_checkpoint(directory, tmp_path / "a", dict(tensors, **{extra: torch.zeros(128, 64)})))
    unknown = "model.layers.0.block_sparse_moe.router_bias"
    with pytest.raises(KeyError, match="router_bias"):
        params(copy_checkpoint(directory, tmp_path / "b", dict(tensors, **{unknown: torch.zeros(4)})))


def test_dummy_weights(tmp_path):
    directory = tmp_path / "qwen3_moe"
    directory.mkdir()
    config = dict(CONFIGS["qwen3_moe"], architectures=["Qwen3MoeForCausalLM"])
    (directory / "config.json").write_text(json.dumps(config))
    engine = Engine(str(directory), load_format="dummy", num_kv_blocks=16)
    experts = engine.runner.model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.std() > 0.01 and experts.down_proj.std() > 0.01
    (out,) = engine.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == MAX_TOKENS


def test_dense_layers_follow_the_config():
    base = dict(CONFIGS["qwen3_moe"], num_hidden_layers=6, num_local_experts=8)
    del base["num_experts"]  # transformers 5 saves the expert count under this name
    for overrides, dense in [
        (dict(mlp_only_layers=[1]), {1}),
        (dict(mlp_only_layers=[], decoder_sparse_step=2), {0, 2, 4}),
        (dict(mlp_only_layers=[5], decoder_sparse_step=3), {0, 1, 3, 4, 5}),
    ]:
        model = Qwen3MoeForCausalLM(SimpleNamespace(**{**base, **overrides}))
        kinds = [type(layer.mlp) for layer in model.model.layers]
        assert {i for i, kind in enumerate(kinds) if kind is LlamaMLP} == dense
        assert all(kind is SparseMoeBlock for i, kind in enumerate(kinds) if i not in dense)


# ---- on the GPU: Qwen3-30B-A3B's layer shape (128 experts of 768, top-8, hidden 2048), two layers ---------


@pytest.fixture(scope="module")
def qwen3_moe_shaped(tmp_path_factory):
    """transformers' Qwen3-MoE (fp32, weights exactly representable in bf16) and our engine's config directory."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from presets import hf_config, model_dir

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config("qwen3-30b-a3b", num_hidden_layers=2), dtype=torch.float32)
    hf = hf.cuda().eval()
    hf.set_experts_implementation("eager")  # transformers' own loop over experts, in fp32 as in bf16
    with torch.no_grad():  # unit-sized activations in every layer, so greedy outputs vary from token to token
        for name, param in hf.named_parameters():
            if "norm" not in name:
                param.normal_(0, 2 * param.shape[-1] ** -0.5)
            param.copy_(param.to(torch.bfloat16).float())
    yield hf, model_dir("qwen3-30b-a3b", tmp_path_factory.mktemp("qwen3-moe"), num_hidden_layers=2)
    del hf
    torch.cuda.empty_cache()


def make_engine(hf, directory: Path, dtype: str) -> Engine:
    """Our engine on transformers' weights, loaded from its fused in-memory layout."""
    engine = Engine(
        str(directory), load_format="dummy", dtype=dtype, num_kv_blocks=2048, max_num_batched_tokens=256,
        max_num_seqs=64, stat_loggers=[],
    )  # fmt: skip
    assert engine.runner.kernels.fused_moe.__module__.endswith("triton_moe"), "CUDA runs the Triton MoE kernel"
    loaded = engine.runner.model.load_weights(hf.state_dict().items())
    assert loaded == {name for name, _ in engine.runner.model.named_parameters()}
    return engine


def hf_greedy_gpu(hf, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        gen = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
    return gen[0, len(prompt) :].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen3_moe_shaped_model_fp32_equals_transformers_on_gpu(qwen3_moe_shaped):
    """A mixed batch (chunked prefill, prefix hits), decode steps through CUDA graphs: token for token."""
    hf, directory = qwen3_moe_shaped
    prompts = make_prompts(3)
    expected = [hf_greedy_gpu(hf, p) for p in prompts]
    assert all(len(set(t)) > MAX_TOKENS // 2 for t in expected), "the random model must not repeat itself"
    engine = make_engine(hf, directory, "float32")
    assert token_ids(engine.generate(prompts, GREEDY, use_tqdm=False)) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen3_moe_shaped_model_bf16_follows_transformers_on_gpu(qwen3_moe_shaped):
    """In bf16 a MoE model cannot match token for token: two experts' router logits often round to the same
    bf16 value, and last-bit differences between two correct implementations pick one or the other. A changed
    expert moves the logits far more than rounding does (so, unlike a dense model's test, a divergence cannot
    be bounded by the rounding error), and greedy paths part for good. So each step is compared on
    transformers' own path (teacher forcing): given the same tokens so far, our next token must be its next
    token at almost every step. A bug misses at most steps; expert flips at a few."""
    hf, directory = qwen3_moe_shaped
    prompts = make_prompts(3)
    hf.to(torch.bfloat16)
    try:
        paths = [(p, hf_greedy_gpu(hf, p)) for p in prompts]
    finally:
        hf.to(torch.float32)
    engine = make_engine(hf, directory, "bfloat16")
    contexts = [prompt + theirs[:i] for prompt, theirs in paths for i in range(MAX_TOKENS)]
    outs = engine.generate(contexts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    expected = [token for _, theirs in paths for token in theirs]
    agree = sum(o.outputs[0].token_ids[0] == t for o, t in zip(outs, expected)) / len(expected)
    print(f"\nQwen3-MoE bf16: our next token equals transformers' at {agree:.1%} of {len(expected)} steps")
    assert agree >= 0.85


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [3, 64, 1000])
def test_qwen3_moe_block_matches_transformers_on_gpu(qwen3_moe_shaped, num_tokens):
    """One MoE block, same weights and inputs: routing is then identical, and outputs agree to bf16 rounding."""
    from miniengine.forward_context import ForwardContext, Kernels, set_forward_context
    from miniengine.kernels import triton_moe
    from miniengine.models.qwen3_moe import Qwen3MoeDecoderLayer

    hf, _ = qwen3_moe_shaped
    hf_block = copy.deepcopy(hf.model.layers[0].mlp).to(torch.bfloat16)
    with torch.device("cuda"):
        ours = Qwen3MoeDecoderLayer.moe_block(hf.config).to(torch.bfloat16)
    ours.load_state_dict(hf_block.state_dict())
    x = torch.randn(1, num_tokens, hf.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = hf_block(x)
        expected = (expected[0] if isinstance(expected, tuple) else expected)[0].float()  # older: (out, logits)
        kernels = Kernels("triton", store_kv=None, attend=None, fused_moe=triton_moe.fused_moe)
        with set_forward_context(ForwardContext(None, kernels)):
            out = ours(x[0]).float()
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()
