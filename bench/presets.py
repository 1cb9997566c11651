"""Configs of real models, for benchmarks and GPU tests that cannot download weights.

`model_dir(name, directory)` writes the model's `config.json` (the values of its published config) into
`directory`; load it with `load_format="dummy"` for random weights of the real shapes. `hf_model(name)` builds
transformers' own model of the same config (random weights), for parity runs on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

_QWEN3 = dict(
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, head_dim=128, rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
    attention_bias=False, hidden_act="silu", torch_dtype="bfloat16",
)  # fmt: skip
_LLAMA3 = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001,
    attention_bias=False, hidden_act="silu", torch_dtype="bfloat16", tie_word_embeddings=False,
)  # fmt: skip

PRESETS: dict[str, dict] = {
    "qwen3-0.6b": dict(
        _QWEN3,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "llama-3-8b": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),  # fmt: skip
    "llama-3.2-1b": dict(
        _LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
    ),  # fmt: skip
    "qwen3-30b-a3b": dict(
        _QWEN3,
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    ),  # fmt: skip
    "mixtral-8x7b": dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
    ),  # fmt: skip
}


def model_dir(name: str, directory: Path, **overrides) -> Path:
    """Write `name`'s config.json (with `overrides`, e.g. num_hidden_layers=2) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(PRESETS[name], **overrides), indent=2))
    return directory


def word_tokenizer(directory: Path) -> Path:
    """Give a preset's directory a tokenizer (one word per id, "w0".."wN", words joined by spaces), so that
    served completions stream text as a real model's would: with no tokenizer there is no text to stream
    until each request ends (what `bench/serve.py` must not measure)."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab_size = json.loads((directory / "config.json").read_text())["vocab_size"]
    tokenizer = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def hf_config(name: str, **overrides):
    from transformers import AutoConfig

    config = dict(PRESETS[name], **overrides)
    config.pop("architectures")
    return AutoConfig.for_model(config.pop("model_type"), **config)
