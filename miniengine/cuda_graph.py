"""CUDA graphs for decode steps: capture the model's forward once per batch size, then replay it.

A decode step of a small model is hundreds of short kernels (a norm, a few matmuls, attention, an
activation, for every layer). Launching them one by one from Python costs more than running them. A CUDA
graph records the launches once, reading every input from a fixed buffer, and replays them in one call:

    start-up    for B in [..., 48, 32, 16, 8, 4, 2, 1]:          (largest first, one shared memory pool)
                    warm up, then record model(input_ids[:B], positions[:B]) -> LM head -> logits_B
    each step   n sequences decode -> B = the smallest captured size >= n
                copy ids, positions, slots, seq_lens and block tables into the buffers' first n rows;
                rows n..B are padding: seq_len 0 and slot -1, so attention writes nothing and returns zeros
                (async scheduling: ids still on the device are copied there from the previous step's samples)
                graph[B].replay(); the logits are logits_B[:n]

The graph fixes the attention kernels' launch grid, so it is captured for the longest context the engine
allows (`max_seq_len = max_model_len`); the kernels stop at each sequence's real length. Mixed and prefill
steps run eagerly. With `enforce_eager` the same padded buffers are used but nothing is captured: decode
steps then run the very same kernels on the very same shapes, so graphs on and off give identical tokens.

At batch 1 the host's share of a step is as long as the device's (about 1 ms each for Qwen3-0.6B on an
H100), so every call saved counts. The LM head is in the graph (except under tensor parallelism, where the
logits are gathered to rank 0 outside it). The step's integers go into a pinned staging buffer (one of two,
taken in turns: the device may still be reading the other) and reach the device in one copy; the fed ids
are one more copy when every row takes the id its own row sampled (a steady batch), a gather otherwise.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np
import torch

from miniengine.forward_context import AttentionMetadata, ForwardContext, set_forward_context

if TYPE_CHECKING:
    from miniengine.model_runner import ModelRunner, StepInput


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class CudaGraphRunner:
    def __init__(
        self, runner: ModelRunner, max_num_seqs: int, max_model_len: int, capture: bool = True, logits: bool = True
    ) -> None:
        self.runner = runner
        self.logits = logits  # the graph ends with the LM head: run() returns logits, not hidden states
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        size, device = self.sizes[-1], runner.device
        max_blocks = -(-max_model_len // runner.block_size)
        # Rows: input ids, positions, slots, seq_lens (one buffer, so a step fills them with one copy).
        self.inputs = torch.zeros(4, size, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self.inputs
        self.slot_mapping.fill_(-1)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int64, device=device)
        # The host's staging buffers (pinned, so the copy needs no wait), each with the event of its last copy.
        staged = 4 * size + size * max_blocks + 2 * size
        self.staging = [torch.empty(staged, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.staged_events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for size in reversed(self.sizes if capture else []):
            graph = torch.cuda.CUDAGraph()
            self._forward(size)  # warm-up: compiles kernels and settles the allocator outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def _forward(self, size: int) -> torch.Tensor:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        with set_forward_context(ForwardContext(metadata, self.runner.kernels)):
            hidden = self.runner.model(self.input_ids[:size], self.positions[:size])
        return self.runner.model.compute_logits(hidden) if self.logits else hidden

    def can_run(self, step: StepInput) -> bool:
        return step.is_decode and step.num_seqs <= self.sizes[-1]

    def run(self, step: StepInput, fed_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (or hidden states, without `logits`) of a decode step's sequences, every one of which
        samples; `fed_ids`: the previous step's sampled ids, copied on the device into the input ids of the
        rows `step.fed_rows`."""
        n, num_fed = step.num_seqs, len(step.fed_rows)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        tables = step.block_tables
        # ids, positions, slots, seq_lens (each padded to `size`: slot -1 and seq_len 0), the tables, the fed rows
        length = 4 * size + tables.size + 2 * num_fed
        staging, event = self.staging[self.turn], self.staged_events[self.turn]
        if event is not None:
            event.synchronize()  # that copy was queued two steps ago: long done
        packed = staging.numpy()[:length]
        parts = (step.input_ids, step.positions, step.slot_mapping, step.seq_lens)
        for i, (part, pad) in enumerate(zip(parts, (0, 0, -1, 0))):
            packed[i * size : i * size + n] = part
            packed[i * size + n : (i + 1) * size] = pad
        packed[4 * size : 4 * size + tables.size] = tables.ravel()
        packed[4 * size + tables.size :] = np.concatenate([step.fed_rows, step.fed_from])
        flat = staging[:length].to(self.runner.device, non_blocking=True)
        self.staged_events[self.turn] = event = event or torch.cuda.Event()
        event.record()
        self.turn ^= 1
        self.inputs[:, :size].copy_(flat[: 4 * size].view(4, size))
        self.block_tables[:n, : tables.shape[1]].copy_(flat[4 * size : 4 * size + tables.size].view(tables.shape))
        # Every row fed (fed_rows is then 0..n-1: one decode row per sequence, in order), each from its own row.
        if num_fed == n and (step.fed_rows == step.fed_from).all():
            self.input_ids[:n].copy_(fed_ids[:n])  # a steady batch: row i takes the id row i sampled
        elif num_fed:
            fed_rows, fed_from = flat[4 * size + tables.size :].view(2, num_fed)
            self.input_ids[fed_rows] = fed_ids[fed_from]
        if size not in self.graphs:  # enforce_eager: the same padded step, launched op by op
            return self._forward(size)[:n]
        self.graphs[size].replay()
        return self.outputs[size][:n]
