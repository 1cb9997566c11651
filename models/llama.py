"""Llama (SmolLM2, Llama 2/3), and the base the Qwen2 and Qwen3 models reuse.

    embed -> [ RMSNorm -> attention (qkv, rope, paged attention, o) -> +
               RMSNorm -> MLP (gate_up, SiLU * up, down)             -> + ] x L
          -> RMSNorm -> lm_head (tied to embed when the checkpoint says so)

The forward pass sees one flat batch of tokens from many sequences (no batch dimension, no padding):
attention alone needs to know which token belongs to which sequence, and reads that from the forward context.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn

from miniengine.forward_context import get_forward_context
from miniengine.models.layers import Attention, RMSNorm, RotaryEmbedding, fused_prologue
from miniengine.models.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_param,
)


def rope_settings(config: SimpleNamespace) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5's `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None) or (
        params if params.get("rope_type", "default") != "default" else None
    )
    return float(theta), scaling


class LlamaAttention(nn.Module):
    qkv_bias = False  # Qwen2 sets it
    qk_norm = False  # Qwen3 sets it: RMSNorm over each head of q and k, before rope

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = self.qkv_bias or getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads  # this rank's
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=getattr(config, "attention_bias", False),
        )
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        theta, scaling = rope_settings(config)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)
        self.split = [q_size, kv_size, kv_size]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """The rest of `forward` once q|k|v is projected (the decoder layer may fuse the projection with its norm)."""
        q, k, v = qkv.split(self.split, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else None
        if self.rotary_emb.rotate_into_cache(positions, q, k, v, norms, self.attn):  # one kernel where fused
            return self.o_proj(self.attn.attend(q))
        q, k = self.rotary_emb(positions, q, k, norms)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported (silu is)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(silu(gate) * up): one launch where down_proj's GEMV applies the activation as it loads."""
        fused = fused_prologue(self.down_proj, gate_up, "silu_matmul")
        if fused is not None:
            y = fused(gate_up)
            return y if self.down_proj.bias is None else y + self.down_proj.bias
        return self.down_proj(get_forward_context().kernels.silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        # Each norm goes with the projection after it (`RMSNorm.then`): one kernel where the platform fuses them.
        qkv, residual = self.input_layernorm.then(self.self_attn.qkv_proj, hidden, residual)
        hidden = self.self_attn.attend(positions, qkv)
        if isinstance(self.mlp, LlamaMLP):
            gate_up, residual = self.post_attention_layernorm.then(self.mlp.gate_up_proj, hidden, residual)
            return self.mlp.down(gate_up), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)  # a MoE block: router and experts
        return self.mlp(hidden), residual


def _call_layer(layer: LlamaDecoderLayer, positions: torch.Tensor, hidden: torch.Tensor, residual):
    return layer(positions, hidden, residual)


_layer_region = None  # `_call_layer` as a nested compile region, once `compile_layers_once` made it


def compile_layers_once() -> None:
    """Under torch.compile (the CPU's compiled decode step, compiled_decode.py), let every layer's call go
    through one nested compile region: the layers are the same code on other weights, so they are traced and
    compiled once (~10 s instead of minutes for 30 layers). Made on demand: it imports torch's compiler,
    which a start-up that never compiles need not pay for. torch before 2.8 lacks it and compiles each layer."""
    global _layer_region
    region = getattr(torch.compiler, "nested_compile_region", None)
    _layer_region = region(_call_layer) if region else _call_layer


def decoder_layer(layer: LlamaDecoderLayer, positions: torch.Tensor, hidden: torch.Tensor, residual):
    return (_layer_region or _call_layer)(layer, positions, hidden, residual)


class LlamaModel(nn.Module):
    def __init__(self, config: SimpleNamespace, layer_cls: type[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor | None = None):
        hidden = self.embed_tokens(input_ids) if embeds is None else embeds
        residual = None
        for layer in self.layers:
            hidden, residual = decoder_layer(layer, positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    layer_cls = LlamaDecoderLayer
    # checkpoint projection -> (our stacked projection, shard index)
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under tensor parallelism, on rank 0 only (None elsewhere)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (or lazy slices of them) into our parameters, each rank its own part;
        returns the names of the parameters filled."""
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
                continue  # the tied head is the embedding
            module_name, _, leaf = name.rpartition(".")
            parent, _, proj = module_name.rpartition(".")
            if proj in self.stacked_params:
                stacked, shard = self.stacked_params[proj]
                target = f"{parent}.{stacked}.{leaf}"
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} maps to {target!r}, which this model lacks")
                modules[f"{parent}.{stacked}"].load_shard(params[target], shard, tensor)
                loaded.add(target)
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            load_param(params[name], tensor, name)
            loaded.add(name)
        return loaded
