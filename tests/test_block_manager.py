"""Tests for miniengine.block_manager: blocks are lent by whole blocks, all or nothing, and always come back.

Unit tests pin each rule (growth by blocks, prefix sharing with ref counts, the last token always computed,
a hit only after the exact same prefix, LRU eviction of freed cached blocks). A hypothesis state machine then
runs random add / compute / publish / decode / free / recompute operations over prompts from a two-token alphabet (so
prefixes repeat) and checks after every operation that the books balance (`check_invariants`) and that every
live sequence's computed tokens are still in its blocks, i.e. no block was shared or evicted wrongly.
"""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from miniengine.block_manager import BlockManager
from miniengine.sampling_params import SamplingParams
from miniengine.sequence import Sequence

_ids = itertools.count()


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", list(tokens), SamplingParams())


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What a scheduler step does to one sequence: allocate n tokens, then count them and publish."""
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """Admit a fresh sequence through the prefix cache and compute the rest of its tokens."""
    cached = bm.lookup_prefix(seq)
    n = seq.num_tokens - len(cached) * bm.block_size
    assert bm.allocate(seq, n, cached)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)
    return cached


def snapshot(bm: BlockManager, *seqs: Sequence) -> tuple:
    return (
        list(bm.free),
        [(b.ref_count, b.key, b.prefix_id) for b in bm.blocks],
        dict(bm.cached),
        [(list(s.block_table), s.num_computed_tokens, s.num_cached_tokens) for s in seqs],
    )


def assert_all_free(bm: BlockManager) -> None:
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


# --- unit tests ---------------------------------------------------------------------------------------------


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(4, 0)


def test_allocation_grows_by_whole_blocks():
    bm = BlockManager(8, 4)
    seq = make_seq(list(range(10)))
    compute(bm, seq, 3)
    assert len(seq.block_table) == 1 and bm.num_free_blocks == 7
    compute(bm, seq, 1)  # fills the first block exactly
    assert len(seq.block_table) == 1
    compute(bm, seq, 1)  # token 4 starts a second block
    assert len(seq.block_table) == 2
    compute(bm, seq, 5)  # tokens 5..9: a third block
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert len(set(seq.block_table)) == 3
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(4) == 1 and bm.blocks_needed(5) == 2
    bm.check_invariants([seq])


def test_prefix_blocks_are_shared_with_ref_counts():
    bm = BlockManager(16, 4)
    first = make_seq(list(range(11)))  # two full blocks and three tokens
    assert admit(bm, first) == []
    second = make_seq(list(range(8)) + [50, 51, 52, 53, 54])  # same first two blocks, different tail
    cached = bm.lookup_prefix(second)
    assert cached == first.block_table[:2]
    free_before = bm.num_free_blocks
    assert bm.allocate(second, second.num_tokens - 8, cached)
    assert second.block_table[:2] == first.block_table[:2]
    assert [bm.blocks[b].ref_count for b in cached] == [2, 2]
    assert second.num_computed_tokens == 8 and second.num_cached_tokens == 8
    assert bm.num_free_blocks == free_before - 2  # only the 5 new tokens took fresh blocks
    assert not set(second.block_table[2:]) & set(first.block_table)
    bm.check_invariants([first, second])

    third = make_seq([0, 1, 2, 3, 9, 9, 9, 9, 9])  # shares only the first block
    assert bm.lookup_prefix(third) == first.block_table[:1]
    assert bm.lookup_prefix(make_seq([7] * 9)) == []


def test_partial_and_uncomputed_blocks_are_not_published():
    bm = BlockManager(8, 4)
    seq = make_seq(list(range(10)))
    assert bm.allocate(seq, 10)
    seq.num_computed_tokens += 6  # a chunk: only the first block is full and computed
    bm.cache_full_blocks(seq)
    assert bm.blocks[seq.block_table[0]].key is not None
    assert all(bm.blocks[b].key is None for b in seq.block_table[1:])
    assert list(bm.cached.values()) == seq.block_table[:1]


@pytest.mark.parametrize("length", range(1, 14))
def test_a_fully_cached_prompt_still_computes_a_token(length):
    bm = BlockManager(16, 4)
    tokens = [t % 3 for t in range(length)]
    admit(bm, make_seq(tokens))
    again = make_seq(tokens)
    cached = bm.lookup_prefix(again)
    assert len(cached) == (length - 1) // 4  # every full block but one when the prompt ends on a block edge
    assert again.num_tokens - len(cached) * bm.block_size >= 1
    admit(bm, again)
    assert again.num_computed_tokens == length


def test_a_block_is_shared_only_after_the_same_prefix():
    """A hit needs the block's tokens *and* the exact prefix its K/V were computed after."""
    bm = BlockManager(16, 2)
    a = make_seq([1, 1, 7, 7, 0])  # block 1 [7, 7] computed after [1, 1]
    c = make_seq([2, 2, 7, 7, 0])  # block 1 [7, 7] computed after [2, 2]
    admit(bm, a)
    admit(bm, c)
    assert bm.lookup_prefix(make_seq([2, 2, 7, 7, 5])) == c.block_table[:2]
    assert bm.lookup_prefix(make_seq([1, 1, 7, 7, 5])) == a.block_table[:2]
    assert bm.lookup_prefix(make_seq([3, 3, 7, 7, 5])) == []  # [7, 7] after an unseen prefix: no hit


