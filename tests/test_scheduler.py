"""Tests for miniengine.scheduler: continuous batching, chunked prefill, preemption by recompute, n>1 siblings.

The scheduler is driven as the engine drives it, by a fake model that is a small paged-attention stand-in:
each fed token's "K/V" is a hash of the token and of every earlier K/V it reads back through the block table,
and the sampled token is a hash of all of them. So a block shared, evicted or overwritten wrongly changes the
output, and every sequence must produce exactly what it produces alone on a perfect cache. Each step checks
the token budget, decodes before prefill chunks before admissions, FCFS admission, `max_num_seqs`, and the
block manager's books; at the end every block is free.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from miniengine.block_manager import BlockManager
from miniengine.sampling_params import SamplingParams
from miniengine.scheduler import ScheduledBatch, Scheduler
from miniengine.sequence import Sequence, SequenceStatus

VOCAB = 5


def kv_of(token: int, earlier: list[int]) -> int:
    """The stand-in K/V of one position: depends on its token and on everything before it."""
    return hash((token, tuple(earlier)))


def sample(kv: list[int]) -> int:
    return hash(tuple(kv)) % VOCAB


def output_alone(prompt: list[int], max_tokens: int) -> list[int]:
    """What a sequence generates on its own, with a perfect KV cache."""
    tokens, kv = list(prompt), []
    while len(tokens) - len(prompt) < max_tokens:
        for token in tokens[len(kv) :]:
            kv.append(kv_of(token, kv))
        tokens.append(sample(kv))
    return tokens[len(prompt) :]


class FakeModel:
    """Writes each fed token's K/V into its slot, reading every earlier position back through the block table."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[int, int] = {}

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, batch: ScheduledBatch) -> list[int]:
        """One sampled token for each sequence that reaches its last token, in batch order."""
        sampled = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            assert len(seq.block_table) * self.block_size >= start + n, "fed tokens without slots"
            kv = [self.slots[self._slot(seq, pos)] for pos in range(start)]
            for pos in range(start, start + n):
                kv.append(kv_of(seq.token_ids[pos], kv))
                self.slots[self._slot(seq, pos)] = kv[-1]
            if batch.samples(i):
                sampled.append(sample(kv))
        return sampled


def make_seq(seq_id: int, prompt: list[int], max_tokens: int, first: Sequence | None = None) -> Sequence:
    request_id = str(seq_id) if first is None else first.request_id
    return Sequence(seq_id, request_id, list(prompt), SamplingParams(max_tokens=max_tokens), first_sibling=first)


def check_batch(sched: Scheduler, batch: ScheduledBatch, running: list[Sequence], waiting: list[Sequence]) -> None:
    """The rules of one step, given who was running and waiting before it."""
    assert 0 < batch.num_tokens <= sched.max_num_batched_tokens or not batch.seqs
    assert all(n >= 1 for n in batch.num_new_tokens)
    assert len(set(map(id, batch.seqs))) == len(batch.seqs)
    assert len(sched.running) <= sched.max_num_seqs
    assert all(s.status is SequenceStatus.RUNNING for s in batch.seqs)
    assert all(s.status is SequenceStatus.WAITING and s in running for s in batch.preempted)
    assert not set(map(id, batch.preempted)) & set(map(id, batch.seqs))
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert seq.num_computed_tokens + n <= seq.num_tokens

    def kind(seq: Sequence) -> int:  # 0: decode, 1: prefill chunk of a running sequence, 2: admitted now
        if seq not in running:
            return 2
        return 0 if batch_remaining[id(seq)] == 1 else 1

    batch_remaining = {id(s): s.num_tokens - s.num_computed_tokens for s in running}
    kinds = [kind(s) for s in batch.seqs]
    assert kinds == sorted(kinds), f"decodes, then prefill chunks, then admissions: {kinds}"
    if any(k > 0 for k in kinds):  # the budget reached past the decodes: all of them are in
        decodes = [s for s in running if batch_remaining[id(s)] == 1 and s.status is SequenceStatus.RUNNING]
        assert all(s in batch.seqs for s in decodes)
    admitted = [s for s in batch.seqs if s not in running]
    assert admitted == waiting[: len(admitted)], "admission is first come, first served"
    assert not (admitted and batch.preempted), "no admission in a step that had to preempt"


