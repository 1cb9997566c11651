"""The sparse MoE block and the decoder that Qwen3-MoE, Qwen2-MoE and Mixtral build from Llama's.

    x -> router (linear, E logits) -> route: top-k experts and their weights
      -> kernels.fused_moe(x, w13, w2, weights, ids): the experts, one grouped GEMM each for gate_up and down

A decoder layer is Llama's with a `SparseMoeBlock` in place of its dense MLP (some models keep a dense MLP
in a few layers). The experts live in two stacked parameters, `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I], the kernel's layout and transformers 5's fused one. Hub checkpoints store one
tensor per expert and projection; `load_weights` places those into the stacks and checks every expert
arrived.

Over several ranks (parallel.py) the experts are split along their intermediate dimension (every rank runs
every (token, expert) pair on its slice), or with expert parallelism placed whole on ranks (each rank runs
only the pairs of its experts). Either way each rank already holds every token, so dispatch costs nothing,
and one all-reduce combines the ranks' partial sums: the same single collective the dense MLP needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from miniengine.forward_context import get_forward_context
from miniengine.kernels.moe import route
from miniengine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from miniengine.models.parallel import copy_into, current_tp, divide, materialize


class Experts(nn.Module):
    """E gated MLPs as two stacked weights. `load` fills one expert's projection, or a whole fused stack,
    and remembers what it filled, so that `missing` can name what a checkpoint left out.

    Under tensor parallelism a rank holds a slice of every expert's intermediate dimension (gate_up rows,
    down columns); with expert parallelism it holds whole experts `first .. first + num_experts - 1` and
    skips the others' checkpoint tensors unread."""

    shards = {"gate_up_proj": 2, "down_proj": 1}  # gate_up_proj holds gate (shard 0) and up (shard 1)

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.tp = tp = current_tp()
        self.total_experts, self.full_intermediate = num_experts, intermediate
        if tp.expert_parallel:
            num_experts = divide(num_experts, tp.size, "the number of experts")
            self.first = tp.rank * num_experts
        else:
            intermediate = divide(intermediate, tp.size, "the experts' intermediate size")
            self.first = 0
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        full = self.full_intermediate
        for name, shape in (("gate_up_proj", (self.total_experts, 2 * full, hidden)),
                            ("down_proj", (self.total_experts, hidden, full))):  # fmt: skip
            param = getattr(self, name)
            param.full_shape = shape
            param.weight_loader = lambda _, tensor, shard=None, name=name: self.load("dummy", tensor, name)
        self.filled: set[tuple[str, int, int]] = set()  # (parameter, local expert, shard)

    def _my_part(self, tensor: Any, param: str, shard: int | None) -> Any:
        """This rank's part of one expert's projection (`shard` 0/1: gate/up rows; None: all of gate_up)."""
        if self.tp.size == 1 or self.tp.expert_parallel:
            return tensor
        full, mine, start = self.full_intermediate, self.intermediate, self.tp.rank * self.intermediate
        if param == "down_proj":
            return tensor.narrow(tensor.dim() - 1, start, mine)
        rows = tensor.dim() - 2  # the rows of [2I, H] or [E, 2I, H]
        if shard is not None:
            return tensor.narrow(rows, start, mine)
        return torch.cat([materialize(tensor.narrow(rows, half * full + start, mine)) for half in (0, 1)], rows)

    def load(self, name: str, tensor: Any, param: str, expert: int | None = None, shard: int = 0) -> None:
        """Copy checkpoint tensor `name` into `param`: expert `expert`'s shard, or (None) every expert at once."""
        if expert is None:
            if tensor.shape[0] != self.total_experts:
                raise ValueError(
                    f"{name}: {tensor.shape[0]} experts in the checkpoint, the model has {self.total_experts}"
                )
            target = getattr(self, param).data
            tensor = self._my_part(tensor.narrow(0, self.first, self.num_experts), param, None)
            keys = {(param, e, s) for e in range(self.num_experts) for s in range(self.shards[param])}
        elif expert >= self.total_experts:
            raise ValueError(f"{name}: expert {expert}, but the model has {self.total_experts}")
        elif not self.first <= expert < self.first + self.num_experts:
            return  # another rank's expert (expert parallel): never read
        else:
            local = expert - self.first
            target = getattr(self, param).data[local]
            if param == "gate_up_proj":
                target = target.narrow(0, shard * self.intermediate, self.intermediate)
            tensor = self._my_part(tensor, param, shard if param == "gate_up_proj" else None)
            keys = {(param, local, shard)}
        copy_into(target, tensor, name)
        self.filled |= keys

    def missing(self) -> list[tuple[str, int, int]]:
        """(parameter, checkpoint expert number, shard) of each projection this rank holds but nothing filled."""
        everything = {(p, e, s) for p, n in self.shards.items() for e in range(self.num_experts) for s in range(n)}
        keys = sorted(everything - self.filled, key=lambda key: (key[1], key[0] == "down_proj", key[2]))
        return [(p, e + self.first, s) for p, e, s in keys]


