"""Checkpoints of the world model: its config.json and random weights under its own tensor names.

There is no trained model to download here, so tests and the benchmark make one: `action_config` fills in
a config from a shape (TINY for tests, LLAMA_1B for the benchmark), `make_checkpoint` writes it with seeded
random weights as safetensors, in the names `model.py` maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from miniengine_action_model import ARCHITECTURE

# Test-sized: fast on a CPU, and random weights large enough that greedy choices are clear-cut.
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    image_vocab_size=96, tokens_per_frame=12, actions_per_frame=3, action_dim=3, max_frames=6,
)  # fmt: skip
# Llama-3.2-1B's body; 576 image tokens (a 24 x 24 grid) and 6 action tokens of 3 numbers per frame.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    rope_theta=500000.0, image_vocab_size=8192, tokens_per_frame=576, actions_per_frame=6, action_dim=3, max_frames=8,
)  # fmt: skip


def action_config(**shape) -> dict:
    """A complete config.json for the world model of this shape."""
    config = dict(shape)
    frame_len = config["tokens_per_frame"] + config["actions_per_frame"]
    config.setdefault("rope_theta", 10000.0)
    config.update(
        architectures=[ARCHITECTURE],
        model_type="action_world_model",
        vocab_size=config["image_vocab_size"] + 1,  # the image codebook, then the action placeholder
        action_token_id=config["image_vocab_size"],
        max_position_embeddings=config["max_frames"] * frame_len,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
    )
    return config


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {
        "tok_embeddings.weight": (config["vocab_size"], hidden),
        "norm.weight": (hidden,),
        "output.weight": (config["image_vocab_size"], hidden),
        "action_proj.weight": (hidden, config["action_dim"]),
        "action_proj.bias": (hidden,),
        "pos_embed.spatial": (config["tokens_per_frame"] + config["actions_per_frame"], hidden),
        "pos_embed.temporal": (config["max_frames"], hidden),
    }
    for i in range(config["num_hidden_layers"]):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (q, hidden),
            f"layers.{i}.attention.wk.weight": (kv, hidden),
            f"layers.{i}.attention.wv.weight": (kv, hidden),
            f"layers.{i}.attention.wo.weight": (hidden, q),
            f"layers.{i}.feed_forward.w1.weight": (inter, hidden),
            f"layers.{i}.feed_forward.w3.weight": (inter, hidden),
            f"layers.{i}.feed_forward.w2.weight": (hidden, inter),
            f"layers.{i}.attention_norm.weight": (hidden,),
            f"layers.{i}.ffn_norm.weight": (hidden,),
        })  # fmt: skip
    return shapes


def random_weights(config: dict, seed: int = 0, std: float | None = None, dtype=torch.float32) -> dict:
    """Seeded random tensors by checkpoint name. Matrices: normal(0, std), std defaulting to 1/sqrt(fan-in);
    norm weights uniform(0.5, 1.5); embedding tables normal(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in checkpoint_shapes(config).items():
        if "norm" in name:
            value = torch.rand(shape, generator=generator) + 0.5
        elif name.startswith(("tok_embeddings", "pos_embed")):
            value = torch.randn(shape, generator=generator)
        else:
            scale = std if std is not None else shape[-1] ** -0.5 if len(shape) == 2 else 0.02
            value = torch.randn(shape, generator=generator) * scale
        weights[name] = value.to(dtype)
    return weights


def make_checkpoint(directory: str | Path, config: dict, seed: int = 0, std: float | None = None,
                    dtype=torch.float32) -> Path:  # fmt: skip
    """Write config.json and model.safetensors of a random world model into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dict(config, torch_dtype=str(dtype).removeprefix("torch.")),
                                                      indent=2))  # fmt: skip
    save_file(random_weights(config, seed, std, dtype), str(directory / "model.safetensors"))
    return directory
