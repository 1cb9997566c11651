"""Mixtral (8x7B, 8x22B): Llama's attention with a sparse MoE block of 8 experts, top-2, in every layer.

Routing: softmax over all experts, top-2, renormalised (the same as a softmax over the two chosen logits).
Checkpoints name the block `block_sparse_moe` and the projections w1 (gate), w3 (up), w2 (down).
"""

from __future__ import annotations

from types import SimpleNamespace

from miniengine.models.moe import MoeDecoderLayer, MoeForCausalLM, SparseMoeBlock


class MixtralDecoderLayer(MoeDecoderLayer):
    @staticmethod
    def moe_block(config: SimpleNamespace) -> SparseMoeBlock:
        return SparseMoeBlock(config, config.num_local_experts, config.intermediate_size, renormalize=True)


class MixtralForCausalLM(MoeForCausalLM):
    layer_cls = MixtralDecoderLayer
    expert_projections = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 0)}
    renames = {".block_sparse_moe.": ".mlp."}
