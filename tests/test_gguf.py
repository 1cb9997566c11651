"""Tests for miniengine.gguf_loader: parity with transformers (and llama.cpp) on the bundled SmolLM2 GGUF,
plus small synthetic GGUF files for the qwen2 mapping, the q/k un-permutation and the error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from miniengine.gguf_loader import load_gguf

TEXTS = [
    "12345",
    "in 2024, pi was 3.14159 and 1,000,000 people agreed",
    "a1b2c3 x=10**9+7",
    "Hello world! It's don't we'll",
    "café 🙂 naïve Ωmega 日本語",
    "def f(x):\n    return x + 1\n\n\n",
    "\t\t  tabs  and   spaces   ",
    "  leading and trailing  ",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
]
# Whitespace runs before a digit: SmolLM2 splits digits off first ("smollm" pre-tokenizer in llama.cpp, Digits
# in its tokenizer.json), so "  1" is "ĠĠ" + "1". transformers' GGUF tokenizer ignores tokenizer.ggml.pre
# "smollm" and yields "Ġ", "Ġ", "1" instead; the expected ids below come from llama.cpp.
LLAMA_CPP_ONLY = {"x  +  1": [104, 216, 1232, 256, 33]}


# --- the real SmolLM2-135M-Instruct GGUF -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(smollm2_path):
    return load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def hf_tokenizer(hf_smollm2):
    return hf_smollm2[1]


@pytest.fixture(scope="module")
def hf_state_dict(hf_smollm2):
    return hf_smollm2[0].state_dict()


@pytest.mark.slow
def test_tokenizer_matches_transformers(ckpt, hf_tokenizer):
    for text in TEXTS:
        ids = ckpt.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert ckpt.tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_tokenizer_matches_llama_cpp(ckpt, smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(smollm2_path, vocab_only=True, verbose=False)
    for text in [*TEXTS, *LLAMA_CPP_ONLY]:
        expected = vocab.tokenize(text.encode(), add_bos=False, special=True)
        assert ckpt.tokenizer.encode(text, add_special_tokens=False).ids == expected, text


@pytest.mark.slow
def test_tokenizer_splits_digits_before_whitespace(ckpt):
    for text, expected in LLAMA_CPP_ONLY.items():
        assert ckpt.tokenizer.encode(text, add_special_tokens=False).ids == expected


@pytest.mark.slow
def test_smollm2_config(ckpt, smollm2_path):
    c = ckpt.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["vocab_size"] == 49152 and c["max_position_embeddings"] == 8192
    assert c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == pytest.approx(1e-5)
    assert c["tie_word_embeddings"] is True and c["attention_bias"] is False
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2) and c["torch_dtype"] == "float32"
    tc = ckpt.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert isinstance(tc["chat_template"], str) and "im_start" in tc["chat_template"]
    assert ckpt.path == smollm2_path


@pytest.mark.slow
def test_weights_match_transformers(ckpt, hf_state_dict):
    seen = set()
    for name, tensor in ckpt.weights():
        ref = hf_state_dict[name]
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape, name
        assert torch.allclose(tensor, ref, rtol=1e-6, atol=1e-7), name
        seen.add(name)
    assert seen == set(hf_state_dict) - {"lm_head.weight"}  # tied: transformers aliases the embedding
    assert len(seen) == 2 + 9 * ckpt.config["num_hidden_layers"]


# --- small synthetic GGUF files ---------------------------------------------------------------------------

# Printable ASCII is its own byte-level spelling; space and newline are spelled "Ġ" and "Ċ".
BASE_TOKENS = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"]
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>"]


def write_gguf(path, arch: str, tensors: dict, tokenizer_model: str = "gpt2", add_bos: bool = True) -> str:
    """A one-layer GGUF holding `tensors` ({gguf name: HF-shaped float32 array, or (raw array, type)})."""
    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    tokens = BASE_TOKENS + ["Ġh", "Ġhi"] + SPECIAL_TOKENS
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ h", "Ġh i"])
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 4])
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{{ messages }}")
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_shape=value[0].shape, raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of Llama checkpoints (the inverse of what we must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_qwen2_is_not_permuted_and_keeps_biases(tmp_path):
    rng = np.random.default_rng(0)
    q, q_bias = rng.standard_normal((8, 8), dtype=np.float32), rng.standard_normal(8, dtype=np.float32)
    down = rng.standard_normal((8, 16)).astype(np.float16)
    path = write_gguf(
        tmp_path / "qwen2.gguf",
        "qwen2",
        {"blk.0.attn_q.weight": q, "blk.0.attn_q.bias": q_bias, "blk.0.ffn_down.weight": down},
    )
    ckpt = load_gguf(path)
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"] and ckpt.config["attention_bias"] is True
    assert (ckpt.config["head_dim"], ckpt.config["num_key_value_heads"]) == (4, 1)
    weights = dict(ckpt.weights())
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.bias"], torch.from_numpy(q_bias))
    assert torch.equal(weights["model.layers.0.mlp.down_proj.weight"], torch.from_numpy(down.astype(np.float32)))

    tok = ckpt.tokenizer
    im_start, im_end, think = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
    assert tok.encode("<|im_start|>hi<think>!<|im_end|>", add_special_tokens=False).ids == [
        im_start,
        tok.token_to_id("h"),
        tok.token_to_id("i"),
        think,
        tok.token_to_id("!"),
        im_end,
    ]
    assert tok.encode(" hi", add_special_tokens=False).tokens == ["Ġhi"]
    assert tok.encode("12", add_special_tokens=False).tokens == ["1", "2"]
    assert tok.encode(" hi").ids[0] == im_start  # add_bos_token
    assert tok.decode([im_start, think, im_end]) == "<think>"  # user-defined tokens are not special


def test_llama_q_k_rows_are_unpermuted_and_quantized_tensors_dequantized(tmp_path):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((8, 32), dtype=np.float32)
    k = rng.standard_normal((4, 32), dtype=np.float32)
    path = write_gguf(
        tmp_path / "llama.gguf",
        "llama",
        {
            "blk.0.attn_q.weight": llama_cpp_permute(q, n_head=2),
            "blk.0.attn_k.weight": (
                quantize(llama_cpp_permute(k, n_head=1), GGMLQuantizationType.Q8_0),
                GGMLQuantizationType.Q8_0,
            ),
            "output.weight": rng.standard_normal((len(BASE_TOKENS), 8), dtype=np.float32),
        },
    )
    ckpt = load_gguf(path)
    assert ckpt.config["tie_word_embeddings"] is False
    weights = dict(ckpt.weights())
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    k_loaded = weights["model.layers.0.self_attn.k_proj.weight"]
    assert k_loaded.shape == (4, 32) and torch.allclose(k_loaded, torch.from_numpy(k), atol=0.03)
    assert "lm_head.weight" in weights


def test_unsupported_tokenizer_model_is_rejected(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", "llama", {}, tokenizer_model="llama")
    with pytest.raises(NotImplementedError, match="'llama'"):
        load_gguf(path)


def test_unknown_tensor_type_and_name_are_rejected(tmp_path):
    ints = np.arange(8, dtype=np.int32)
    ckpt = load_gguf(write_gguf(tmp_path / "i32.gguf", "llama", {"blk.0.attn_norm.weight": ints}))
    with pytest.raises(ValueError, match=r"blk\.0\.attn_norm\.weight.*I32"):
        list(ckpt.weights())
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf(write_gguf(tmp_path / "rope.gguf", "llama", {"rope_freqs.weight": np.ones(4, np.float32)}))