def test_freed_cached_blocks_survive_until_evicted_oldest_first():
    bm = BlockManager(6, 2)
    old = make_seq([1, 1, 2, 2, 3])  # blocks: [1 1] [2 2] [3]
    new = make_seq([4, 4, 5, 5, 6])
    admit(bm, old)
    admit(bm, new)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    bm.free_sequence(old)
    bm.free_sequence(new)
    assert_all_free(bm)
    assert len(bm.cached) == 4  # freed, but still cached
    # Freed least recently first, tail blocks first within a sequence.
    assert list(bm.free) == old_blocks[::-1] + new_blocks[::-1]

    # A revival takes the cached blocks straight off the free list; its fresh block is the oldest freed.
    again = make_seq([4, 4, 5, 5, 9])
    assert admit(bm, again) == new_blocks[:2]
    assert again.block_table[2] == old_blocks[2]
    assert [bm.blocks[b].ref_count for b in new_blocks[:2]] == [1, 1]
    bm.free_sequence(again)
    assert list(bm.free)[:2] == [old_blocks[1], old_blocks[0]]

    # The next fresh block evicts the oldest freed cached block, [2 2]; [1 1] stays cached.
    key_22 = bm.blocks[old_blocks[1]].key
    key_11 = bm.blocks[old_blocks[0]].key
    taker = make_seq([8, 8])
    assert bm.allocate(taker, 2)
    assert taker.block_table == [old_blocks[1]]
    assert key_22 not in bm.cached and bm.blocks[old_blocks[1]].key is None
    assert bm.cached.get(key_11) == old_blocks[0]
    assert bm.lookup_prefix(make_seq([1, 1, 2, 2, 3])) == old_blocks[:1]
    bm.check_invariants([taker])


def test_allocate_is_all_or_nothing():
    bm = BlockManager(4, 2)
    holder = make_seq([1, 1, 2, 2, 3])
    admit(bm, holder)  # 3 of the 4 blocks
    seq = make_seq([5, 5, 5, 5])
    before = snapshot(bm, holder, seq)
    assert not bm.allocate(seq, 4)  # needs 2, one is free
    assert snapshot(bm, holder, seq) == before

    # Cached blocks waiting on the free list are taken off it, so they count against it too.
    blocks = list(holder.block_table)
    bm.free_sequence(holder)
    filler = make_seq([9, 9, 9, 9])
    assert bm.allocate(filler, 4)  # the never-used block, then holder's tail
    assert list(bm.free) == [blocks[1], blocks[0]]  # [2 2] and [1 1], still cached
    for tokens in ([1, 1, 2, 2, 4, 4, 4], [1, 1, 2, 2, 4]):
        probe = make_seq(tokens)
        cached = bm.lookup_prefix(probe)
        assert cached == blocks[:2]
        before = snapshot(bm, filler, probe)
        assert not bm.allocate(probe, probe.num_tokens - 4, cached)  # 2 revived + fresh > 2 free
        assert snapshot(bm, filler, probe) == before
    fits = make_seq([1, 1, 4])
    cached = bm.lookup_prefix(fits)
    assert cached == blocks[:1]
    assert bm.allocate(fits, 1, cached)  # 1 revived + 1 fresh == 2 free
    assert fits.block_table == [blocks[0], blocks[1]] and bm.num_free_blocks == 0
    bm.check_invariants([filler, fits])


