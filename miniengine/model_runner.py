"""The model runner: one scheduled batch in, one sampled token per finishing sequence out.

It owns the KV cache (one tensor for all layers, `[2, layers, blocks, block_size, kv_heads, head_dim]`, each
attention layer holding views of its own slice) and turns the scheduler's batch into flat tensors:

    seq A prefills tokens 0..3, seq B decodes token 9, seq C prefills tokens 4..5 (its second chunk)
    input_ids       [a0 a1 a2 a3  b9  c4 c5]
    positions       [ 0  1  2  3   9   4  5]
    slot_mapping    slot of each token: block_table[pos // B] * B + pos % B
    query_start_loc [0, 4, 5, 7]     seq_lens [4, 10, 6]     block_tables padded to the longest
    logits of       a3 and b9 (C has prompt left, so nothing is sampled for it yet)

The same runner serves every platform: only the attention backend in the forward context differs.
"""

from __future__ import annotations

import torch
from torch import nn

from miniengine.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from miniengine.models.layers import Attention
from miniengine.platforms import Platform
from miniengine.sampler import Sampler, SampleResult
from miniengine.scheduler import ScheduledBatch
from miniengine.sequence import Sequence


def kv_cache_shape(model: nn.Module, num_blocks: int, block_size: int) -> tuple[int, ...]:
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return (2, len(layers), num_blocks, block_size, layers[0].num_kv_heads, layers[0].head_dim)


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        platform: Platform,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        sampler: Sampler,
    ) -> None:
        self.model = model
        self.platform = platform
        self.device = platform.device()
        self.block_size = block_size
        self.sampler = sampler
        self.kernels = platform.kernels()
        self.kv_cache = torch.zeros(kv_cache_shape(model, num_blocks, block_size), dtype=dtype, device=self.device)
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_at: list[int] = []  # index, in the flat batch, of the token whose logits are sampled
        size = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            begin, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[begin:end]
            positions += range(begin, end)
            slots += [seq.block_table[p // size] * size + p % size for p in range(begin, end)]
            starts.append(starts[-1] + n)
            seq_lens.append(end)
            if batch.samples(i):
                sample_at.append(starts[-1] - 1)
        width = max(len(seq.block_table) for seq in batch.seqs)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        metadata = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            query_start_loc=tensor(starts, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            query_start_loc_host=starts,
            seq_lens_host=seq_lens,
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), metadata, sample_at

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[Sequence, SampleResult]]:
        """Forward the batch; sample for the sequences that reached their last token, in batch order."""
        input_ids, positions, metadata, sample_at = self.prepare(batch)
        with set_forward_context(ForwardContext(metadata, self.kernels)):
            hidden = self.model(input_ids, positions)
        if not sample_at:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(sample_at, device=self.device)])
        sampled = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        return list(zip(sampled, self.sampler(logits, sampled)))