class SparseMoeBlock(nn.Module):
    """Router + experts. `renormalize`: scale each token's top-k weights to sum to 1.

    With several ranks every rank holds every token (attention's all-reduce left them replicated), so
    nothing needs dispatching: each rank runs its part of the experts and one all-reduce sums the parts.
    Tensor parallel: every (token, expert) pair, a slice of each expert. Expert parallel: only the pairs
    whose expert this rank holds (gathered as rows of one expert each), whole experts."""

    def __init__(self, config: SimpleNamespace, num_experts: int, intermediate: int, renormalize: bool) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {config.hidden_act!r} is not supported in experts (silu is)")
        self.top_k, self.renormalize = config.num_experts_per_tok, renormalize
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, config.hidden_size, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        fused_moe = get_forward_context().kernels.fused_moe
        experts = self.experts
        if not experts.tp.expert_parallel:
            out = fused_moe(x, experts.gate_up_proj, experts.down_proj, weights, ids)
            return experts.tp.all_reduce(out)
        local = ids - experts.first
        tokens, slots = torch.nonzero((local >= 0) & (local < experts.num_experts), as_tuple=True)
        out = torch.zeros_like(x, dtype=torch.float32)
        if len(tokens):
            w13, w2 = experts.gate_up_proj, experts.down_proj
            pairs = fused_moe(x[tokens], w13, w2, weights[tokens, slots, None], local[tokens, slots, None])
            out.index_add_(0, tokens, pairs.float())
        return experts.tp.all_reduce(out).to(x.dtype)


class MoeDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer with the model's sparse block in place of its dense MLP."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__(config)
        self.mlp = self.moe_block(config)  # the dense MLP Llama built is dropped here, one layer at a time

    @staticmethod
    def moe_block(config: SimpleNamespace) -> nn.Module:
        raise NotImplementedError


# A per-expert checkpoint tensor: (the layer's experts module) . (expert) . (projection) .weight
_EXPERT_NAME = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


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
        """Llama's loading, with expert tensors placed first (one per expert and projection, or fused 3-D
        stacks); raises naming any expert projection the checkpoint lacks."""
        experts = {name: m for name, m in self.named_modules() if isinstance(m, Experts)}
        loaded = super().load_weights(self._place_experts(weights, experts))
        missing = [self._checkpoint_name(name, *key) for name, m in experts.items() for key in m.missing()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"the checkpoint lacks expert weights {', '.join(missing[:5])}{more}")
        return loaded | {f"{name}.{param}" for name in experts for param in Experts.shards}

    def _place_experts(
        self, weights: Iterable[tuple[str, torch.Tensor]], experts: dict[str, Experts]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Copy expert tensors into the stacks; yield every other tensor (with our names) to Llama's loading."""
        for checkpoint_name, tensor in weights:
            name = checkpoint_name
            for old, new in self.renames.items():
                name = name.replace(old, new)
            module, _, param = name.rpartition(".")
            match = _EXPERT_NAME.match(name)
            if match and match["module"] in experts and match["proj"] in self.expert_projections:
                stacked, shard = self.expert_projections[match["proj"]]
                experts[match["module"]].load(checkpoint_name, tensor, stacked, int(match["expert"]), shard)
            elif (
                module in experts and param in Experts.shards
            ):  # fused [E, 2I, H] / [E, H, I], as transformers 5 holds them
                experts[module].load(checkpoint_name, tensor, param)
            else:
                yield name, tensor

    def _checkpoint_name(self, module: str, param: str, expert: int, shard: int) -> str:
        """How the checkpoint names expert `expert`'s projection `shard` of `param`."""
        proj = next(p for p, target in self.expert_projections.items() if target == (param, shard))
        name = f"{module}.{expert}.{proj}.weight"
        for old, new in self.renames.items():
            name = name.replace(new, old)
        return name