def drive(
    sched: Scheduler, seqs: list[Sequence], aborts: dict[int, list[Sequence]] | None = None, max_steps: int = 5000
) -> list[ScheduledBatch]:
    """Run the engine loop until every sequence is finished; aborts[k] are aborted before step k."""
    bm = sched.block_manager
    model = FakeModel(bm.block_size)
    for seq in seqs:
        sched.add(seq)
    batches = []
    for step in range(max_steps):
        for seq in (aborts or {}).get(step, []):
            if not seq.is_finished:
                sched.finish(seq, "abort")
        bm.check_invariants(sched.running)
        if not sched.has_unfinished():
            return batches
        running, waiting = list(sched.running), list(sched.waiting)
        batch = sched.schedule()
        check_batch(sched, batch, running, waiting)
        batches.append(batch)
        tokens = model.run(batch)
        sampled = [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)]
        sched.step_done(batch)
        bm.check_invariants(sched.running)
        assert all(s.num_computed_tokens <= s.num_tokens for s in sched.running)
        for seq, token in zip(sampled, tokens):
            seq.token_ids.append(token)
            if seq.num_output_tokens == seq.params.max_tokens:
                sched.finish(seq, "length")
        bm.check_invariants(sched.running + list(sched.waiting))
    raise AssertionError(f"not finished after {max_steps} steps: the scheduler makes no progress")


def assert_all_free(bm: BlockManager) -> None:
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def scheduled(batch: ScheduledBatch) -> list[tuple[int, int]]:
    return [(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]


# --- unit tests ---------------------------------------------------------------------------------------------


def test_one_step_mixes_decodes_with_chunks_of_several_prefills():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    short = make_seq(0, [1, 2], 4)
    long_a = make_seq(1, list(range(10)), 2)
    long_b = make_seq(2, list(range(10, 20)), 2)
    batches = drive(sched, [short, long_a, long_b])
    assert scheduled(batches[0]) == [(0, 2), (1, 6)]  # short's whole prompt, long_a's first chunk
    assert scheduled(batches[1]) == [(0, 1), (1, 4), (2, 3)]  # a decode, long_a's last chunk, long_b's first
    assert scheduled(batches[2]) == [(0, 1), (1, 1), (2, 6)]  # decodes first, then long_b's next chunk
    assert all(b.num_tokens <= 8 for b in batches)
    for seq in (short, long_a, long_b):
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == output_alone(seq.prompt_token_ids, seq.params.max_tokens)
    assert_all_free(sched.block_manager)


def test_decodes_come_first_when_the_budget_is_short():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=3)
    decoders = [make_seq(i, [i], 5) for i in range(3)]
    late = make_seq(3, list(range(9)), 1)
    batches = drive(sched, [*decoders, late])
    assert scheduled(batches[0]) == [(0, 1), (1, 1), (2, 1)]
    # Three decodes fill each budget of 3: the long prompt waits until they finish.
    assert all(scheduled(b) == [(0, 1), (1, 1), (2, 1)] for b in batches[1:5])
    assert scheduled(batches[5])[0] == (3, 3)
    assert late.output_token_ids == output_alone(late.prompt_token_ids, 1)


def test_fcfs_admission_and_max_num_seqs():
    sched = Scheduler(BlockManager(64, 2), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(i, [i, i + 1, i + 2], 2 + i % 3) for i in range(6)]
    batches = drive(sched, seqs)
    assert [s.seq_id for s in batches[0].seqs] == [0, 1]
    first_step = {}
    for step, batch in enumerate(batches):
        assert len(batch) <= 2
        for seq in batch.seqs:
            first_step.setdefault(seq.seq_id, step)
    assert sorted(first_step, key=lambda i: (first_step[i], i)) == list(range(6))
    assert all(s.output_token_ids == output_alone(s.prompt_token_ids, s.params.max_tokens) for s in seqs)
    assert_all_free(sched.block_manager)


