"""MoE models: tiny random Qwen3-MoE, Mixtral and Qwen2-MoE equal transformers' greedy tokens through the
whole engine (a mixed batch of decodes and prefill chunks, then prefix-cache hits); checkpoints with experts
stored per expert or fused load the same; a broken checkpoint names what is wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity import GREEDY, MAX_TOKENS, make_prompts, record_steps, token_ids
from tiny_models import CONFIGS, hf_greedy, make_tiny_model

from miniengine import Engine
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


# Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts of 768, top-8, 32 query / 4 KV heads of 128), 2 layers.
QWEN3_MOE_SHAPED = dict(
    model_type="qwen3_moe",
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=4096,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def make_scaled_random_model(directory: Path, shape: dict, device: str, dtype: torch.dtype):
    """transformers' model with weights of std 1/sqrt(fan_in) (unit-sized activations in every layer), saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(shape)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 2 * param.shape[-1] ** -0.5)
    model.save_pretrained(directory)
    return model.eval()


def greedy_agreement(engine: Engine, hf_model, prompts: list[list[int]], max_tokens: int) -> float:
    """The fraction of greedy tokens equal to transformers' before each sequence's first difference.

    In bf16 a MoE model cannot match token for token: two experts' router logits often round to the same
    bf16 value, and the last-bit differences between two correct implementations pick one or the other. A
    changed expert moves the logits a lot, and generations part. A bug makes them part at once."""
    from miniengine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ours = engine.generate(prompts, params, use_tqdm=False)
    same = 0
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([prompt], device=hf_model.device)
        with torch.no_grad():
            gen = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        theirs = gen[0, len(prompt) :].tolist()
        same += next((i for i, (a, b) in enumerate(zip(out.outputs[0].token_ids, theirs)) if a != b), max_tokens)
    return same / (len(prompts) * max_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qwen3_moe_shaped_model_matches_transformers_on_gpu(tmp_path):
    hf_model = make_scaled_random_model(tmp_path, QWEN3_MOE_SHAPED, "cuda", torch.bfloat16)
    engine = Engine(str(tmp_path), dtype="bfloat16", max_num_batched_tokens=64, max_num_seqs=16, num_kv_blocks=256)
    assert engine.runner.kernels.fused_moe.__module__.endswith("triton_moe"), "CUDA runs the Triton MoE kernel"
    assert greedy_agreement(engine, hf_model, make_prompts(3), 16) > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [3, 64, 1000])
def test_qwen3_moe_block_matches_transformers_on_gpu(num_tokens):
    """One MoE block, same weights and inputs: routing is then identical, and outputs agree to bf16 rounding."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from miniengine.forward_context import ForwardContext, Kernels, set_forward_context
    from miniengine.kernels import triton_moe
    from miniengine.models.qwen3_moe import Qwen3MoeDecoderLayer

    shape = dict(QWEN3_MOE_SHAPED)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf_block = Qwen3MoeSparseMoeBlock(config).to(torch.bfloat16)
        ours = Qwen3MoeDecoderLayer.moe_block(SimpleNamespace(**QWEN3_MOE_SHAPED)).to(torch.bfloat16)
    with torch.no_grad():
        for param in hf_block.parameters():
            param.normal_(0, param.shape[-1] ** -0.5)
        ours.gate.weight.copy_(hf_block.gate.weight)
        ours.experts.gate_up_proj.copy_(hf_block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf_block.experts.down_proj)
        x = torch.randn(1, num_tokens, 2048, device="cuda", dtype=torch.bfloat16)
        expected = hf_block(x)
        expected = (expected[0] if isinstance(expected, tuple) else expected)[0].float()  # older: (out, logits)
        kernels = Kernels("triton", store_kv=None, attend=None, fused_moe=triton_moe.fused_moe)
        with set_forward_context(ForwardContext(None, kernels)):
            out = ours(x[0]).float()
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()
