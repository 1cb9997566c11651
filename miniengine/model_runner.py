"""The model runner: one scheduled batch in, one sampled token per finishing sequence out.

It owns the KV cache (one tensor for all layers, `[2, layers, blocks, block_size, kv_heads, head_dim]`, each
attention layer holding views of its own slice) and turns the scheduler's batch into flat tensors:

    seq A prefills tokens 0..3, seq B decodes token 9, seq C prefills tokens 4..5 (its second chunk)
    input_ids       [a0 a1 a2 a3  b9  c4 c5]
    positions       [ 0  1  2  3   9   4  5]
    slot_mapping    slot of each token: block_table[pos // B] * B + pos % B
    query_start_loc [0, 4, 5, 7]     seq_lens [4, 10, 6]     block_tables padded to the widest
    logits of       a3 and b9 (C has prompt left, so nothing is sampled for it yet)

`prepare` builds these on the host with numpy (no per-token Python loop: at 256 sequences it is on the
critical path), and `execute` ships them in one host-to-device copy, runs the model and samples. A pure
decode step on a GPU replays a captured CUDA graph instead (`cuda_graph.py`). The same runner serves every
platform: only the kernels in the forward context differ.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from miniengine.config import EngineConfig
from miniengine.extra_inputs import dummy_extra_inputs, extra_inputs_to, step_extra_inputs
from miniengine.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from miniengine.models.layers import Attention
from miniengine.platforms import Platform
from miniengine.sampler import Sampled, Sampler, SampleResult
from miniengine.sampling_params import SamplingParams
from miniengine.scheduler import ScheduledBatch
from miniengine.sequence import Sequence

logger = logging.getLogger("miniengine")
_PAD = np.zeros(1, dtype=np.int64)


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def kv_cache_shape(model: nn.Module, num_blocks: int, block_size: int) -> tuple[int, ...]:
    layers = attention_layers(model)
    return (2, len(layers), num_blocks, block_size, layers[0].num_kv_heads, layers[0].head_dim)


@dataclass(slots=True)
class Launched:
    """A step queued on the device: the sequences that sample, in batch order, and their samples."""

    seqs: list[Sequence]
    sampled: Sampled


@dataclass(slots=True)
class StepInput:
    """One step's flat batch on the host (int64 numpy arrays): everything a forward pass needs."""

    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    query_start_loc: np.ndarray  # [S + 1]
    seq_lens: np.ndarray  # [S]
    block_tables: np.ndarray  # [S, widest block table]
    sample_rows: np.ndarray  # [N]: the flat rows whose logits are sampled
    max_query_len: int
    max_seq_len: int
    # Async scheduling: rows of input_ids whose token is still on the device, the previous step's sampled
    # ids (the host holds a placeholder there), and which of those ids each one takes.
    fed_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fed_from: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


