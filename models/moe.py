"""The sparse MoE block and the decoder that Qwen3-MoE, Qwen2-MoE and Mixtral build from Llama's.

    x -> router (linear, E logits) -> route: top-k experts and their weights
      -> kernels.fused_moe(x, w13, w2, weights, ids): the experts, one grouped GEMM each for gate_up and down

A decoder layer is Llama's with a `SparseMoeBlock` in place of its dense MLP (some models keep a dense MLP
in a few layers). The experts live in two stacked parameters, `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I], the kernel's layout and transformers 5's fused one. Hub checkpoints store one
tensor per expert and projection; `load_weights` places those into the stacks and checks every expert
arrived.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch
from torch import nn

from miniengine.forward_context import get_forward_context
from miniengine.kernels.moe import route
from miniengine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


class Experts(nn.Module):
    """E gated MLPs as two stacked weights; `load_expert` fills one expert's projection from a checkpoint."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def expert_slice(self, param: str, expert: int, shard: int) -> torch.Tensor:
        """The rows of `param` ("gate_up_proj" or "down_proj") that expert `expert`'s shard occupies."""
        if param == "down_proj":
            return self.down_proj.data[expert]
        return self.gate_up_proj.data[expert].narrow(0, shard * self.intermediate, self.intermediate)


class SparseMoeBlock(nn.Module):
    """Router + experts. `renormalize`: scale each token's top-k weights to sum to 1."""

    def __init__(self, config: SimpleNamespace, num_experts: int, intermediate: int, renormalize: bool) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported in experts (silu is)")
        self.top_k, self.renormalize = config.num_experts_per_tok, renormalize
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, config.hidden_size, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return get_forward_context().kernels.fused_moe(
            x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids
        )


class MoeDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with the model's sparse block in place of its dense MLP."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(config)
        self.mlp = self.moe_block(config)  # the dense MLP Llama built is dropped here, one layer at a time

    @staticmethod
    def moe_block(config: SimpleNamespace) -> nn.Module:
        raise NotImplementedError


# Matches a per-expert checkpoint tensor: (the layer's MoE module) .experts. (expert) . (projection) .weight
_EXPERT_NAME = re.compile(r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-family causal LM whose decoder layers hold sparse MoE blocks.

    Subclasses set `layer_cls` (a `MoeDecoderLayer`), `expert_projections` (checkpoint projection name ->
    (our stacked parameter, shard)) and `renames` (checkpoint name part -> ours), and may keep some layers
    dense (`dense_layers`).
    """

    layer_cls = MoeDecoderLayer
    expert_projections = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
        "down_proj": ("down_proj", 0),
    }
    renames: dict[str, str] = {}

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(config)
        for i in self.dense_layers(config):
            self.model.layers[i].mlp = LlamaMLP(config)

    @staticmethod
    def dense_layers(config: SimpleNamespace) -> list[int]:
        """Layers that keep a dense MLP (none by default)."""
        return []

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Llama's loading, with the experts placed first: per-expert tensors into their stacked rows, fused
        3-D tensors whole. Raises if any expert's projection is missing or misshapen."""
        experts = {name: m for name, m in self.named_modules() if isinstance(m, Experts)}
        filled: dict[str, set[tuple[int, int]]] = {
            f"{name}.{p}": set() for name in experts for p in ("gate_up_proj", "down_proj")
        }
        loaded = super().load_weights(self._place_experts(weights, experts, filled))
        missing = []
        for param, done in filled.items():
            module, _, stacked = param.rpartition(".")
            shards = 2 if stacked == "gate_up_proj" else 1
            wanted = {(e, s) for e in range(experts[module].num_experts) for s in range(shards)}
            missing += [self._checkpoint_name(module, e, stacked, s) for e, s in sorted(wanted - done)]
            if done >= wanted:
                loaded.add(param)
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} expert weights: {', '.join(missing[:6])}"
                f"{', ...' if len(missing) > 6 else ''}"
            )
        return loaded

    def _place_experts(
        self, weights: Iterable[tuple[str, torch.Tensor]], experts: dict[str, Experts], filled: dict
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Copy expert tensors into the stacks (recording which (expert, shard) each filled); yield the rest."""
        for name, tensor in weights:
            for old, new in self.renames.items():
                name = name.replace(old, new)
            match = _EXPERT_NAME.match(name)
            if match and match["proj"] in self.expert_projections and f"{match['block']}.experts" in experts:
                module = f"{match['block']}.experts"
                stacked, shard = self.expert_projections[match["proj"]]
                expert = int(match["expert"])
                if expert >= experts[module].num_experts:
                    raise ValueError(f"{name}: expert {expert}, but the model has {experts[module].num_experts}")
                _copy_checked(name, experts[module].expert_slice(stacked, expert, shard), tensor)
                filled[f"{module}.{stacked}"].add((expert, shard))
            elif name in filled:  # a fused [E, 2I, H] or [E, H, I] tensor, as transformers 5 may save
                module, _, stacked = name.rpartition(".")
                _copy_checked(name, getattr(experts[module], stacked).data, tensor)
                shards = 2 if stacked == "gate_up_proj" else 1
                filled[name].update((e, s) for e in range(experts[module].num_experts) for s in range(shards))
            else:
                yield name, tensor

    def _checkpoint_name(self, module: str, expert: int, stacked: str, shard: int) -> str:
        proj = next(p for p, target in self.expert_projections.items() if target == (stacked, shard))
        name = f"{module}.{expert}.{proj}.weight"
        for old, new in self.renames.items():
            name = name.replace(new, old)
        return name


def _copy_checked(name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if target.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
    target.copy_(tensor)
