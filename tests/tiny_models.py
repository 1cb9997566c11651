"""Tiny random checkpoints of real architectures, saved by transformers, for parity tests.

transformers' default init (std 0.02) makes tiny models repeat one token forever, which proves little;
a larger std makes greedy outputs vary from token to token.
"""

from __future__ import annotations

from pathlib import Path

import torch

_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
# Each architecture's own features in play: Qwen2 ties its embeddings here, Qwen3 has a head_dim of its own.
CONFIGS = {
    "llama": dict(_SHAPE, model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(_SHAPE, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(_SHAPE, model_type="qwen3", head_dim=32, tie_word_embeddings=False),
}


def make_tiny_model(directory: Path, name: str, std: float = 0.5, seed: int = 0) -> Path:
    """Save a random `name` model (see CONFIGS) as safetensors in `directory`; returns the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(CONFIGS[name])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.uniform_(0.5, 1.5)
            elif param_name.endswith("bias"):
                param.normal_(0, 0.1)
            else:
                param.normal_(0, std)
    model.save_pretrained(directory)
    return directory


def hf_greedy(directory: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """transformers' own greedy continuation of each prompt, one at a time (no padding effects)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        with torch.no_grad():
            # An explicit mask: with pad_token_id set, transformers would mask prompt tokens equal to it.
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        outs.append(gen[0, len(ids) :].tolist())
    return outs


# Mixture-of-experts models: few small experts, so every expert gets tokens in some steps and none in others.
# Qwen3-MoE keeps layer 1 dense (mlp_only_layers) and renormalises its top-3; Qwen2-MoE adds a shared expert.
CONFIGS.update(
    qwen3_moe=dict(
        _SHAPE,
        model_type="qwen3_moe",
        num_hidden_layers=3,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    ),
    mixtral=dict(_SHAPE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    qwen2_moe=dict(
        _SHAPE,
        model_type="qwen2_moe",
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        tie_word_embeddings=False,
    ),
)