def prepare(batch: ScheduledBatch, block_size: int, fed: Mapping[Sequence, int] | None = None) -> StepInput:
    """The step's flat batch; `fed`: sequences whose last token is the previous step's sampled id number k,
    still on the device (async scheduling)."""
    seqs = batch.seqs
    num_new = np.array(batch.num_new_tokens, dtype=np.int64)
    begins = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, len(seqs))
    starts = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(num_new, out=starts[1:])
    num_tokens = int(starts[-1])
    ids = itertools.chain.from_iterable(s.token_ids[b : b + n] for s, b, n in zip(seqs, begins.tolist(), num_new))
    input_ids = np.fromiter(ids, np.int64, num_tokens)
    owner = np.repeat(np.arange(len(seqs)), num_new)  # which sequence each flat token belongs to
    positions = np.arange(num_tokens) - starts[owner] + begins[owner]
    # Block tables padded with 0 to the widest, filled with all tables concatenated: a mask of the filled
    # entries lists them in that same (row-major) order.
    widths = np.fromiter((len(s.block_table) for s in seqs), np.int64, len(seqs))
    tables = np.zeros((len(seqs), int(widths.max())), dtype=np.int64)
    filled = np.arange(tables.shape[1]) < widths[:, None]
    tables[filled] = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs), np.int64, filled.sum())
    slots = tables[owner, positions // block_size] * block_size + positions % block_size
    seq_lens = begins + num_new
    sampled = seq_lens == np.fromiter((len(s.token_ids) for s in seqs), np.int64, len(seqs))  # reached its end
    step = StepInput(
        input_ids, positions, slots, starts, seq_lens, tables, starts[1:][sampled] - 1,
        max_query_len=int(num_new.max()), max_seq_len=int(seq_lens.max()),
    )  # fmt: skip
    if fed:
        # A placeholder is a sequence's last token, fed as the last row of its part of the batch.
        pairs = [(int(starts[i + 1]) - 1, fed[s]) for i, s in enumerate(seqs) if s in fed]
        step.fed_rows, step.fed_from = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    return step


class ModelRunner:
    def __init__(self, model: nn.Module, platform: Platform, dtype: torch.dtype, config: EngineConfig) -> None:
        self.model = model
        self.platform = platform
        self.device = platform.device()
        self.dtype = dtype
        self.config = config
        self.block_size = config.block_size
        self.kernels = platform.kernels()
        self.kv_cache = torch.empty(0)
        self.graphs = None  # the platform's decode runner (CUDA graphs, a compiled step) once prepared

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The KV cache, not zero-filled: filling gigabytes costs seconds of start-up (and, on the CPU, every
        page of it at once). No kernel lets an unwritten slot reach its output: the padded ones zero what
        they gather past each sequence's length (kernels/paged_attention.py)."""
        shape = kv_cache_shape(self.model, num_blocks, self.block_size)
        self.kv_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(attention_layers(self.model)):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def capture_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Decode steps run what the platform prepares for them (`Platform.decode_runner`): CUDA graphs of up to
        `max_num_seqs` sequences (`capture=False`: the same padded steps, eagerly), a compiled step on the CPU."""
        self.graphs = self.platform.decode_runner(self, max_num_seqs, max_model_len, capture)
        if self.platform.compiles_kernels:
            self.warm_up(max_model_len)

    @torch.inference_mode()
    def warm_up(self, max_model_len: int) -> int:
        """Run, eagerly, one step of each shape a kernel may compile a variant of; returns how many ran.

        A kernel that compiles on first use (Triton) compiles a variant per tile configuration, and picks
        those from the step's shape: its token count (the MoE GEMM tiles), decode / mixed / prefill (the
        attention tiles), its longest context (flash-decoding's split count). Compiling one takes seconds;
        a live request must not wait for it, so it happens here. The steps: prompts of 1, 2, 4, ...
        `max_num_batched_tokens` tokens, then a decode, a mixed batch (seven decodes beside a chunk) and a
        chunk after a prefix hit, each planned for longest contexts of 16, 32, ... `max_model_len` tokens (a
        plan's `max_seq_len` is a host figure: the kernels read the real lengths on the device, so these
        steps stay small). Their K/V goes to blocks no sequence holds yet. Every tensor parallel rank runs
        the same steps, collectives included."""
        budget = self.config.max_num_batched_tokens
        shapes: list[tuple[list[tuple[int, int]], int]] = []  # ([(tokens cached, tokens new) per sequence], planned)
        for size in sorted({1 << i for i in range(budget.bit_length())} | {budget}):
            full, rest = divmod(size, max_model_len)
            shapes.append(([(0, max_model_len)] * full + [(0, rest)] * (rest > 0), 0))
        for planned in sorted({1 << i for i in range(4, max_model_len.bit_length())} | {max_model_len}):
            for batch in ([(15, 1)], [(15, 1)] * 7 + [(0, 8)], [(8, 8)]):
                if all(cached + new <= max_model_len for cached, new in batch):
                    shapes.append((batch, planned))
        num_blocks, start = self.kv_cache.shape[2], time.perf_counter()
        for batch, planned in shapes:
            seqs, cursor = [], 0
            for i, (computed, new) in enumerate(batch):
                seq = Sequence(-1 - i, "warm-up", [0] * (computed + new), SamplingParams(max_tokens=1))
                seq.num_computed_tokens = computed
                need = -(-(computed + new) // self.block_size)
                seq.block_table = [(cursor + j) % num_blocks for j in range(need)]
                cursor += need
                seqs.append(seq)
            step = prepare(ScheduledBatch(seqs, [new for _, new in batch]), self.block_size)
            step.max_seq_len = max(step.max_seq_len, planned)
            self.forward(step, dummy_extra_inputs(self.model, len(step.input_ids), self.device))
        self.platform.synchronize()
        logger.info("warm-up: %d step shapes in %.1f s (kernels compiled now, not mid-serving)", len(shapes),
                    time.perf_counter() - start)  # fmt: skip
        return len(shapes)

    def to_device(
        self, step: StepInput, fed_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """input_ids, positions, metadata and sample rows on the device, copied in one transfer (and the
        previous step's sampled `fed_ids` put into the input_ids that wait for them)."""
        parts = [step.input_ids, step.positions, step.slot_mapping, step.query_start_loc, step.seq_lens,
                 step.sample_rows, step.fed_rows, step.fed_from, step.block_tables.ravel()]  # fmt: skip
        # Each part starts 16-byte aligned: a JIT kernel compiles a variant per pointer alignment, and parts
        # packed end to end would give each step's batch shape its own mix of them (and compiles mid-serving).
        # (One int64 of padding after each odd-length part: np.pad per part cost ~70 us a step.)
        sizes = [len(p) for p in parts]
        padded = [n + n % 2 for n in sizes]
        flat = torch.from_numpy(np.concatenate([q for p in parts for q in ((p, _PAD) if len(p) % 2 else (p,))]))
        if self.device.type != "cpu":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        ids, pos, slots, starts, lens, rows, fed_rows, fed_from, tables = (
            part[:n] for part, n in zip(flat.split(padded), sizes)
        )
        if len(step.fed_rows):
            ids[fed_rows] = fed_ids[fed_from]
        metadata = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables.view(step.block_tables.shape),
            query_start_loc=starts,
            seq_lens=lens,
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            query_start_loc_host=step.query_start_loc.tolist(),
            seq_lens_host=step.seq_lens.tolist(),
        )
        return ids, pos, metadata, rows

    def forward(self, step: StepInput, extra: dict | None = None, fed_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of the rows to sample (a decode graph that ends with the LM head is replayed by
        `execute`, not here); `extra`: the step's extra-input rows (extra_inputs.py);
        `fed_ids`: the previous step's sampled ids, for the rows `step.fed_rows` (async scheduling)."""
        if self._replays(step, extra) and not self.graphs.logits:
            return self.graphs.run(step, fed_ids)
        input_ids, positions, metadata, rows = self.to_device(step, fed_ids)
        with set_forward_context(ForwardContext(metadata, self.kernels)):
            hidden = self.model(input_ids, positions, **(extra or {}))
        return hidden[rows]

    def run(self, batch: ScheduledBatch, sampler: Sampler) -> list[tuple[Sequence, SampleResult]]:
        """Forward the batch; sample for the sequences that reached their last token, in batch order."""
        launched = self.launch(batch, sampler)
        return [] if launched is None else list(zip(launched.seqs, launched.sampled.results()))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, sampler: Sampler, fed: Launched | None = None) -> Launched | None:
        """Queue the batch's forward and sampling on the device and return without waiting for them (None
        when nobody samples). `fed`: the launch before this one, whose sampled ids are still on the device:
        its sequences in this batch feed them as their last token (async_scheduling.py)."""
        placeholders = {seq: k for k, seq in enumerate(fed.seqs)} if fed is not None else None
        step = prepare(batch, self.block_size, placeholders)
        extra = step_extra_inputs(self.model, batch, self.device)
        logits = self.execute(step, extra, fed.sampled.token_ids if fed is not None else None)
        if logits is None:
            return None
        seqs = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        return Launched(seqs, sampler.sample(logits, seqs))

    @torch.inference_mode()
    def execute(
        self, step: StepInput, extra: dict | None = None, fed_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The logits of the step's sampled rows (None when none is sampled, and on tensor parallel ranks
        other than 0, which send their slice of the vocabulary to rank 0)."""
        if self._replays(step, extra) and self.graphs.logits:
            return self.graphs.run(step, fed_ids)  # the graph ends with the LM head
        hidden = self.forward(step, extra_inputs_to(extra, self.device), fed_ids)
        return self.model.compute_logits(hidden) if len(step.sample_rows) else None

    def _replays(self, step: StepInput, extra: dict | None) -> bool:
        """Whether the step replays a captured decode graph."""
        return self.graphs is not None and self.graphs.can_run(step) and not extra

    def kv_blocks_that_fit(self, longest: int, sampler: Sampler | None = None) -> int:
        """As many KV blocks as the platform's memory budget holds, after a profiling run of a full step
        (0 when not even one fits)."""
        config = self.config
        model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

        def profile() -> int:
            return self.profile(config.max_num_batched_tokens, config.max_num_seqs, longest, sampler)

        budget = self.platform.kv_cache_bytes(config, model_bytes, profile)
        return budget // self.kv_block_bytes()

    def kv_block_bytes(self) -> int:
        return torch.Size(kv_cache_shape(self.model, 1, self.block_size)).numel() * self.dtype.itemsize

    def shutdown(self) -> None:
        """Free the KV cache and the captured graphs."""
        self.kv_cache, self.graphs = torch.empty(0), None
        for layer in attention_layers(self.model):
            layer.k_cache = layer.v_cache = self.kv_cache

    @torch.inference_mode()
    def profile(self, num_tokens: int, max_num_seqs: int, max_model_len: int, sampler: Sampler | None) -> int:
        """Run a forward pass of a full step (`num_tokens` prompt tokens) and sample `max_num_seqs` rows;
        returns the peak bytes the device held meanwhile, less the scratch KV cache this needed. (A tensor
        parallel rank other than 0 has no sampler: it only sends its logits.)"""
        seq_len = min(num_tokens, max_model_len - 1)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
        cache_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        lens = [min(seq_len, num_tokens - i * seq_len) for i in range(num_seqs)]
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)  # the costliest sampling path
        seqs = [Sequence(-1 - i, "profile", [0] * n, params) for i, n in enumerate(lens)]
        for i, seq in enumerate(seqs):
            seq.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        step = prepare(ScheduledBatch(seqs, lens), self.block_size)
        self.platform.reset_peak_memory()
        hidden = self.forward(step, dummy_extra_inputs(self.model, len(step.input_ids), self.device))
        rows = hidden[torch.arange(max_num_seqs, device=self.device) % hidden.shape[0]]
        logits = self.model.compute_logits(rows)
        if sampler is not None and logits is not None:
            sampler(logits, [seqs[0]] * max_num_seqs)
        peak = self.platform.peak_memory()
        self.kv_cache = torch.empty(0)
        return peak - cache_bytes
