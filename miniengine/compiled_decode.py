"""A compiled decode step for the CPU: one sequence's step through `torch.compile` (inductor's C++ backend).

A decode step of one sequence on a CPU is 121 small GEMMs and some 40 small ops per layer. Run eagerly, each
op pays dispatch, allocation and a pass over memory of its own: half of SmolLM2's step. Compiled, the ops
between two GEMMs become one C++ loop, and the step is one call:

    start-up    trace model(ids[1], positions[1]) -> LM head once (every layer is one nested region: ~10 s
                cold, a few seconds from inductor's on-disk cache); the block table's width is a symbol
    each step   one sequence decodes -> the compiled step (any context length: one graph)
                anything else (prefill, several sequences) -> the eager model, as before

Inside the graph: the packed GEMMs stay opaque ops (`miniengine::fp16_linear`, `miniengine::int4_linear`;
a layer's tier is picked at trace time, by the step's one row), the K/V store is an in-place `index_copy_`,
attention is `paged_decode_attention` (tensors only, no host values). The compiler must see each layer's K
and V cache as a tensor of its own: views of the one cache tensor would make it copy the whole cache at every
write, so the runner gives each view its own storage object over the same memory.

Before each call the compiled step checks its guards (that the tensors, modules and values it was traced
with are still the same): some 35 per layer, 0.9 ms a step for SmolLM2's 30 layers (0.23 with layer 0's
alone). The layers are the same code over weights that never change after loading, so only layer 0's are
kept (`layer_zero_guards`, torch's `guard_filter_fn`; a torch without that option keeps them all, and the
log says so).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from miniengine.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from miniengine.kernels.paged_attention import paged_decode_attention
from miniengine.models.llama import compile_layers_once

if TYPE_CHECKING:
    from miniengine.model_runner import ModelRunner, StepInput

logger = logging.getLogger("miniengine")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, metadata, scale: float):
    return paged_decode_attention(q, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale)


_LATER_LAYER = re.compile(r"_modules\['layers'\]\._modules\['(?!0')\d+'\]")


def layer_zero_guards(entries: list) -> list[bool]:
    """Which guards the compiled step keeps: all but those on layers after the first."""
    return [not _LATER_LAYER.search(entry.name) for entry in entries]


def compile_step(forward):
    """`torch.compile(forward)` with the guards of layers after the first left out, where torch can."""
    try:
        return torch.compile(forward, dynamic=False, options={"guard_filter_fn": layer_zero_guards})
    except (RuntimeError, TypeError) as error:  # a torch before guard_filter_fn: options go to inductor
        logger.warning("the compiled decode step checks every layer's guards (%s)", error)
        return torch.compile(forward, dynamic=False)


def own_storage(view: torch.Tensor) -> torch.Tensor:
    """The same memory as `view` (contiguous), as a tensor with a storage object of its own."""
    return torch.from_numpy(view.view(torch.uint8).numpy()).view(view.dtype)


class CompiledDecode:
    logits = True  # run() returns the LM head's logits, as a CUDA graph that ends with it does

    def __init__(self, runner: ModelRunner) -> None:
        from miniengine.model_runner import attention_layers

        self.runner = runner
        for layer in attention_layers(runner.model):
            layer.k_cache, layer.v_cache = own_storage(layer.k_cache), own_storage(layer.v_cache)
        self.kernels = dataclasses.replace(runner.kernels, name="compiled", attend=decode_attention)
        compile_layers_once()
        self.step = compile_step(self._forward)
        start = time.perf_counter()
        self._warm_up()
        self.compile_s = time.perf_counter() - start
        logger.info("compiled the one-sequence decode step in %.1f s", self.compile_s)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        model = self.runner.model
        return model.compute_logits(model(input_ids, positions))

    def _warm_up(self) -> None:
        """Compile on a step that writes slot 0 (a free block at start-up) and reads it back."""
        with torch.inference_mode():  # as steps run (ModelRunner.execute): inference tensors, or a recompile
            one = torch.ones(1, dtype=torch.int64)
            self._call(one * 0, one * 0, one * 0, torch.zeros(1, 2, dtype=torch.int64), one)

    def can_run(self, step: StepInput) -> bool:
        return step.is_decode and step.num_seqs == 1

    def run(self, step: StepInput, fed_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of a one-sequence decode step. Each input is a tensor of its own (not a slice of one
        buffer, as `ModelRunner.to_device` makes them): the compiled layers may not take aliased inputs."""
        ids = torch.from_numpy(step.input_ids)
        if len(step.fed_rows):  # the previous step's sampled id (async scheduling)
            ids = ids.clone()
            ids[torch.from_numpy(step.fed_rows)] = fed_ids[torch.from_numpy(step.fed_from)]
        inputs = (step.positions, step.slot_mapping, step.block_tables, step.seq_lens)
        return self._call(ids, *(torch.from_numpy(x) for x in inputs))

    def _call(self, ids, positions, slots, tables, seq_lens) -> torch.Tensor:
        if tables.shape[1] < 2:  # a width of 1 would be specialised (size 0 and 1 are), then recompiled at 2
            tables = F.pad(tables, (0, 1))
        torch._dynamo.mark_dynamic(tables, 1)
        metadata = AttentionMetadata(slots, tables, torch.arange(2), seq_lens, max_query_len=1, max_seq_len=0)
        with set_forward_context(ForwardContext(metadata, self.kernels)):
            return self.step(ids, positions)
