"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention with a sparse MoE block in each layer.

Routing: softmax over all experts, top-k, renormalised when `norm_topk_prob` (true in the released models).
Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` beat, keep a dense MLP of
`intermediate_size`; the experts have `moe_intermediate_size`.
"""

from __future__ import annotations

from types import SimpleNamespace

from miniengine.models.moe import MoeDecoderLayer, MoeForCausalLM, SparseMoeBlock
from miniengine.models.qwen3 import Qwen3Attention


def num_experts(config: SimpleNamespace) -> int:
    """Hub configs say `num_experts`; transformers 5 saves the same number as `num_local_experts`."""
    return getattr(config, "num_experts", None) or config.num_local_experts


def qwen_dense_layers(config: SimpleNamespace) -> list[int]:
    """The layers transformers builds with a dense MLP: listed in mlp_only_layers, or off the sparse step."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only = set(getattr(config, "mlp_only_layers", None) or [])
    sparse = num_experts(config) > 0
    return [i for i in range(config.num_hidden_layers) if i in only or not sparse or (i + 1) % step]


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    attention_cls = Qwen3Attention

    @staticmethod
    def moe_block(config: SimpleNamespace) -> SparseMoeBlock:
        renormalize = bool(getattr(config, "norm_topk_prob", False))
        return SparseMoeBlock(config, num_experts(config), config.moe_intermediate_size, renormalize)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
    dense_layers = staticmethod(qwen_dense_layers)
