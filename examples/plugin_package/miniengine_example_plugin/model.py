"""A Llama whose checkpoints use their own parameter names (GPT-style), as many in-house models do.

The network is miniengine's Llama unchanged; only `load_weights` differs. It renames each checkpoint tensor
to the name the Llama code expects, hands it on (the Llama code stacks q/k/v and gate/up itself), and refuses
a checkpoint with tensors it cannot place, naming them, rather than silently ignoring them.

    checkpoint name                         miniengine Llama name
    transformer.wte.weight                  model.embed_tokens.weight
    transformer.h.{i}.ln_attn.weight        model.layers.{i}.input_layernorm.weight
    transformer.h.{i}.attn.w{q,k,v,o}       model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    transformer.h.{i}.ln_mlp.weight         model.layers.{i}.post_attention_layernorm.weight
    transformer.h.{i}.mlp.w_{gate,up,down}  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    transformer.ln_f.weight                 model.norm.weight
    head.weight                             lm_head.weight
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from miniengine.models.llama import LlamaForCausalLM

# (checkpoint name, Llama name): {i} is a layer number, {p} a projection
NAMES = [
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.h.{i}.ln_attn.weight", "model.layers.{i}.input_layernorm.weight"),
    ("transformer.h.{i}.attn.w{p}.weight", "model.layers.{i}.self_attn.{p}_proj.weight"),
    ("transformer.h.{i}.ln_mlp.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("transformer.h.{i}.mlp.w_{p}.weight", "model.layers.{i}.mlp.{p}_proj.weight"),
    ("transformer.ln_f.weight", "model.norm.weight"),
    ("head.weight", "lm_head.weight"),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[a-z]+)"))


_TO_LLAMA = [(_pattern(ours), llama) for ours, llama in NAMES]
_FROM_LLAMA = [(_pattern(llama), ours) for ours, llama in NAMES]


def to_llama_name(name: str) -> str | None:
    """The Llama name of checkpoint tensor `name`, or None if it has none."""
    return _rename(name, _TO_LLAMA)


def from_llama_name(name: str) -> str | None:
    """The inverse, for writing checkpoints in this format (checkpoint.py)."""
    return _rename(name, _FROM_LLAMA)


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


class ExampleLlamaForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        unplaced: list[str] = []

        def renamed() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                llama_name = to_llama_name(name)
                if llama_name is None:
                    unplaced.append(name)
                else:
                    yield llama_name, tensor

        loaded = super().load_weights(renamed())
        if unplaced:
            raise ValueError(
                f"checkpoint tensors with no place in {type(self).__name__}: {unplaced[:5]} ({len(unplaced)} in all)"
            )
        return loaded