def test_preemption_by_recompute_keeps_every_output():
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [7, 7, 7, 7, 7, 7, 7], [2, 4, 6], [5, 4, 3, 2, 1, 0, 1]]
    max_tokens = [10, 12, 8, 14, 9]
    expected = [output_alone(p, m) for p, m in zip(prompts, max_tokens)]

    # Alone, each through the scheduler with room to spare.
    for prompt, m, want in zip(prompts, max_tokens, expected):
        seq = make_seq(0, prompt, m)
        drive(Scheduler(BlockManager(64, 4), 8, 16), [seq])
        assert seq.output_token_ids == want

    # Together, in 6 blocks (24 slots): each fits alone (at most 16 computed tokens), not all at once.
    sched = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=16)
    seqs = [make_seq(i, p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    batches = drive(sched, seqs)
    assert sched.num_preemptions > 0 and sum(len(b.preempted) for b in batches) == sched.num_preemptions
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions
    for seq, m, want in zip(seqs, max_tokens, expected):
        assert seq.finish_reason == "length" and seq.num_output_tokens == m
        assert seq.output_token_ids == want
    assert_all_free(sched.block_manager)


def test_preempted_sequence_goes_back_to_the_front_and_reuses_its_blocks():
    sched = Scheduler(BlockManager(5, 2), max_num_seqs=8, max_num_batched_tokens=8)
    old = make_seq(0, [1, 1, 2, 2], 2)
    new = make_seq(1, [3, 3, 4, 4], 6)
    queued = make_seq(2, [5], 1)  # the budget keeps it out of the first step
    batches = drive(sched, [old, new, queued])
    assert scheduled(batches[0]) == [(0, 4), (1, 4)]
    # Step 1: old's decode takes the last free block; new's decode finds none, so new (the newest) is preempted.
    assert scheduled(batches[1]) == [(0, 1)] and batches[1].preempted == [new]
    assert new.num_preemptions == 1
    # new came back first (front of the queue), its full prompt blocks straight from the prefix cache.
    assert scheduled(batches[2])[:2] == [(1, 1), (2, 1)]
    # num_cached_tokens counts the first schedule only: a recompute finding its own blocks is no prefix hit.
    assert new.num_cached_tokens == 0
    for seq in (old, new, queued):
        assert seq.output_token_ids == output_alone(seq.prompt_token_ids, seq.params.max_tokens)
    assert_all_free(sched.block_manager)


def test_the_newest_running_sequence_is_preempted_first():
    sched = Scheduler(BlockManager(6, 2), max_num_seqs=8, max_num_batched_tokens=12)
    seqs = [make_seq(i, [i] * 4, 3) for i in range(3)]  # two blocks each: the cache is full after step 0
    batches = drive(sched, seqs)
    assert scheduled(batches[0]) == [(0, 4), (1, 4), (2, 4)]
    # Each decode needs a third block: the newest (2) goes, which frees room for both older ones.
    assert scheduled(batches[1]) == [(0, 1), (1, 1)] and batches[1].preempted == [seqs[2]]
    assert [s.num_preemptions for s in seqs] == [0, 0, 1]
    for seq in seqs:
        assert seq.output_token_ids == output_alone(seq.prompt_token_ids, 3)
    assert_all_free(sched.block_manager)


def test_sibling_waits_for_the_first_prompt_then_shares_its_blocks():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    prompt = list(range(10))  # two full blocks, then two tokens
    first = make_seq(0, prompt, 3)
    sibling = make_seq(1, prompt, 3, first=first)
    after = make_seq(2, [9, 9], 1)
    for seq in (first, sibling, after):
        sched.add(seq)
    model = FakeModel(4)
    for want in ([(0, 4)], [(0, 4)], [(0, 2)]):  # the sibling (and everyone behind it) waits
        batch = sched.schedule()
        assert scheduled(batch) == want
        assert sibling.status is SequenceStatus.WAITING and sibling.waits_for_sibling
        tokens = model.run(batch)
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        sched.step_done(batch)
        for seq, token in zip(sampled, tokens):
            seq.token_ids.append(token)
    assert not sibling.waits_for_sibling
    batch = sched.schedule()
    assert scheduled(batch) == [(0, 1), (1, 2), (2, 1)]  # the sibling computes only its partial last block
    assert sibling.block_table[:2] == first.block_table[:2]
    assert all(bm.blocks[b].ref_count == 2 for b in first.block_table[:2])
    assert sibling.block_table[2] != first.block_table[2]
    assert sibling.num_cached_tokens == 8
    bm.check_invariants(sched.running)
    model.run(batch)
    sched.step_done(batch)
    for seq in (first, sibling, after):
        sched.finish(seq, "abort")
    assert_all_free(bm)


def test_sibling_of_an_aborted_first_does_not_wait():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=4)
    first = make_seq(0, list(range(10)), 2)
    sibling = make_seq(1, list(range(10)), 2, first=first)
    batches = drive(sched, [first, sibling], aborts={1: [first]})
    assert first.finish_reason == "abort" and sibling.finish_reason == "length"
    assert sibling in batches[1].seqs
    assert sibling.output_token_ids == output_alone(list(range(10)), 2)
    assert_all_free(sched.block_manager)


def test_abort_anywhere_returns_every_block():
    sched = Scheduler(BlockManager(8, 2), max_num_seqs=8, max_num_batched_tokens=5)
    seqs = [make_seq(i, [i] * (3 + i), 6) for i in range(5)]
    drive(sched, seqs, aborts={0: [seqs[4]], 2: [seqs[0], seqs[3]], 4: [seqs[1]]})
    assert [s.finish_reason for s in seqs] == ["abort", "abort", "length", "abort", "abort"]
    assert seqs[2].output_token_ids == output_alone(seqs[2].prompt_token_ids, 6)
    sched.finish(seqs[0], "abort")  # twice is harmless
    assert_all_free(sched.block_manager)


# --- random workloads ---------------------------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> dict:
    block_size = draw(st.integers(1, 4))
    requests = draw(
        st.lists(
            st.tuples(
                st.lists(st.integers(0, 2), min_size=1, max_size=12),  # prompt: few tokens, so prefixes repeat
                st.integers(1, 6),  # max_tokens
                st.integers(1, 3),  # n
                st.one_of(st.none(), st.integers(0, 25)),  # abort before this step
            ),
            min_size=1,
            max_size=6,
        )
    )
    # Every sequence must fit alone: it holds at most prompt + max_tokens - 1 computed tokens.
    need = max(-(-(len(p) + m - 1) // block_size) for p, m, _, _ in requests)
    return dict(
        block_size=block_size,
        requests=requests,
        num_blocks=need + draw(st.integers(0, 8)),
        budget=draw(st.integers(1, 16)),
        max_num_seqs=draw(st.integers(1, 5)),
        caching=draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_random_workloads_finish_with_the_outputs_of_running_alone(w):
    bm = BlockManager(w["num_blocks"], w["block_size"], w["caching"])
    sched = Scheduler(bm, w["max_num_seqs"], w["budget"])
    seqs, aborts = [], {}
    for prompt, max_tokens, n, abort_step in w["requests"]:
        first = make_seq(len(seqs), prompt, max_tokens)
        siblings = [first] + [make_seq(len(seqs) + i, prompt, max_tokens, first=first) for i in range(1, n)]
        seqs += siblings
        if abort_step is not None:
            aborts.setdefault(abort_step, []).extend(siblings)
    drive(sched, seqs, aborts)
    for seq in seqs:
        assert seq.is_finished and seq.finish_reason in ("length", "abort")
        if seq.finish_reason == "length":
            assert seq.output_token_ids == output_alone(seq.prompt_token_ids, seq.params.max_tokens)
    assert not sched.running and not sched.waiting
    assert_all_free(bm)
