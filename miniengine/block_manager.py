"""The block manager: the KV cache cut into fixed-size blocks, lent to sequences, shared by prefix.

The KV cache holds `num_blocks` blocks of `block_size` token slots. A sequence's block table lists the
blocks holding its tokens in order, so token i lives in slot `block_table[i // B] * B + i % B`:

    seq A  "The cat sat on the mat ."      block_table [7, 2]    ref counts: 7 -> 2, 2 -> 1, 4 -> 1
    seq B  "The cat sat on a red rug"      block_table [7, 4]    (B = 4: block 7 holds "The cat sat on")

Prefix caching: every full, computed block is published under the key (id of the prefix before it, its
token ids, a digest of any extra-input rows inside it) and gets a prefix id of its own, a chain that names
the whole prefix up to that block:

    block "The cat sat on"  key (None, tokens, None) -> prefix id 0
    block "the mat ."       key (0, tokens, None)    -> prefix id 1      ("the mat ." after another prefix: not 1)

Equal token ids with different extra inputs (image features, actions: extra_inputs.py) never share a block.

A new sequence walks its own full blocks down the chain; each hit is shared by taking a reference instead
of being computed again. The keys are hashed by the dict but compared in full, and prefix ids are never
reused, so a hash collision can never hand one text another's K/V. A block whose last reference goes
returns to the free list but keeps its contents and key: it is only evicted, least recently freed first,
when a fresh block is needed.

Plain Python: no torch. The model runner turns block tables into slot numbers.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from miniengine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    # Set once the block is full, computed and published (prefix caching on):
    key: tuple[int | None, tuple[int, ...], bytes | None] | None = None  # (prefix id before it, tokens, extras)
    prefix_id: int | None = None  # names the prefix ending with this block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks in the order they were freed: allocation takes the oldest (LRU eviction).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[tuple, int] = {}  # block key -> the block holding that prefix
        self._prefix_ids = itertools.count()
        self.hits = 0  # blocks shared from the prefix cache instead of computed
        self.queries = 0  # full prompt blocks looked up

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache that hold `seq`'s leading full blocks; takes no reference."""
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        # At least one token must be computed to give logits: a fully cached prompt recomputes its last block.
        num_full = (seq.num_tokens - 1) // size
        found: list[int] = []
        prefix_id: int | None = None
        for i in range(num_full):
            block_id = self.cached.get(self._key(seq, i, prefix_id))
            if block_id is None:
                break
            found.append(block_id)
            prefix_id = self.blocks[block_id].prefix_id
        return found

    def _key(self, seq: Sequence, i: int, prefix_id: int | None) -> tuple:
        """The prefix-cache key of `seq`'s block number i, which follows the prefix named `prefix_id`."""
        size = self.block_size
        return (prefix_id, tuple(seq.token_ids[i * size : (i + 1) * size]), seq.extra_key(i))

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:  # type: ignore[assignment]
        """Give `seq` the blocks to hold `num_new_tokens` more tokens, first sharing `cached` prefix blocks.

        All or nothing: returns False, changing nothing, when the free list is too short.
        """
        assert not cached or not seq.block_table, "prefix blocks are only shared by a fresh sequence"
        num_tokens = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        num_fresh = self.blocks_needed(num_tokens) - len(seq.block_table) - len(cached)
        if num_fresh <= 0 and not cached:
            return True  # most decodes: the last block has room
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # cached but on the free list
        if num_fresh + revived > len(self.free):
            return False
        # A sequence's prompt is looked up once, when it is first scheduled. The recompute after a preemption
        # hits its own blocks, which would count output tokens as cached prompt and inflate the hit rate.
        if not seq.block_table and seq.num_preemptions == 0:
            seq.num_cached_tokens = len(cached) * self.block_size
            self.queries += (seq.num_tokens - 1) // self.block_size if self.enable_prefix_caching else 0
            self.hits += len(cached)
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens += len(cached) * self.block_size
        for _ in range(max(num_fresh, 0)):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        self._unpublish(block)  # evict: its contents are about to be overwritten
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish `seq`'s blocks that are now full and computed so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        # Blocks are published in order and stay published while held: skip back over the new full blocks
        # only (a long sequence would otherwise walk its whole table every step).
        first = num_full = seq.num_computed_tokens // size
        while first > 0 and self.blocks[seq.block_table[first - 1]].key is None:
            first -= 1
        prefix_id = self.blocks[seq.block_table[first - 1]].prefix_id if first else None
        for i in range(first, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.key is None:
                block.key = self._key(seq, i, prefix_id)
                # Two sequences may have computed the same block in one step: the first stays the one shared,
                # and its twin takes the same prefix id, since it holds the same prefix.
                twin = self.cached.setdefault(block.key, block.block_id)
                block.prefix_id = self.blocks[twin].prefix_id if twin != block.block_id else next(self._prefix_ids)
            prefix_id = block.prefix_id

    def reset_prefix_cache(self) -> None:
        """Forget every published prefix no sequence is using (blocks in use keep theirs)."""
        for block in self.blocks:
            if block.ref_count == 0:
                self._unpublish(block)

    def _unpublish(self, block: Block) -> None:
        if block.key is not None:
            if self.cached.get(block.key) == block.block_id:  # a twin may be the one published
                del self.cached[block.key]
            block.key = block.prefix_id = None

    def free_sequence(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks reaching zero go to the free list, tail blocks first to go."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than it was taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def check_invariants(self, live: list[Sequence]) -> None:
        """Raise AssertionError if the books do not balance against the sequences holding blocks."""
        refs = [0] * self.num_blocks
        for seq in live:
            for block_id in seq.block_table:
                refs[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id] >= 0, f"block {block.block_id} ref count is off"
            assert (block.ref_count == 0) == (block.block_id in self.free), f"block {block.block_id} free/used"
        for key, block_id in self.cached.items():
            assert self.blocks[block_id].key == key, "cache points at a block that no longer holds that prefix"
