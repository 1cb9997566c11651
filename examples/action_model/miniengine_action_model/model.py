"""The world model inside miniengine: its Llama body, plus three things of its own.

1. Action tokens: the prompt holds a placeholder token (`action_token_id`) where each action goes; the
   model declares the extra input "actions" (one row of `action_dim` numbers per placeholder) and puts
   `action_proj(row)` in place of the placeholder's token embedding.
2. A learnable factorised spatio-temporal position embedding, added to every input embedding: one table
   for the place within a frame (image tokens, then action tokens), one for the frame number.

       position p  ->  spatial_embed[p % frame_len] + temporal_embed[p // frame_len]     (on top of RoPE)

3. Its own checkpoint names (Meta-style Llama names, plus its extras), mapped in `load_weights`; a tensor
   with no place in the model is an error naming it. The output head predicts image tokens only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch
from torch import nn

from miniengine.extra_inputs import ExtraInputRows, ExtraInputSpec
from miniengine.models.llama import LlamaForCausalLM

# checkpoint name (a regex) -> miniengine name (its expansion)
RENAMES = [
    (r"tok_embeddings\.weight", r"model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
    (r"action_proj\.(weight|bias)", r"action_proj.\1"),
    (r"pos_embed\.spatial", r"spatial_embed.weight"),
    (r"pos_embed\.temporal", r"temporal_embed.weight"),
]


def to_engine_name(name: str) -> str | None:
    for pattern, replacement in RENAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(replacement)
    return None


class ActionWorldModel(LlamaForCausalLM):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.frame_len = config.tokens_per_frame + config.actions_per_frame
        self.lm_head = nn.Linear(hidden, config.image_vocab_size, bias=False)  # image tokens only
        self.action_proj = nn.Linear(config.action_dim, hidden)
        self.spatial_embed = nn.Embedding(self.frame_len, hidden)
        self.temporal_embed = nn.Embedding(config.max_frames, hidden)
        self.extra_input_specs = {
            "actions": ExtraInputSpec(config.action_token_id, (config.action_dim,), torch.float32)
        }

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        extra_inputs: dict[str, ExtraInputRows] | None = None,
    ) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        if extra_inputs:
            actions = extra_inputs["actions"]
            embeds = embeds.index_copy(0, actions.index, self.action_proj(actions.values.to(embeds.dtype)))
        frame_len = self.frame_len
        embeds = embeds + self.spatial_embed(positions % frame_len) + self.temporal_embed(positions // frame_len)
        return self.model(input_ids, positions, embeds)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        unplaced: list[str] = []

        def renamed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                engine_name = to_engine_name(name)
                if engine_name is None:
                    unplaced.append(name)
                else:
                    yield engine_name, tensor

        loaded = super().load_weights(renamed())
        if unplaced:
            raise ValueError(
                f"checkpoint tensors with no place in {type(self).__name__}: {unplaced[:5]} ({len(unplaced)} in all)"
            )
        return loaded