def test_free_sequence_returns_everything():
    bm = BlockManager(12, 3)
    a = make_seq([1, 2, 3, 4, 5, 6, 7])
    b = make_seq([1, 2, 3, 4, 5, 6, 0])
    admit(bm, a)
    admit(bm, b)
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free_sequence(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    bm.check_invariants([b])
    assert bm.blocks[b.block_table[0]].ref_count == 1
    bm.free_sequence(b)
    assert_all_free(bm)


def test_reset_prefix_cache_forgets_only_unused_prefixes():
    bm = BlockManager(8, 2)
    held, done = make_seq([1, 1, 2, 2, 3]), make_seq([4, 4, 5, 5, 6])
    admit(bm, held)
    admit(bm, done)
    bm.free_sequence(done)
    bm.reset_prefix_cache()
    assert bm.lookup_prefix(make_seq([4, 4, 5, 5, 6])) == []
    assert bm.lookup_prefix(make_seq([1, 1, 2, 2, 3])) == held.block_table[:2]
    bm.check_invariants([held])


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = make_seq([1, 1, 2, 2, 3])
    admit(bm, a)
    assert bm.cached == {} and all(b.key is None for b in bm.blocks)
    assert bm.lookup_prefix(make_seq([1, 1, 2, 2, 3])) == []


# --- random operations --------------------------------------------------------------------------------------


class BlockManagerMachine(RuleBasedStateMachine):
    """Random sequences through one BlockManager, with a model of what each slot of the KV cache holds."""

    @initialize(num_blocks=st.integers(2, 12), block_size=st.integers(1, 3), caching=st.booleans())
    def setup(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.live: list[Sequence] = []
        # slot -> the prefix whose last token's K/V the slot holds (what a model would have written there)
        self.slots: dict[int, tuple[int, ...]] = {}

    def _slot(self, seq: Sequence, pos: int) -> int:
        size = self.bm.block_size
        return seq.block_table[pos // size] * size + pos % size

    def _write(self, seq: Sequence, n: int) -> None:
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            self.slots[self._slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens += n

    def _admit(self, seq: Sequence, chunk: int, publish: bool) -> None:
        cached = self.bm.lookup_prefix(seq)
        assert len(cached) * self.bm.block_size < seq.num_tokens
        n = min(chunk, seq.num_tokens - len(cached) * self.bm.block_size)
        before = snapshot(self.bm, *self.live, seq)
        if not self.bm.allocate(seq, n, cached):
            assert snapshot(self.bm, *self.live, seq) == before
            return
        assert seq.num_computed_tokens == seq.num_cached_tokens == len(cached) * self.bm.block_size
        self.live.append(seq)
        self._write(seq, n)
        if publish:
            self.bm.cache_full_blocks(seq)

    @rule(prompt=st.lists(st.integers(0, 1), min_size=1, max_size=10), chunk=st.integers(1, 8), publish=st.booleans())
    def add(self, prompt: list[int], chunk: int, publish: bool) -> None:
        self._admit(make_seq(prompt), chunk, publish)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), chunk=st.integers(1, 8), token=st.integers(0, 1), publish=st.booleans())
    def step(self, i: int, chunk: int, token: int, publish: bool) -> None:
        """One scheduler step for one sequence: the next chunk of its prompt, or a decode after sampling."""
        seq = self.live[i % len(self.live)]
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(token)
        n = min(chunk, seq.num_tokens - seq.num_computed_tokens)
        before = snapshot(self.bm, *self.live)
        if not self.bm.allocate(seq, n):
            assert snapshot(self.bm, *self.live) == before
            return
        assert len(seq.block_table) == self.bm.blocks_needed(seq.num_computed_tokens + n)
        self._write(seq, n)
        if publish:
            self.bm.cache_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i: int) -> None:
        """A sequence finishes or is aborted."""
        seq = self.live.pop(i % len(self.live))
        self.bm.free_sequence(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), chunk=st.integers(1, 8))
    def recompute(self, i: int, chunk: int) -> None:
        """Preemption by recompute: free a sequence, then admit all its tokens again through the cache."""
        seq = self.live.pop(i % len(self.live))
        self.bm.free_sequence(seq)
        self._admit(make_seq(seq.token_ids), chunk, publish=True)

    @invariant()
    def books_balance(self) -> None:
        self.bm.check_invariants(self.live)
        assert all(b.ref_count >= 0 for b in self.bm.blocks)
        used = {b for seq in self.live for b in seq.block_table}
        assert not used & set(self.bm.free)
        for seq in self.live:
            assert len(seq.block_table) >= self.bm.blocks_needed(seq.num_computed_tokens)
            for pos in range(seq.num_computed_tokens):  # shared or not, evicted or not: still this prefix
                assert self.slots.get(self._slot(seq, pos)) == tuple(seq.token_ids[: pos + 1]), (seq, pos)

    def teardown(self) -> None:
        for seq in self.live:
            self.bm.free_sequence(seq)
        self.live.clear()
        assert_all_free(self.bm)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
