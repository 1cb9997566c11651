"""A tiny random Llama as a GGUF file of 4-bit matrices (Q4_0 layers, a Q8_0 tied embedding), the shape of
what llama.cpp ships, for tests of the CPU's packed 4-bit copies without the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
# Printable ASCII spells itself in byte-level BPE; space and newline are "Ġ" and "Ċ". 128 tokens in all: a
# whole number of the int4 kernel's 64-row blocks for the tied LM head.
TOKENS = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "Ġh"] + [f"<extra_{i}>" for i in range(30)] + ["<|im_end|>"]


def write_tiny_gguf(path: Path, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e4)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_merges(["Ġ h"])
    w.add_token_types([1] * (len(TOKENS) - 1) + [3])
    w.add_eos_token_id(len(TOKENS) - 1)
    w.add_add_bos_token(False)
    w.add_chat_template("{{ messages }}")

    def matrix(name: str, rows: int, columns: int, kind: GGMLQuantizationType, std: float) -> None:
        values = rng.standard_normal((rows, columns), dtype=np.float32) * std
        raw = quantize(values, kind)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)

    matrix("token_embd.weight", len(TOKENS), HIDDEN, GGMLQuantizationType.Q8_0, 1.0)
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32))
        for name, rows, columns in [
            ("attn_q", HIDDEN, HIDDEN),
            ("attn_k", KV_HEADS * head_dim, HIDDEN),
            ("attn_v", KV_HEADS * head_dim, HIDDEN),
            ("attn_output", HIDDEN, HIDDEN),
            ("ffn_gate", FFN, HIDDEN),
            ("ffn_up", FFN, HIDDEN),
            ("ffn_down", HIDDEN, FFN),
        ]:
            matrix(f"blk.{i}.{name}.weight", rows, columns, GGMLQuantizationType.Q4_0, 0.3)
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
