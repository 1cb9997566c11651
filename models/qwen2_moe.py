"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen3-MoE's layout on Qwen2's attention, plus a shared expert.

Every token also goes through one dense "shared expert" MLP, scaled by a sigmoid gate of its own:

    out = experts(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from miniengine.models.llama import LlamaMLP
from miniengine.models.moe import MoeDecoderLayer, MoeForCausalLM, SparseMoeBlock
from miniengine.models.qwen2 import Qwen2Attention
from miniengine.models.qwen3_moe import num_experts, qwen_dense_layers


class SharedExpertMoeBlock(SparseMoeBlock):
    def __init__(self, config: SimpleNamespace) -> None:
        renormalize = bool(getattr(config, "norm_topk_prob", False))
        super().__init__(config, num_experts(config), config.moe_intermediate_size, renormalize)
        self.shared_expert = LlamaMLP(
            SimpleNamespace(**{**vars(config), "intermediate_size": config.shared_expert_intermediate_size})
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Qwen2MoeDecoderLayer(MoeDecoderLayer):
    attention_cls = Qwen2Attention
    moe_block = staticmethod(SharedExpertMoeBlock)


class Qwen2MoeForCausalLM(MoeForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer
    dense_layers = staticmethod(qwen_dense_layers)
